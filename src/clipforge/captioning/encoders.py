"""The frozen image encoders LiMBer maps from: any clipforge image tower (CLIP, fine-tuned, bag-of-words, randomly
initialised), or any Hugging Face vision model folder (ViT, BEiT, ResNet, ConvNeXt ...: ``AutoModel`` with its
``AutoImageProcessor``).

Two readings of "the image features" (the paper maps one vector per image; its k prompts come from one linear layer):
- ``pooled``: the encoder's one vector per image (a CLIP tower's embedding; a Hugging Face model's pooled output, or
  the mean of its last hidden states where it has none), mapped to k prompts by one linear layer (k x lm_dim outputs);
- ``grid``: the last layer's spatial map (a ViT's patch tokens, a ResNet's last feature map) average-pooled to k
  positions, each mapped to one prompt by the same linear layer (lm_dim outputs).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..preprocess import image_batch

FEATURES = ("pooled", "grid")


def grid_shape(k: int) -> tuple[int, int]:
    """The most square (rows, columns) with rows * columns == k."""
    rows = max(r for r in range(1, int(math.isqrt(k)) + 1) if k % r == 0)
    return rows, k // rows


def pool_grid(feature_map: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, k, C]``: average-pooled to k positions, row-major."""
    pooled = F.adaptive_avg_pool2d(feature_map.float(), grid_shape(k))
    return pooled.flatten(2).transpose(1, 2)


class FrozenImageEncoder:
    """``features(images)``: ``[N, D]`` (pooled) or ``[N, k, D]`` (grid) for PIL images; never trained."""

    def __init__(self, spec: str, model, preprocess, kind: str, features: str = "pooled", k: int = 4,
                 batch_size: int = 64):
        if features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
        self.spec, self.model, self.preprocess, self.kind = spec, model.eval().requires_grad_(False), preprocess, kind
        self.feature_kind, self.k, self.batch_size = features, k, batch_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def features(self, images: list) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            chunks.append(self._encode(batch).float().cpu())
        if not chunks:
            raise ValueError("no images to embed")
        return torch.cat(chunks)

    def _encode(self, images: list) -> torch.Tensor:
        if self.kind == "hf":
            pixels = self.preprocess(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            out = self.model(pixel_values=pixels)
            if self.feature_kind == "grid":
                return pool_grid(hf_feature_map(out.last_hidden_state), self.k)
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                hidden = out.last_hidden_state
                pooled = hidden.flatten(2).mean(-1) if hidden.ndim == 4 else hidden.mean(1)
            return pooled.flatten(1)
        batch = image_batch([self.preprocess(image) for image in images], self.device)
        if self.feature_kind == "grid":
            return pool_grid(self.model.visual.forward_grid(batch), self.k)
        return self.model.encode_image(batch)


def hf_feature_map(hidden: torch.Tensor) -> torch.Tensor:
    """A Hugging Face model's last hidden state as ``[N, C, H, W]``: convolutional maps as they are; token
    sequences without their class token (when the rest is a square grid) reshaped to the patch grid."""
    if hidden.ndim == 4:
        return hidden
    tokens = hidden.shape[1]
    for drop in (1, 0, 2):  # [CLS] (+ a distillation token) ahead of the patches
        side = math.isqrt(tokens - drop)
        if side * side == tokens - drop and side > 0:
            patches = hidden[:, drop:]
            return patches.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], side, side)
    raise ValueError(f"cannot read a spatial grid from {tokens} tokens")


def is_hf_vision_folder(path: str | Path) -> bool:
    """A Hugging Face model folder that is not a CLIP or SigLIP model (clipforge loads those as its own) or a clipforge
    checkpoint."""
    from ..checkpoint.hf import is_clip_config

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return "model_type" in data and not is_clip_config(data) and data.get("format") != "clipforge"


def open_encoder(spec: str, pretrained: str | None = None, device: str = "cpu", features: str = "pooled", k: int = 4,
                 seed: int = 0, save_random_to: str | Path | None = None) -> FrozenImageEncoder:
    """The frozen encoder ``spec`` names: a clipforge checkpoint (any objective), a Hugging Face vision model folder,
    a zoo name with ``pretrained`` weights, or a zoo name alone: randomly initialised from ``seed`` (saved to
    ``save_random_to``, so that it reloads exactly)."""
    from .. import load
    from ..models import list_models
    from ..models.image_tower import OBJECTIVES as IMAGE_TOWER_OBJECTIVES, load_image_tower

    if Path(spec).exists() and is_hf_vision_folder(spec):
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(spec).to(device)
        return FrozenImageEncoder(str(spec), model, AutoImageProcessor.from_pretrained(spec), "hf",
                                  features, k)
    if Path(spec).exists():
        config_file = Path(spec) / "config.json"
        config = json.loads(config_file.read_text()).get("model_cfg", {}) if config_file.is_file() else {}
        if config.get("objective") in IMAGE_TOWER_OBJECTIVES:
            model, preprocess = load_image_tower(spec, device)
        else:
            model, preprocess, _ = load(spec, device=device)
        return FrozenImageEncoder(str(spec), model, preprocess, "clipforge", features, k)
    if pretrained is not None:
        model, preprocess, _ = load(spec, pretrained=pretrained, device=device)
        return FrozenImageEncoder(f"{spec}@{pretrained}", model, preprocess, "clipforge", features, k)
    if spec not in list_models():
        raise ValueError(f"--clip {spec!r}: not a checkpoint, a Hugging Face vision folder or a zoo name "
                         f"({', '.join(list_models())})")
    if save_random_to is None:
        raise ValueError(f"a randomly initialised {spec} must be saved with the map to be reloaded")
    from .. import create_model, save_pretrained
    from ..models import get_model_config

    torch.manual_seed(seed)
    model = create_model(spec)
    path = save_pretrained(model, Path(save_random_to), get_model_config(spec))
    model, preprocess, _ = load(str(path), device=device)
    return FrozenImageEncoder(str(path), model, preprocess, "clipforge", features, k)
