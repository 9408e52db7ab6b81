"""OpenAI's key layout (openai/CLIP, and open_clip's, which is the same): the text tower at the top level.

clipforge's layout is OpenAI's with the text tower under ``text.``; the image tower (``visual.*``) is shared.
"""
from __future__ import annotations

from pathlib import Path

import torch

# OpenAI's TorchScript archives carry these as attributes; they are not weights.
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def matches(state: dict) -> bool:
    return "token_embedding.weight" in state


def to_clipforge(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key in NON_WEIGHT_KEYS or key.endswith("attn_mask"):
            continue
        out["text." + key if key.startswith(TEXT_PREFIXES) else key] = value
    return out


def from_clipforge(state: dict) -> dict:
    """OpenAI/open_clip key layout (the text tower at the top level); loads into both of them."""
    return {(k[len("text."):] if k.startswith("text.") else k): v for k, v in state.items()}


def save(model, path: str | Path) -> Path:
    """A state dict file openai/CLIP and open_clip load: ``.safetensors``, else a plain tensor dict for
    ``torch.load(weights_only=True)``."""
    from .errors import CheckpointError
    from ..files import atomic_path
    from .io import save_safetensors

    path = Path(path)
    state = from_clipforge(model.state_dict())
    if path.suffix == ".safetensors":
        save_safetensors(state, path, {"format": "pt"})
        return path
    if "logit_bias" in state:
        raise CheckpointError("OpenAI's format has no logit_bias; write clipforge or safetensors instead")
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path
