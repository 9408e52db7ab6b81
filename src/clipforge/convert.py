"""Convert a checkpoint between formats: clipforge (safetensors + config.json), Hugging Face CLIPModel, OpenAI's
state dict, and an open_clip model folder (open_clip_config.json + safetensors: ``local-dir:`` or a hub repo)."""
from __future__ import annotations

from pathlib import Path

from . import load_model
from .checkpoint import hf, openai, save_pretrained

FORMATS = ("clipforge", "hf", "openai", "open_clip")
# what marks a folder as holding a checkpoint already: weights, configs, a training run's state
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                    "train_state.pt")


def check_destination(src: str, dst: str, to: str, overwrite: bool = False) -> None:
    """Refuse a write that would replace what it reads, or mix two checkpoints in one folder. Converting a folder
    into itself (or an --to hf into a clipforge folder) overwrote config.json and the weights with another format's,
    leaving the training state of a run beside them; a folder holding a checkpoint takes a new one only with
    ``overwrite``, a file only with ``overwrite``, and never the source itself."""
    source, target = Path(src).resolve(), Path(dst).resolve()
    if source.exists() and (target == source or (to != "openai" and source.is_file() and source.parent == target
                                                 and source.name in CHECKPOINT_FILES)):
        raise ValueError(f"{dst} is the checkpoint being converted, or holds it: write the conversion to another "
                         f"{'file' if to == 'openai' else 'folder'}")
    if overwrite:
        return
    if to == "openai" and target.is_file():
        raise ValueError(f"{dst} exists; pass --overwrite to replace it")
    held = sorted(p.name for p in target.iterdir() if p.name in CHECKPOINT_FILES) if target.is_dir() else []
    if held:
        raise ValueError(f"{dst} holds a checkpoint already ({', '.join(held)}): writing {to} files into it would "
                         "replace or mix with them; give a new folder, or --overwrite to write over it")


def convert(src: str, dst: str, to: str = "clipforge", model: str | None = None, quick_gelu: bool | None = None,
            trust_pickle: bool = False, overwrite: bool = False) -> Path:
    """Read ``src`` (any format ``clipforge.load`` reads; ``model`` names the architecture if it cannot be inferred)
    and write it to ``dst`` in format ``to``. Returns the written path. ``overwrite``: write into a folder that holds
    a checkpoint already (or over an existing file); never over ``src`` itself."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose from {', '.join(FORMATS)}")
    check_destination(src, dst, to, overwrite)
    clip = load_model(model, pretrained=src, quick_gelu=quick_gelu, trust_pickle=trust_pickle) if model else \
        load_model(src, quick_gelu=quick_gelu, trust_pickle=trust_pickle)
    if to == "clipforge":
        return save_pretrained(clip, Path(dst), clip.config)
    if to == "open_clip":  # open_clip's folder names a Hugging Face text tower too (text_cfg.hf_model_name)
        return openai.save_open_clip(clip, dst)
    text_model = clip.config.get("text_cfg", {}).get("hf_model_name")
    if text_model:  # neither layout has a place for another text encoder: refuse rather than write an orphan file
        from .checkpoint.errors import CheckpointError

        raise CheckpointError(f"{src}: its text tower is {text_model}, a Hugging Face encoder, which clipforge's {to} "
                              f"export cannot hold (CLIP's own text transformer only); write --to open_clip or "
                              f"--to clipforge, which open_clip and clipforge read")
    return (hf if to == "hf" else openai).save(clip, dst)
