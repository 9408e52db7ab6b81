"""open_clip's MobileCLIP-S models (MobileCLIP-S1/S2, MobileCLIP2-S0/S2/S3/S4): a timm FastViT "MCi" image tower
named by ``timm_model_name`` (average pooled, timm's own linear head the projection) beside open_clip's own text tower
(bidirectional). clipforge's ``models.fastvit`` keeps timm's module names, so the weights need no renaming and only
the config is translated (``TIMM_FASTVIT`` spells out each timm model; the parity tests compare it with timm)."""
from __future__ import annotations

from .errors import CheckpointError

_MCI = {"mixers": ["repmixer", "repmixer", "repmixer", "attention"], "mlp_ratio": 3.0,
        "se_downsample": [False, False, True, True], "norm": "batch", "stem_scale_branch": True}
_MCI_LARGE = {"mixers": ["repmixer", "repmixer", "repmixer", "attention", "attention"], "mlp_ratio": 4.0,
              "se_downsample": [False] * 5, "norm": "layer", "stem_scale_branch": False}
# timm model -> blocks per stage, channels per stage, and the rest of its settings
TIMM_FASTVIT = {
    "fastvit_mci0": {"depths": [2, 6, 10, 2], "dims": [64, 128, 256, 512], **_MCI},
    "fastvit_mci1": {"depths": [4, 12, 20, 4], "dims": [64, 128, 256, 512], **_MCI},
    "fastvit_mci2": {"depths": [4, 12, 24, 4], "dims": [80, 160, 320, 640], **_MCI},
    "fastvit_mci3": {"depths": [2, 12, 24, 4, 2], "dims": [96, 192, 384, 768, 1536], **_MCI_LARGE},
    "fastvit_mci4": {"depths": [2, 12, 24, 4, 4], "dims": [128, 256, 512, 1024, 2048], **_MCI_LARGE},
}


def is_open_clip_fastvit(model_cfg: dict) -> bool:
    return model_cfg.get("vision_cfg", {}).get("timm_model_name", "").startswith("fastvit")


def tower_config(timm_model_name: str, image_size: int = 256) -> dict:
    """clipforge's ``vision_cfg`` for a timm FastViT tower."""
    if timm_model_name not in TIMM_FASTVIT:
        raise CheckpointError(f"timm image tower {timm_model_name!r} is not built here; clipforge builds the "
                              f"MobileCLIP towers {', '.join(TIMM_FASTVIT)}")
    return {"tower": "fastvit", "image_size": image_size, **TIMM_FASTVIT[timm_model_name]}


def config_from_open_clip(model_cfg: dict) -> dict:
    """clipforge's config for an open_clip MobileCLIP ``model_cfg``; another pooling or projection is refused."""
    from .openai import text_cfg_from_open_clip, top_level_settings

    vision = model_cfg["vision_cfg"]
    if vision.get("timm_pool", "avg") != "avg" or vision.get("timm_proj") not in (None, "none", ""):
        raise CheckpointError(f"open_clip FastViT tower with pool {vision.get('timm_pool')!r} and projection "
                              f"{vision.get('timm_proj')!r} is not built here (average pool, timm's own head)")
    config = top_level_settings(model_cfg)
    config["vision_cfg"] = tower_config(vision["timm_model_name"], vision.get("image_size", 256))
    config["text_cfg"] = text_cfg_from_open_clip(model_cfg["text_cfg"], "open_clip MobileCLIP config")
    return config


def config_to_open_clip(config: dict) -> dict:
    """open_clip's ``model_cfg`` for a clipforge FastViT config (the inverse of ``config_from_open_clip``)."""
    from .openai import text_cfg_to_open_clip

    vision = config["vision_cfg"]
    timm_name = next((name for name in TIMM_FASTVIT
                      if tower_config(name, vision["image_size"]) == vision), None)
    if timm_name is None:
        raise CheckpointError("open_clip builds FastViT image towers from timm, which has none of this shape; keep it "
                              "as a clipforge folder")
    out = {k: v for k, v in config.items() if k not in ("vision_cfg", "text_cfg")}
    out.update(custom_text=True, vision_cfg={"image_size": vision["image_size"], "timm_model_name": timm_name,
                                              "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": None},
               text_cfg=text_cfg_to_open_clip(config["text_cfg"], config.get("quick_gelu", False)))
    return out
