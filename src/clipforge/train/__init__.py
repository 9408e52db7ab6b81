"""Contrastive pre-training: ``train(TrainConfig(...))`` or ``clipforge train``."""
from .loop import TrainConfig, TrainingDiverged, train

__all__ = ["TrainConfig", "TrainingDiverged", "train"]
