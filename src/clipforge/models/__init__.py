"""The model zoo: JSON configs in ``configs/`` (one file per architecture) and the factory that builds them."""
from __future__ import annotations

import copy
import difflib
import json
from functools import lru_cache
from importlib import resources

from .clip import CLIP, CLIPOutput, is_convnext, is_eva, is_fastvit, is_naflex, is_resnet, is_siglip, tower_kind

CustomTextCLIP = CLIP  # open_clip's text-under-``text.`` layout is clipforge's own (both load either way)

__all__ = ["CLIP", "CLIPOutput", "is_resnet", "is_convnext", "is_eva", "is_fastvit", "tower_kind", "is_siglip", "is_naflex", "merge_config", "list_models", "get_model_config", "create_model", "register_model_config",
           "UnknownModelError"]

_EXTRA_CONFIGS: dict[str, dict] = {}


class UnknownModelError(ValueError):
    """Raised for a model name that is not in the zoo; the message lists the closest names."""


@lru_cache(maxsize=None)
def _builtin_configs() -> dict[str, dict]:
    folder = resources.files(__package__) / "configs"
    return {
        entry.name[: -len(".json")]: json.loads(entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".json")
    }


def list_models() -> list[str]:
    """Names of every architecture in the zoo, sorted."""
    return sorted({**_builtin_configs(), **_EXTRA_CONFIGS}, key=str.lower)


def register_model_config(name: str, config: dict) -> None:
    """Add an architecture to the zoo for this process (e.g. one read from a checkpoint's config.json)."""
    _EXTRA_CONFIGS[name] = copy.deepcopy(config)


def get_model_config(name: str) -> dict:
    """A copy of the named config. Unknown names raise ``UnknownModelError`` with close matches."""
    from ..pretrained import QUICKGELU_SUFFIX

    configs = {**_builtin_configs(), **_EXTRA_CONFIGS}
    # OpenAI spells the ViTs with slashes ("ViT-B/32"); accept both spellings.
    key = name.replace("/", "-")
    if key not in configs and key.lower().endswith(QUICKGELU_SUFFIX) and len(key) > len(QUICKGELU_SUFFIX):
        config = get_model_config(key[:-len(QUICKGELU_SUFFIX)])  # open_clip's NAME-quickgelu: NAME with QuickGELU
        config["quick_gelu"] = True
        return config
    if key not in configs:
        lowered = {k.lower(): k for k in configs}
        if key.lower() in lowered:
            key = lowered[key.lower()]
        else:
            close = difflib.get_close_matches(key, list(configs), n=5, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownModelError(
                f"unknown model {name!r}.{hint} `clipforge.list_models()` lists all {len(configs)} models."
            )
    return copy.deepcopy(configs[key])


def is_model_name(name: str) -> bool:
    """Whether ``get_model_config`` knows ``name`` (its spellings too: OpenAI's "ViT-B/32", ``NAME-quickgelu``)."""
    try:
        get_model_config(name)
    except UnknownModelError:
        return False
    return True


def merge_config(base: dict, overrides: dict) -> dict:
    """``base`` updated with ``overrides``, nested dicts key by key (in place; returns ``base``)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = value
    return base


def create_model(name_or_config: str | dict, **overrides) -> CLIP:
    """Build a randomly initialised CLIP from a zoo name or a config dict.

    Keyword overrides are merged into the config, nested dicts key by key, e.g.
    ``create_model("ViT-B-32", quick_gelu=True, vision_cfg={"patch_dropout": 0.5})``.
    """
    if isinstance(name_or_config, dict):
        config = copy.deepcopy(name_or_config)
    else:
        config = get_model_config(name_or_config)
    config = merge_config(config, overrides)
    known = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
             "logit_scale_max", "multimodal_cfg"}
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; expected some of {sorted(known)}")
    if "multimodal_cfg" in config:  # a captioning decoder beside the towers
        from .coca import CoCa

        model = CoCa(**config)
    else:
        model = CLIP(**config)
    model.config = config  # what saving, converting and exporting write beside the weights
    return model
