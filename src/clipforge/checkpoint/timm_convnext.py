"""open_clip's ConvNeXt models (LAION's): a timm ConvNeXt image tower named by ``timm_model_name``; clipforge's
``models.convnext`` keeps timm's and open_clip's module names, so the weights need no renaming and only the config
is translated (``TIMM_CONVNEXT`` spells out each timm model; the parity tests compare it with timm itself)."""
from __future__ import annotations

from .errors import CheckpointError

# timm model -> (blocks per stage, channels per stage, LayerNorm eps)
TIMM_CONVNEXT = {
    "convnext_tiny": ([3, 3, 9, 3], [96, 192, 384, 768], 1e-6),
    "convnext_small": ([3, 3, 27, 3], [96, 192, 384, 768], 1e-6),
    "convnext_base": ([3, 3, 27, 3], [128, 256, 512, 1024], 1e-6),
    "convnext_large": ([3, 3, 27, 3], [192, 384, 768, 1536], 1e-6),
    "convnext_xlarge": ([3, 3, 27, 3], [256, 512, 1024, 2048], 1e-6),
    "convnext_xxlarge": ([3, 4, 30, 3], [384, 768, 1536, 3072], 1e-5),
}


def is_open_clip_convnext(model_cfg: dict) -> bool:
    return model_cfg.get("vision_cfg", {}).get("timm_model_name", "").startswith("convnext")


def config_from_open_clip(model_cfg: dict) -> dict:
    """clipforge's config for an open_clip ConvNeXt ``model_cfg`` (its text tower is CLIP's own)."""
    vision = model_cfg["vision_cfg"]
    name = vision["timm_model_name"]
    if name not in TIMM_CONVNEXT:
        raise CheckpointError(f"timm image tower {name!r} is not built here; clipforge builds {', '.join(TIMM_CONVNEXT)}")
    if vision.get("timm_pool", "") not in ("", "avg") or vision.get("timm_proj", "linear") not in ("linear", "mlp") \
            or vision.get("timm_proj_bias"):
        raise CheckpointError(f"open_clip ConvNeXt with pool {vision.get('timm_pool')!r} and projection "
                              f"{vision.get('timm_proj')!r} is not built here (average pool; linear or mlp)")
    from .openai import text_cfg_from_open_clip, top_level_settings

    depths, dims, eps = TIMM_CONVNEXT[name]
    config = top_level_settings(model_cfg)
    config["vision_cfg"] = {"image_size": vision.get("image_size", 224), "depths": depths, "dims": dims,
                            "norm_eps": eps, "proj": vision.get("timm_proj", "linear")}
    config["text_cfg"] = text_cfg_from_open_clip(model_cfg["text_cfg"], "open_clip ConvNeXt config")
    return config


def config_to_open_clip(config: dict) -> dict:
    """open_clip's ``model_cfg`` for a clipforge ConvNeXt config (the inverse of ``config_from_open_clip``)."""
    vision = config["vision_cfg"]
    shape = (list(vision["depths"]), list(vision["dims"]), vision.get("norm_eps", 1e-6))
    name = next((n for n, built in TIMM_CONVNEXT.items() if list(built) == list(shape)), None)
    if name is None:
        raise CheckpointError("open_clip builds ConvNeXt towers from timm, which has none of this shape; keep it as a "
                              "clipforge folder")
    from .openai import text_cfg_to_open_clip

    out = {k: v for k, v in config.items() if k != "vision_cfg"}
    out["vision_cfg"] = {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": "",
                         "timm_proj": vision.get("proj", "linear"), "image_size": vision["image_size"]}
    out["text_cfg"] = text_cfg_to_open_clip(config["text_cfg"], config.get("quick_gelu", False))
    return out
