"""Training checkpoints: one folder per step, written whole then renamed, so a crash never leaves a torn one.

``<run>/checkpoints/step-00001000/`` holds ``model.safetensors`` + ``config.json`` (loadable with ``clipforge.load``)
and ``train_state.pt``: optimizer, scheduler, grad scaler, RNG states of every rank and the data position of every
part, all plain tensors and numbers, so it loads with ``torch.load(weights_only=True)``. Every trainer writes its
resumable state with ``write_train_state`` (LiMBer's map too).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, save_pretrained
from ..files import atomic_path

_STEP_DIR = re.compile(r"step-(\d+)$")
TRAIN_STATE = "train_state.pt"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.exists():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.search(p.name) and (p / TRAIN_STATE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.search(p.name).group(1)))


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``latest`` -> the newest complete checkpoint of ``run_dir`` (None if there is none yet); else a path."""
    if resume == "latest":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAIN_STATE).exists():
        raise CheckpointError(f"{path}: not a training checkpoint (no {TRAIN_STATE}); pass a step folder or 'latest'")
    return path


def rng_state() -> dict:
    import random

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, model, model_config: dict, train_state: dict,
                    keep: int | None = 3) -> Path:
    """Write the step folder atomically (temp folder + rename), then prune to the newest ``keep``."""
    tmp, final = new_step_folder(run_dir, step)
    try:
        save_pretrained(model, tmp, model_config)
        write_train_state(tmp, train_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_step_folder(tmp, final, run_dir, keep)


def new_step_folder(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    """(a fresh temporary folder to write step ``step`` into, the name it will have once complete)."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=folder)), folder / f"step-{step:08d}"


def publish_step_folder(tmp: Path, final: Path, run_dir: str | Path, keep: int | None) -> Path:
    """Rename a completely written temporary step folder into place (replacing one of the same step), then prune
    the run to its newest ``keep`` checkpoints; the temporary folder never outlives this call."""
    try:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_train_state(folder: str | Path, state: dict) -> Path:
    """``folder/train_state.pt``, atomically: tensors, numbers, strings and containers of them only."""
    with atomic_path(Path(folder) / TRAIN_STATE) as tmp:
        torch.save(state, tmp)
    return Path(folder) / TRAIN_STATE


def load_train_state(folder: str | Path) -> dict:
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {TRAIN_STATE} to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)
