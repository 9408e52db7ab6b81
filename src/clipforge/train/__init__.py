"""Contrastive pre-training: ``train(TrainConfig(...))`` or ``clipforge train``."""
from .loop import TrainConfig, TrainingDiverged, exit_torchrun_rank, train

__all__ = ["TrainConfig", "TrainingDiverged", "exit_torchrun_rank", "train"]
