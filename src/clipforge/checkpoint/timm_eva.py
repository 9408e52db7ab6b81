"""open_clip's EVA-CLIP, PE-Core, MobileCLIP ViT and ViTamin models: a timm ``Eva`` or ``VisionTransformer`` image tower
named by ``timm_model_name`` (class-token, mean or latent-attention pooled; its head the projection, or open_clip's
linear one after it) beside open_clip's own text tower. clipforge's ``models.eva`` keeps timm's module names, so the
weights need no renaming and only the config is translated (``TIMM_EVA`` spells out each timm model; the parity tests
compare it with timm itself)."""
from __future__ import annotations

from .errors import CheckpointError
from .infer import mlp_ratio

# the block and pooling kinds (models/eva.py)
_PE = {"mlp": "gelu", "fused_qkv": True, "inner_norm": False, "post_norm": False, "key_bias": True,
       "rope_offset": 1.0, "rope_indexing": "xy", "class_token": True, "norm_pre": True, "pool": "map",
       "pool_heads": 8, "norm_eps": 1e-5}
EVA_KINDS = {
    "eva01": {"mlp": "gelu", "fused_qkv": True, "inner_norm": False, "post_norm": False, "norm_eps": 1e-6},
    "eva02": {"mlp": "swiglu", "fused_qkv": False, "inner_norm": True, "post_norm": False, "norm_eps": 1e-6},
    "eva02_post_norm": {"mlp": "gelu", "fused_qkv": True, "inner_norm": False, "post_norm": True, "norm_eps": 1e-6},
    "pe": _PE,
    "pe_no_class_token": {**_PE, "class_token": False, "rope_offset": 0.0},
    # timm's plain VisionTransformer: MobileCLIP-B's (a convolutional stem, no position for the class token) and a
    # CLIP-style ViT (a LayerNorm before the blocks) for MobileCLIP2-L-14
    "vit_mci": {"mlp": "gelu", "fused_qkv": True, "inner_norm": False, "post_norm": False, "key_bias": True,
                "stem": "mci", "class_position": False, "norm_eps": 1e-6},
    "vit_clip": {"mlp": "gelu", "fused_qkv": True, "inner_norm": False, "post_norm": False, "key_bias": True,
                 "norm_pre": True, "norm_eps": 1e-5},
}
# ViTamin: timm's VisionTransformer over a convolutional backbone (its two stages' widths), GeGLU MLPs, mean-pooled
# tokens, open_clip's own linear projection; XL has no learned positions
_VITAMIN = {"mlp": "geglu", "fused_qkv": True, "inner_norm": False, "post_norm": False, "key_bias": True,
            "stem": "vitamin", "class_token": False, "pool": "avg", "proj": "linear", "norm_eps": 1e-6}
EVA_KINDS.update({
    "vitamin_s": {**_VITAMIN, "stem_dims": [64, 128]},
    "vitamin_b": {**_VITAMIN, "stem_dims": [128, 256]},
    "vitamin_l": {**_VITAMIN, "stem_dims": [160, 320]},
    "vitamin_xl": {**_VITAMIN, "stem_dims": [192, 384], "pos_embed": False},
})
# timm model -> (patch size, image size, width, layers, heads, MLP hidden, kind, rotary reference grid)
TIMM_EVA = {
    "eva_giant_patch14_224": (14, 224, 1408, 40, 16, 6144, "eva01", None),
    "eva02_base_patch16_clip_224": (16, 224, 768, 12, 12, 2048, "eva02", 16),
    "eva02_large_patch14_clip_224": (14, 224, 1024, 24, 16, 2730, "eva02", 16),
    "eva02_large_patch14_clip_336": (14, 336, 1024, 24, 16, 2730, "eva02", 16),
    "eva02_enormous_patch14_clip_224": (14, 224, 1792, 64, 16, 15360, "eva02_post_norm", None),
    "vit_pe_core_tiny_patch16_384": (16, 384, 192, 12, 3, 768, "pe", 24),
    "vit_pe_core_small_patch16_384": (16, 384, 384, 12, 6, 1536, "pe", 24),
    "vit_pe_core_base_patch16_224": (16, 224, 768, 12, 12, 3072, "pe", 14),
    "vit_pe_core_large_patch14_336": (14, 336, 1024, 24, 16, 4096, "pe", 24),
    "vit_pe_core_gigantic_patch14_448": (14, 448, 1536, 50, 16, 8960, "pe_no_class_token", 32),
    "vit_base_mci_224": (16, 224, 768, 12, 12, 3072, "vit_mci", None),
    "vit_large_patch14_clip_224": (14, 224, 1024, 24, 16, 4096, "vit_clip", None),
    "vitamin_small_224": (16, 224, 384, 14, 6, 768, "vitamin_s", None),
    "vitamin_base_224": (16, 224, 768, 14, 12, 1536, "vitamin_b", None),
    **{f"vitamin_large{two}_{size}": (16, size, 1024, 31, 16, 2048, "vitamin_l", None)
       for two in ("", "2") for size in (224, 256, 336, 384)},  # L2 is L's tower (beside a larger text tower)
    **{f"vitamin_xlarge_{size}": (16, size, 1152, 32, 16, 2304, "vitamin_xl", None) for size in (256, 336, 384)},
}


def is_open_clip_eva(model_cfg: dict) -> bool:
    return model_cfg.get("vision_cfg", {}).get("timm_model_name") in TIMM_EVA


def tower_config(timm_model_name: str, image_size: int | None = None) -> dict:
    """clipforge's ``vision_cfg`` for a timm EVA tower."""
    if timm_model_name not in TIMM_EVA:
        raise CheckpointError(f"timm image tower {timm_model_name!r} is not built here; clipforge builds the EVA-CLIP "
                              f"towers {', '.join(TIMM_EVA)}")
    patch, size, width, layers, heads, hidden, kind, rope_grid = TIMM_EVA[timm_model_name]
    return {"tower": "eva", "image_size": image_size or size, "patch_size": patch, "width": width, "layers": layers,
            "heads": heads, "mlp_ratio": mlp_ratio(hidden, width), **EVA_KINDS[kind], "rope_grid": rope_grid}


def config_from_open_clip(model_cfg: dict) -> dict:
    """clipforge's config for an open_clip EVA ``model_cfg``; another pooling or projection is refused by name."""
    from .openai import text_cfg_from_open_clip, top_level_settings

    vision = model_cfg["vision_cfg"]
    tower = tower_config(vision["timm_model_name"])
    pool, proj = tower.get("pool", "token"), tower.get("proj")
    pools = (pool, "") if proj else (pool,)  # "": the network's own pooling, kept when open_clip adds a projection
    projections = (proj,) if proj else (None, "none", "")
    if vision.get("timm_pool", pool) not in pools or vision.get("timm_proj") not in projections \
            or vision.get("timm_proj_bias"):
        head = "an unbiased linear projection" if proj else "timm's own head"
        raise CheckpointError(f"open_clip EVA tower with pool {vision.get('timm_pool')!r} and projection "
                              f"{vision.get('timm_proj')!r} is not built here ({pool} pooling, {head})")
    config = top_level_settings(model_cfg)
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
                                              "timm_model_pretrained": False,
                                              "timm_pool": "" if vision.get("proj") else vision.get("pool", "token"),
                                              "timm_proj": vision.get("proj")},
               text_cfg=text_cfg_to_open_clip(config["text_cfg"], config.get("quick_gelu", False)))
    return out
