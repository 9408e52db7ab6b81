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

    from .hf import is_siglip

    path = Path(path)
    state = model.state_dict()
    if is_siglip(state):
        raise CheckpointError("a SigLIP model has no OpenAI layout (open_clip keeps its text tower apart and builds "
                              "its image tower with timm); write --to open_clip, hf or clipforge")
    state = from_clipforge(state)
    if path.suffix == ".safetensors":
        save_safetensors(state, path, {"format": "pt"})
        return path
    if "logit_bias" in state:
        raise CheckpointError("OpenAI's format has no logit_bias; write clipforge or safetensors instead")
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


# open_clip model_cfg keys that mean the same in clipforge's configs (custom_text: a layout flag, read off the keys)
OPEN_CLIP_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                      "custom_text"}
OPEN_CLIP_VISION_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout"}
OPEN_CLIP_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def keys_outside_open_clip(config: dict) -> list[str]:
    """The keys of a model config (open_clip's ``model_cfg`` or clipforge's) that the two do not share: an
    architecture one of them would build differently or not at all."""
    return sorted(set(config) - OPEN_CLIP_TOP_KEYS) + \
        sorted(f"vision_cfg.{k}" for k in set(config.get("vision_cfg", {})) - OPEN_CLIP_VISION_KEYS) + \
        sorted(f"text_cfg.{k}" for k in set(config.get("text_cfg", {})) - OPEN_CLIP_TEXT_KEYS)


def config_from_open_clip(model_cfg: dict, where: str) -> dict:
    """clipforge's config for an open_clip ``model_cfg`` (a model folder's or hub repo's): CLIP's as it is; timm's
    SigLIP and ConvNeXt towers translated; anything clipforge would build differently (another timm tower, LayerScale,
    attentional pooling ...) refused by name, naming ``where`` it came from, rather than loaded wrong."""
    from . import timm_convnext, timm_siglip
    from .errors import CheckpointError

    if timm_convnext.is_open_clip_convnext(model_cfg):
        return timm_convnext.config_from_open_clip(model_cfg)
    if timm_siglip.is_open_clip_siglip(model_cfg):
        return timm_siglip.config_from_open_clip(model_cfg)
    timm_name = model_cfg.get("vision_cfg", {}).get("timm_model_name")
    if timm_name:
        raise CheckpointError(f"{where}: its image tower is timm's {timm_name!r}, which clipforge does not build "
                              "(timm's SigLIP and ConvNeXt towers are)")
    unsupported = keys_outside_open_clip(model_cfg)
    if unsupported:
        raise CheckpointError(f"{where}: this architecture uses {', '.join(unsupported)}, which clipforge does not "
                              "build; it would not load with identical outputs")
    return {k: v for k, v in model_cfg.items() if k != "custom_text"}  # the text layout is detected from the keys


def save_open_clip(model, folder: str | Path) -> Path:
    """An open_clip model folder: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and
    ``open_clip_model.safetensors``, what ``open_clip.create_model_and_transforms("local-dir:FOLDER")`` reads, and,
    uploaded, ``hf-hub:OWNER/NAME`` (for open_clip and clipforge alike)."""
    from . import hf, timm_convnext, timm_siglip
    from .errors import CheckpointError
    from .io import save_safetensors
    from ..models import is_convnext
    from ..files import write_json
    from ..hub_tokenizer import copy_tokenizer_files
    from ..preprocess import Preprocess

    folder = Path(folder)
    config, state = model.config, model.state_dict()
    if hf.is_siglip(config):  # open_clip builds SigLIP's image tower from timm (checked by config_to_open_clip);
        # its text tower stays under text. (open_clip's "custom_text" layout)
        from ..hub_tokenizer import tokenizer_files

        config, state = timm_siglip.config_to_open_clip(config), timm_siglip.from_clipforge(state)
        tokenizer_files(model.config, fetch=True)  # fetched (or refused) before anything is written
    elif is_convnext(config):  # ConvNeXt: timm's tower by name, the weights as they are
        config, state = timm_convnext.config_to_open_clip(config), from_clipforge(state)
    else:
        state = from_clipforge(state)
        unsupported = keys_outside_open_clip(config)
        if unsupported:
            raise CheckpointError(f"this model's config uses {', '.join(unsupported)}, which open_clip's CLIP does "
                                  "not take; keep it as a clipforge folder (--to clipforge)")
    preprocess = Preprocess(model.image_size, **(getattr(model, "normalisation", None) or {})).settings
    save_safetensors(state, folder / "open_clip_model.safetensors", {"format": "pt"})
    write_json(folder / "open_clip_config.json", {"model_cfg": config, "preprocess_cfg": preprocess})
    # SigLIP's tokenizer: open_clip's local-dir: reads it from the folder
    copy_tokenizer_files(model.config, folder, fetch=hf.is_siglip(model.config))
    return folder
