"""The one error every checkpoint reader and writer raises."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file or key."""
