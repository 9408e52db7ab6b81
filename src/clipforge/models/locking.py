"""Freezing a tower but its last groups of parameters (open_clip's ``--lock-image-unlocked-groups`` and
``--lock-text-unlocked-layers``): a pretrained tower fine-tuned only near its output."""
from __future__ import annotations

from torch import nn


def unlock_last(groups: list, count: int, what: str, unit: str) -> None:
    """Freeze every parameter of ``groups`` (each a list of modules and parameters, input side first), then let the
    last ``count`` groups train again."""
    if not 0 < count <= len(groups):
        raise ValueError(f"{what}: {count} unlocked {unit}; this tower has {len(groups)} (from 1 to {len(groups)})")
    for index, group in enumerate(groups):
        trainable = index >= len(groups) - count
        for item in group:
            for parameter in ([item] if isinstance(item, nn.Parameter) else item.parameters()):
                parameter.requires_grad_(trainable)
