"""clipforge: CLIP models, training, evaluation, search and captioning in one package.

    >>> import clipforge
    >>> model, preprocess, tokenizer = clipforge.load("ViT-Tiny-64")          # random init
    >>> model, preprocess, tokenizer = clipforge.load("runs/demo/checkpoints/step-00000360")  # a clipforge run
    >>> model, preprocess, tokenizer = clipforge.load("ViT-B-32", pretrained="openai")
"""
from __future__ import annotations

import os

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import CLIP

# The public names resolve on first use (PEP 562), so that commands without a model (``clipforge index build``,
# ``clipforge --help``) never import torch: importing it costs ~650 MB of RSS and a second or more.
_LAZY = {
    "CheckpointError": "checkpoint", "infer_config": "checkpoint", "load_into": "checkpoint",
    "read_checkpoint": "checkpoint", "save_pretrained": "checkpoint",
    "CLIP": "models", "UnknownModelError": "models", "get_model_config": "models", "list_models": "models",
    "create_model": "open_clip_api", "create_model_and_transforms": "open_clip_api",
    "create_model_from_pretrained": "open_clip_api", "build_zero_shot_classifier": "open_clip_api",
    "decode": "open_clip_api", "add_model_config": "open_clip_api", "AugmentationCfg": "open_clip_api",
    "list_pretrained_tags_by_model": "open_clip_api", "list_pretrained_models_by_tag": "open_clip_api",
    "IMAGENET_CLASSNAMES": "open_clip_api", "OPENAI_IMAGENET_TEMPLATES": "open_clip_api",
    "SIMPLE_IMAGENET_TEMPLATES": "open_clip_api", "OPENAI_DATASET_MEAN": "open_clip_api",
    "OPENAI_DATASET_STD": "open_clip_api",
    "Preprocess": "preprocess", "image_transform": "preprocess",
    "get_pretrained": "pretrained", "list_pretrained": "pretrained", "register_pretrained": "pretrained",
    "Tokenizer": "tokenizer", "get_tokenizer": "tokenizer", "tokenize": "tokenizer",
    # the rest of open_clip's namespace that scripts use (``import clipforge as open_clip``)
    "SimpleTokenizer": "tokenizer", "ClipLoss": "loss", "SigLipLoss": "loss", "CoCa": "models.coca",
    "get_cast_dtype": "open_clip_api", "get_input_dtype": "open_clip_api", "load_checkpoint": "open_clip_api",
    "trace_model": "open_clip_api", "get_model_preprocess_cfg": "open_clip_api",
    "get_model_tokenize_cfg": "open_clip_api", "list_openai_models": "open_clip_api",
    "load_openai_model": "open_clip_api", "get_pretrained_cfg": "open_clip_api", "get_pretrained_url": "open_clip_api",
    "is_pretrained_cfg": "open_clip_api", "download_pretrained": "open_clip_api",
    "download_pretrained_from_url": "open_clip_api", "set_model_preprocess_cfg": "open_clip_api",
    "convert_weights_to_lp": "open_clip_api", "convert_weights_to_fp16": "open_clip_api",
    "CoCaLoss": "open_clip_losses", "DistillClipLoss": "open_clip_losses", "create_loss": "open_clip_losses",
    "build_zero_shot_classifier_legacy": "open_clip_api", "CLIPVisionCfg": "open_clip_api",
    "CLIPTextCfg": "open_clip_api", "CustomTextCLIP": "models",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__version__ = "0.1.0"
__all__ = ["load", "create_model", "create_model_and_transforms", "create_model_from_pretrained", "list_models",
           "get_tokenizer", "tokenize", "list_pretrained",
           "register_pretrained", "save_pretrained", "CLIP", "Tokenizer", "Preprocess", "CheckpointError",
           "UnknownModelError", "zero_shot_classifier", "image_transform"]


def _looks_like_path(name: str) -> bool:
    """A checkpoint path rather than a zoo name: what exists on disk, or is spelt as a path and names no architecture
    (OpenAI's "ViT-B/32" is ViT-B-32, as in open_clip)."""
    from .models import is_model_name

    if os.path.exists(name):
        return True
    return (os.path.sep in name or name.startswith(".")) and not is_model_name(name)


def load_model(name_or_path: str, pretrained: str | None = None, quick_gelu: bool | None = None,
               trust_pickle: bool = False, overrides: dict | None = None) -> CLIP:
    """The model alone; see ``load``. ``overrides``: merged into the config before the model is built (nested dicts
    key by key), as ``create_model``'s keywords are; position embeddings are then resized to a new image size or
    context length as open_clip resizes them, and other weights that do not fit are an error naming the key."""
    import copy

    from .checkpoint import load_into, read_preprocess_cfg
    from .models import create_model, merge_config

    config, state, normalisation, source = read_model_weights(name_or_path, pretrained, quick_gelu, trust_pickle)
    if overrides:
        merge_config(config, copy.deepcopy(overrides))
    if config.get("objective") == "classify":  # a fine-tuned CLIP: the model plus its class head
        from .finetune import CLIPClassifier

        model = CLIPClassifier.from_config(config)
        model.normalisation = read_preprocess_cfg(source)
        load_into(model, state, source=source)
        return model.eval()
    # a Hugging Face text tower whose weights the checkpoint brings is built from its config alone (nothing fetched)
    hf_text = state is not None and "hf_model_name" in config.get("text_cfg", {})
    model = create_model(config, **({"text_cfg": {"hf_pretrained": False}} if hf_text else {}))
    model.config = config
    model.normalisation = normalisation  # the weights' own preprocessing (mean, std, resize), for ``load``
    if state is not None:
        if overrides:  # another image size or context length than the weights': their positions resized to it
            from .checkpoint.io import resize_positions

            state = resize_positions(state, model)
        load_into(model, state, source=source)
    return model.eval()


def read_model_weights(name_or_path: str, pretrained: str | None = None, quick_gelu: bool | None = None,
                       trust_pickle: bool = False) -> tuple[dict, dict | None, dict, str]:
    """What ``load_model`` builds from, without building it: ``(config, state dict in clipforge's layout or None for a
    bare zoo name, the weights' own preprocessing, source)``. Training from ``--pretrained`` loads the state into the
    model it has built, rather than building a second one to copy from."""
    from .checkpoint import ImageTowerCheckpointError, infer_config, read_checkpoint, read_preprocess_cfg
    from .models import get_model_config, list_models
    from .pretrained import get_pretrained

    config, state, normalisation = None, None, {}
    name_or_path = os.fspath(name_or_path)  # a pathlib.Path too
    pretrained = os.fspath(pretrained) if pretrained is not None else None
    if name_or_path.startswith("local-dir:"):  # open_clip's spelling of a model folder
        name_or_path = name_or_path[len("local-dir:"):]
    if name_or_path.startswith("hf-hub:") and pretrained is None:
        from .pretrained import fetch_hub

        hub = fetch_hub(name_or_path[len("hf-hub:"):])
        state, _ = read_checkpoint(hub.weights, trust_pickle=trust_pickle)
        config, source = hub.config, name_or_path
        normalisation = dict(hub.preprocess or {})
    elif pretrained is None and name_or_path not in list_models() and _looks_like_path(name_or_path):
        state, config = read_checkpoint(name_or_path, trust_pickle=trust_pickle)
        objective = (config or {}).get("objective", "contrastive")
        if objective == "classify":
            return config, state, {}, name_or_path
        if objective != "contrastive":
            raise ImageTowerCheckpointError(f"{name_or_path}: an image tower trained with --objective {objective}, "
                                            "not a CLIP model (no text tower); load it with "
                                            "clipforge.models.image_tower.load_image_tower", objective)
        if config is None or "vision_cfg" not in config:  # no full config stored: read it off the weight shapes
            config = {**infer_config(state), **(config or {})}
        source, normalisation = name_or_path, read_preprocess_cfg(name_or_path)
    else:
        config = get_model_config(name_or_path)
        source = name_or_path
        if pretrained is not None:
            if os.path.exists(pretrained):
                path, normalisation = pretrained, read_preprocess_cfg(pretrained)
            elif pretrained.startswith("hf-hub:"):  # a hub repo's weights into the named architecture
                from .pretrained import fetch_hub

                hub = fetch_hub(pretrained[len("hf-hub:"):])
                path, normalisation = hub.weights, dict(hub.preprocess or {})
            else:
                from .pretrained import fetch

                entry = get_pretrained(name_or_path, pretrained)
                path = fetch(entry)
                # QuickGELU if the weights were trained with it, or the name asks for it (open_clip's NAME-quickgelu)
                config["quick_gelu"] = entry.quick_gelu or config.get("quick_gelu", False)
                normalisation = entry.preprocess
            state, file_config = read_checkpoint(path, trust_pickle=trust_pickle)
            if file_config and "quick_gelu" in file_config:
                config["quick_gelu"] = file_config["quick_gelu"]
            source = str(pretrained)
    if quick_gelu is not None:
        config["quick_gelu"] = quick_gelu
    _use_tokenizer_beside_weights(config, name_or_path, pretrained)
    if state is not None and "logit_bias" in state and config.get("init_logit_bias") is None:
        config["init_logit_bias"] = 0.0
    return config, state, normalisation, source


def _use_tokenizer_beside_weights(config: dict, *paths) -> None:
    """A model with its own tokenizer files (SigLIP's) uses those in the folder its weights came from."""
    from .hub_tokenizer import has_tokenizer_files

    if "hf_tokenizer_name" not in config.get("text_cfg", {}):
        return
    folder = next((p for p in paths if p and has_tokenizer_files(p)), None)
    if folder is not None:
        config["text_cfg"]["hf_tokenizer_name"] = str(Path(folder).resolve())


def load(name_or_path: str, pretrained: str | None = None, device: str = "cpu", quick_gelu: bool | None = None,
         trust_pickle: bool = False, force_image_size: int | None = None):
    """Return ``(model, preprocess, tokenizer)`` with the model in eval mode.

    ``name_or_path``: a zoo name (``clipforge.list_models()``), ``hf-hub:OWNER/NAME`` (an open_clip or transformers
    CLIP repo on the Hugging Face Hub, as open_clip spells it), or a checkpoint: an OpenAI ``.pt``, an open_clip
    state dict, a Hugging Face ``CLIPModel`` folder, or a clipforge folder/safetensors file (architecture read from
    its config, or inferred from the weights). ``pretrained``: a tag (``clipforge.list_pretrained(name)``), downloaded
    into the cache and verified, or a checkpoint path loaded into the named architecture. ``quick_gelu`` overrides the
    activation (OpenAI's weights use QuickGELU; it cannot be read from the weights). ``trust_pickle`` allows full
    unpickling of ``.pt``/``.bin`` files: only for files you trust. ``force_image_size``: the model at another image
    size than its weights', their position grid resized as open_clip's ``force_image_size`` resizes it, and the
    preprocessing at that size (a model trained on random crops often reads larger images better, FixRes;
    docs/BENCHMARKS.md).
    """
    from .environment import device_problem
    from .models import is_naflex
    from .preprocess import preprocess_for
    from .tokenizer import get_tokenizer

    problem = device_problem(device) if isinstance(device, str) else None
    if problem:  # before the weights load: torch would say so only when moving them, in its own words
        raise ValueError(f"device {device!r}: {problem}")
    overrides = None
    if force_image_size is not None:
        if not (isinstance(force_image_size, int) and force_image_size > 0):
            raise ValueError(f"force_image_size {force_image_size!r}: expected a whole number of pixels above 0")
        overrides = {"vision_cfg": {"image_size": force_image_size}}
    model = load_model(name_or_path, pretrained, quick_gelu, trust_pickle, overrides=overrides).to(device)
    if force_image_size is not None and is_naflex(model.config):
        raise ValueError("force_image_size: a SigLIP 2 NaFlex model takes each image at its own size and aspect "
                         "ratio; its --max-patches sets how finely")
    return model, preprocess_for(model), get_tokenizer(model.config)


def read_model_config(name_or_path: str) -> dict:
    """The config ``load(name_or_path)`` builds, reading a checkpoint's weights only where nothing else names its
    architecture: a zoo name's, an ``hf-hub:`` repo's (its JSON files alone), or a checkpoint folder's (``local-dir:``
    as open_clip spells one). What ``get_tokenizer`` reads for a name that is not in the zoo."""
    from .checkpoint import read_config
    from .models import get_model_config

    if name_or_path.startswith("local-dir:"):
        name_or_path = name_or_path[len("local-dir:"):]
    if name_or_path.startswith("hf-hub:"):
        from .pretrained import hub_config

        return hub_config(name_or_path[len("hf-hub:"):])[0]
    if not _looks_like_path(name_or_path):
        return get_model_config(name_or_path)
    config = read_config(name_or_path)
    if config is None:
        return read_model_weights(name_or_path)[0]
    _use_tokenizer_beside_weights(config, name_or_path)
    return config


def zero_shot_classifier(*args, **kwargs):
    from .zeroshot import zero_shot_classifier as build

    return build(*args, **kwargs)
