"""Convert a checkpoint between formats: clipforge (safetensors + config.json), Hugging Face CLIPModel, OpenAI."""
from __future__ import annotations

from pathlib import Path

import torch

from . import load_model
from .checkpoint import (CheckpointError, atomic_path, clipforge_config_to_hf, clipforge_to_hf, clipforge_to_openai,
                         save_pretrained, save_safetensors, write_json)

FORMATS = ("clipforge", "hf", "openai")


def convert(src: str, dst: str, to: str = "clipforge", model: str | None = None, quick_gelu: bool | None = None,
            trust_pickle: bool = False) -> Path:
    """Read ``src`` (any format ``clipforge.load`` reads; ``model`` names the architecture if it cannot be inferred)
    and write it to ``dst`` in format ``to``. Returns the written path."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose from {', '.join(FORMATS)}")
    clip = load_model(model, pretrained=src, quick_gelu=quick_gelu, trust_pickle=trust_pickle) if model else \
        load_model(src, quick_gelu=quick_gelu, trust_pickle=trust_pickle)
    state, config = clip.state_dict(), clip.config
    dst_path = Path(dst)
    if to == "clipforge":
        return save_pretrained(clip, dst_path, config)
    if to == "hf":
        hf_state = clipforge_to_hf(state)
        hf_config = clipforge_config_to_hf(config, float(clip.logit_scale.detach()))
        save_safetensors(hf_state, dst_path / "model.safetensors", {"format": "pt"})
        write_json(dst_path / "config.json", hf_config)
        return dst_path
    openai_state = clipforge_to_openai(state)
    if dst_path.suffix == ".safetensors":
        save_safetensors(openai_state, dst_path, {"format": "pt"})
    else:
        if "logit_bias" in openai_state:
            raise CheckpointError("OpenAI's format has no logit_bias; write clipforge or safetensors instead")
        with atomic_path(dst_path) as tmp:
            torch.save(openai_state, tmp)  # a plain tensor dict: loads with torch.load(weights_only=True)
    return dst_path
