"""AdamW with CLIP's parameter groups, and the learning-rate schedules (linear warmup, then cosine or constant)."""
from __future__ import annotations

import math

import torch


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, embeddings and the temperature are not decayed (as in CLIP and open_clip)."""
    return param.ndim < 2 or "embedding" in name or name.endswith(("logit_scale", "logit_bias"))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-6,
                    fused: bool | None = None):
    """AdamW over CLIP's two parameter groups; ``fused=None`` takes the fused kernel wherever it exists."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_weight_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: both towers are locked")
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps,
                             fused=_can_fuse(decay + no_decay) if fused is None else fused)


def _can_fuse(params: list[torch.Tensor]) -> bool:
    """The fused AdamW kernel (one pass per tensor instead of ~10) exists for float tensors on CPU and CUDA; the
    optimiser step is a large share of a small model's CPU step (docs/BENCHMARKS.md)."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


SCHEDULES = ("cosine", "constant", "constant-cooldown")


def lr_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int, end_ratio: float = 0.0,
                cooldown_steps: int = 0, cooldown_power: float = 1.0):
    """The LR factor per step, after a linear ramp over ``warmup_steps``: ``cosine`` from 1 down to ``end_ratio`` at
    ``total_steps`` (CLIP's); ``constant`` 1 (a run that can be extended, or a schedule-free comparison);
    ``constant-cooldown`` 1, then a fall to ``end_ratio`` over the last ``cooldown_steps``, linear or with
    ``cooldown_power`` polynomial (open_clip's const-cooldown and its ``--lr-cooldown-power``: a constant run whose
    checkpoints can each be cooled down into a finished model)."""
    if kind not in SCHEDULES:
        raise ValueError(f"--lr-schedule {kind!r}: one of {', '.join(SCHEDULES)}")
    if kind == "constant-cooldown" and not 0 < cooldown_steps <= total_steps - warmup_steps:
        raise ValueError(f"--cooldown {cooldown_steps}: between 1 and the {total_steps - warmup_steps} steps after "
                         f"warmup")
    cooldown_start = total_steps - cooldown_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if kind == "constant" or step < cooldown_start:
            return 1.0
        remaining = 1 - min(1.0, (step - cooldown_start) / cooldown_steps)
        return end_ratio + (1 - end_ratio) * remaining ** cooldown_power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
