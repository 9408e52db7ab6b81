"""Convert a checkpoint between formats: clipforge (safetensors + config.json), Hugging Face CLIPModel, OpenAI's
state dict, and an open_clip model folder (open_clip_config.json + safetensors: ``local-dir:`` or a hub repo)."""
from __future__ import annotations

from pathlib import Path

from . import load_model
from .checkpoint import hf, openai, save_pretrained

FORMATS = ("clipforge", "hf", "openai", "open_clip")


def convert(src: str, dst: str, to: str = "clipforge", model: str | None = None, quick_gelu: bool | None = None,
            trust_pickle: bool = False) -> Path:
    """Read ``src`` (any format ``clipforge.load`` reads; ``model`` names the architecture if it cannot be inferred)
    and write it to ``dst`` in format ``to``. Returns the written path."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose from {', '.join(FORMATS)}")
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
