"""LiMBer captioning (Merullo et al. 2022): see ``limber`` for the model and training, ``cli`` for the commands."""
