"""The one error every checkpoint reader and writer raises."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file or key."""


class ImageTowerCheckpointError(CheckpointError):
    """A checkpoint of an image tower trained without a text encoder (``--objective bow|caption|labels|
    self-supervised``) given where a CLIP model was expected; ``objective`` says which, for callers that can use one
    (``clipforge.models.image_tower.load_image_tower``)."""

    def __init__(self, message: str, objective: str):
        super().__init__(message)
        self.objective = objective
