"""Freezing a tower but its last groups of parameters (open_clip's ``--lock-image-unlocked-groups`` and
``--lock-text-unlocked-layers``): a pretrained tower fine-tuned only near its output."""
from __future__ import annotations

from torch import nn


def unlock_last(tower: nn.Module, groups: list, count: int, what: str, unit: str) -> None:
    """Freeze the whole ``tower``, then let the last ``count`` of its ``groups`` (each a list of modules and
    parameters, input side first) train again; parameters in no group (a CoCa's attention pooler) stay frozen, as
    open_clip's ``lock`` leaves them."""
    if not 0 < count <= len(groups):
        raise ValueError(f"{what}: {count} unlocked {unit}; this tower has {len(groups)} (from 1 to {len(groups)})")
    tower.requires_grad_(False)
    for group in groups[len(groups) - count:]:
        for item in group:
            for parameter in ([item] if isinstance(item, nn.Parameter) else item.parameters()):
                parameter.requires_grad_(True)
