"""The implementations compared: clipforge's model, and the same architecture and weights in open_clip or
transformers (None when the peer is not installed or has no such architecture)."""
from __future__ import annotations

from ..checkpoint import clipforge_config_to_hf, clipforge_to_hf, clipforge_to_openai
from ..models import create_model, get_model_config, is_resnet

IMPLEMENTATIONS = ("clipforge", "open_clip", "transformers")


def build(name: str):
    """clipforge's randomly initialised zoo model, carrying its config."""
    model = create_model(name)
    model.config = get_model_config(name)
    return model


def peer(impl: str, ours):
    """``ours`` (a clipforge model with ``.config``) as ``impl`` builds it, with the same weights."""
    if impl == "clipforge":
        return ours
    if impl == "open_clip":
        try:
            from open_clip.model import CLIP
        except ImportError:
            return None
        cfg = ours.config
        model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                     quick_gelu=cfg.get("quick_gelu", False))
        model.load_state_dict(clipforge_to_openai(ours.state_dict()))
        return model
    if impl == "transformers":
        if is_resnet(ours.config):
            return None  # transformers' CLIPModel has no ResNet image tower
        try:
            import transformers
        except ImportError:
            return None
        hf_cfg = clipforge_config_to_hf(ours.config, ours.logit_scale.item())
        config = transformers.CLIPConfig(text_config=hf_cfg["text_config"], vision_config=hf_cfg["vision_config"],
                                         projection_dim=hf_cfg["projection_dim"])
        model = transformers.CLIPModel(config)
        model.load_state_dict(clipforge_to_hf(ours.state_dict()), strict=False)
        return model
    raise ValueError(f"unknown implementation {impl!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
