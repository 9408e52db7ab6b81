"""open_clip's EVA-CLIP models: a timm ``Eva`` image tower named by ``timm_model_name`` (class-token pooled, its head
the projection) beside open_clip's own text tower. clipforge's ``models.eva`` keeps timm's module names, so the
weights need no renaming and only the config is translated (``TIMM_EVA`` spells out each timm model; the parity tests
compare it with timm itself)."""
from __future__ import annotations

from .errors import CheckpointError
from .infer import mlp_ratio

# the three block kinds (models/eva.py)
EVA_KINDS = {
    "eva01": {"mlp": "gelu", "fused_qkv": True, "inner_norm": False, "post_norm": False, "rope_grid": None},
    "eva02": {"mlp": "swiglu", "fused_qkv": False, "inner_norm": True, "post_norm": False, "rope_grid": 16},
    "eva02_post_norm": {"mlp": "gelu", "fused_qkv": True, "inner_norm": False, "post_norm": True, "rope_grid": None},
}
# timm model -> (patch size, image size, width, layers, heads, MLP hidden, kind)
TIMM_EVA = {
    "eva_giant_patch14_224": (14, 224, 1408, 40, 16, 6144, "eva01"),
    "eva02_base_patch16_clip_224": (16, 224, 768, 12, 12, 2048, "eva02"),
    "eva02_large_patch14_clip_224": (14, 224, 1024, 24, 16, 2730, "eva02"),
    "eva02_large_patch14_clip_336": (14, 336, 1024, 24, 16, 2730, "eva02"),
    "eva02_enormous_patch14_clip_224": (14, 224, 1792, 64, 16, 15360, "eva02_post_norm"),
}


def is_open_clip_eva(model_cfg: dict) -> bool:
    return model_cfg.get("vision_cfg", {}).get("timm_model_name", "").startswith("eva")


def tower_config(timm_model_name: str, image_size: int | None = None) -> dict:
    """clipforge's ``vision_cfg`` for a timm EVA tower."""
    if timm_model_name not in TIMM_EVA:
        raise CheckpointError(f"timm image tower {timm_model_name!r} is not built here; clipforge builds the EVA-CLIP "
                              f"towers {', '.join(TIMM_EVA)}")
    patch, size, width, layers, heads, hidden, kind = TIMM_EVA[timm_model_name]
    return {"tower": "eva", "image_size": image_size or size, "patch_size": patch, "width": width, "layers": layers,
            "heads": heads, "mlp_ratio": mlp_ratio(hidden, width), **EVA_KINDS[kind], "norm_eps": 1e-6}


def config_from_open_clip(model_cfg: dict) -> dict:
    """clipforge's config for an open_clip EVA ``model_cfg``; another pooling or projection is refused by name."""
    from .openai import OPEN_CLIP_TOP_KEYS, text_cfg_from_open_clip

    vision = model_cfg["vision_cfg"]
    if vision.get("timm_pool", "token") != "token" or vision.get("timm_proj") not in (None, "none", ""):
        raise CheckpointError(f"open_clip EVA tower with pool {vision.get('timm_pool')!r} and projection "
                              f"{vision.get('timm_proj')!r} is not built here (class token, timm's own head)")
    config = {k: v for k, v in model_cfg.items() if k in OPEN_CLIP_TOP_KEYS - {"custom_text", "vision_cfg",
                                                                               "text_cfg"}}
    config["vision_cfg"] = tower_config(vision["timm_model_name"], vision.get("image_size"))
    config["text_cfg"] = text_cfg_from_open_clip(model_cfg["text_cfg"], "open_clip EVA config")
    return config


def config_to_open_clip(config: dict) -> dict:
    """open_clip's ``model_cfg`` for a clipforge EVA config (the inverse of ``config_from_open_clip``)."""
    from .openai import text_cfg_to_open_clip

    vision = config["vision_cfg"]
    fits = [name for name in TIMM_EVA if {**tower_config(name), "image_size": vision["image_size"]} == vision]
    timm_name = next((n for n in fits if TIMM_EVA[n][1] == vision["image_size"]), fits[0] if fits else None)
    if timm_name is None:
        raise CheckpointError("open_clip builds EVA image towers from timm, which has none of this shape; keep it as "
                              "a clipforge folder")
    out = {k: v for k, v in config.items() if k not in ("vision_cfg", "text_cfg")}
    out.update(custom_text=True, vision_cfg={"image_size": vision["image_size"], "timm_model_name": timm_name,
                                              "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
               text_cfg=text_cfg_to_open_clip(config["text_cfg"], config.get("quick_gelu", False)))
    return out
