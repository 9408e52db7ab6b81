"""open_clip's SigLIP models: a timm ViT image tower (``visual.trunk.*``, attention pooling) beside open_clip's own
text tower (``text.*``, clipforge's names already); its key layout and its ``model_cfg``, to clipforge's.

timm names the tower's architecture (``timm_model_name``) where clipforge's configs spell it out: ``TIMM_SIGLIP``
holds the shapes and activation of every timm SigLIP tower with attention pooling (the parity tests compare it with
timm itself).
"""
from __future__ import annotations

import torch

from .errors import CheckpointError
from .infer import mlp_ratio

# timm model -> (patch size, image size, width, layers, heads, MLP hidden, activation)
TIMM_SIGLIP = {
    "vit_base_patch16_siglip_224": (16, 224, 768, 12, 12, 3072, "gelu"),
    "vit_base_patch16_siglip_256": (16, 256, 768, 12, 12, 3072, "gelu"),
    "vit_base_patch16_siglip_384": (16, 384, 768, 12, 12, 3072, "gelu"),
    "vit_base_patch16_siglip_512": (16, 512, 768, 12, 12, 3072, "gelu"),
    "vit_base_patch32_siglip_256": (32, 256, 768, 12, 12, 3072, "gelu_tanh"),
    "vit_giantopt_patch16_siglip_256": (16, 256, 1536, 40, 16, 6144, "gelu_tanh"),
    "vit_giantopt_patch16_siglip_384": (16, 384, 1536, 40, 16, 6144, "gelu_tanh"),
    "vit_large_patch16_siglip_256": (16, 256, 1024, 24, 16, 4096, "gelu"),
    "vit_large_patch16_siglip_384": (16, 384, 1024, 24, 16, 4096, "gelu"),
    "vit_large_patch16_siglip_512": (16, 512, 1024, 24, 16, 4096, "gelu_tanh"),
    "vit_so400m_patch14_siglip_224": (14, 224, 1152, 27, 16, 4304, "gelu"),
    "vit_so400m_patch14_siglip_378": (14, 378, 1152, 27, 16, 4304, "gelu"),
    "vit_so400m_patch14_siglip_384": (14, 384, 1152, 27, 16, 4304, "gelu"),
    "vit_so400m_patch16_siglip_256": (16, 256, 1152, 27, 16, 4304, "gelu_tanh"),
    "vit_so400m_patch16_siglip_384": (16, 384, 1152, 27, 16, 4304, "gelu_tanh"),
    "vit_so400m_patch16_siglip_512": (16, 512, 1152, 27, 16, 4304, "gelu_tanh"),
}
TRUNK = "visual.trunk."
_BLOCK = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight",
          "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
          "mlp.fc2": "mlp.c_proj"}
_TOP = {"patch_embed.proj": "conv1", "norm": "ln_post", "attn_pool.proj": "head.attn.out_proj",
        "attn_pool.norm": "head.ln", "attn_pool.mlp.fc1": "head.mlp.c_fc", "attn_pool.mlp.fc2": "head.mlp.c_proj"}


def matches(state: dict) -> bool:
    """A timm SigLIP tower (attention pooling, no LayerNorm before the blocks: PE's towers have one and keep their
    names in clipforge, as open_clip's ConvNeXt and EVA trunks do)."""
    return any(k.startswith(TRUNK + "attn_pool.") for k in state) and TRUNK + "norm_pre.weight" not in state


def _renamed(rest: str, table: dict, key: str) -> str:
    for name, renamed in table.items():
        if rest == name or rest.startswith(name + "."):
            return renamed + rest[len(name):]
    raise CheckpointError(f"unexpected key {key!r} for a timm SigLIP image tower (clipforge builds attention-pooled "
                          "SigLIP towers without extra tokens)")


def to_clipforge(state: dict) -> dict:
    out, pool_qkv = {}, {}
    for key, value in state.items():
        if not key.startswith(TRUNK):
            out[key] = value  # the text tower, logit_scale, logit_bias: clipforge's names already
            continue
        rest = key[len(TRUNK):]
        if rest == "pos_embed":
            out["visual.positional_embedding"] = value.reshape(value.shape[-2], value.shape[-1])
        elif rest == "attn_pool.latent":
            out["visual.head.probe"] = value
        elif rest.startswith(("attn_pool.q.", "attn_pool.kv.")):
            part, kind = rest.split(".")[1:]
            pool_qkv[(part, kind)] = value
        elif rest.startswith("blocks."):
            index, inner = rest[len("blocks."):].split(".", 1)
            out[f"visual.transformer.resblocks.{index}.{_renamed(inner, _BLOCK, key)}"] = value
        else:
            out["visual." + _renamed(rest, _TOP, key)] = value
    for kind in ("weight", "bias"):
        if ("q", kind) in pool_qkv:
            out[f"visual.head.attn.in_proj_{kind}"] = torch.cat([pool_qkv[("q", kind)], pool_qkv[("kv", kind)]])
    return out


def from_clipforge(state: dict) -> dict:
    """open_clip's layout for a clipforge SigLIP state dict (the inverse of ``to_clipforge``)."""
    block_inv, top_inv = ({v: k for k, v in table.items()} for table in (_BLOCK, _TOP))
    out = {}
    for key, value in state.items():
        if not key.startswith("visual."):
            out[key] = value
            continue
        rest = key[len("visual."):]
        if rest == "positional_embedding":
            out[TRUNK + "pos_embed"] = value[None]
        elif rest == "head.probe":
            out[TRUNK + "attn_pool.latent"] = value
        elif rest.startswith("head.attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]
            width = value.shape[0] // 3
            out[f"{TRUNK}attn_pool.q.{kind}"], out[f"{TRUNK}attn_pool.kv.{kind}"] = value[:width], value[width:]
        elif rest.startswith("transformer.resblocks."):
            index, inner = rest[len("transformer.resblocks."):].split(".", 1)
            out[f"{TRUNK}blocks.{index}.{_renamed(inner, block_inv, key)}"] = value
        else:
            out[TRUNK + _renamed(rest, top_inv, key)] = value
    return out


def config_to_open_clip(config: dict) -> dict:
    """open_clip's ``model_cfg`` for a clipforge SigLIP config: its image tower named by the timm model of the same
    shapes and activation (the inverse of ``config_from_open_clip``)."""
    from .openai import text_cfg_to_open_clip

    vision, text = config["vision_cfg"], config["text_cfg"]
    if vision.get("naflex"):
        raise CheckpointError("open_clip has no NaFlex image tower (SigLIP 2's, for images at their own aspect "
                              "ratio); write --to hf (a Siglip2Model folder) or clipforge")
    fits = [name for name in TIMM_SIGLIP if {**tower_config(name), "image_size": vision["image_size"]} == vision]
    # timm's model for this resolution where it has one (open_clip's choice), else one open_clip resizes
    timm_name = next((n for n in fits if TIMM_SIGLIP[n][1] == vision["image_size"]), fits[0] if fits else None)
    if timm_name is None:
        raise CheckpointError("open_clip builds SigLIP image towers from timm, which has none of this shape and "
                              "activation; keep it as a clipforge or Hugging Face folder")
    if "hf_model_name" in text:
        text_cfg = text_cfg_to_open_clip(text)
    elif text.get("pool") != "last" or text.get("causal", True) or text.get("act") == "quick_gelu":
        raise CheckpointError("this text tower is not one open_clip's SigLIP settings build")
    else:
        text_cfg = {"mlp_ratio": 4.0, "norm_kwargs": {"eps": text.get("norm_eps", 1e-5)}, "tokenizer_kwargs": {},
                    **text_cfg_to_open_clip(text)}
    out = {"embed_dim": config["embed_dim"], "custom_text": True,
           "vision_cfg": {"image_size": vision["image_size"], "timm_model_name": timm_name,
                          "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
           "text_cfg": text_cfg}
    for key in ("init_logit_bias", "init_logit_scale"):
        if key in config:
            out[key] = config[key]
    return out


def tower_config(timm_model_name: str, image_size: int | None = None) -> dict:
    """clipforge's ``vision_cfg`` for a timm SigLIP tower (``image_size``: open_clip's, where it overrides timm's)."""
    if timm_model_name not in TIMM_SIGLIP:
        raise CheckpointError(f"timm image tower {timm_model_name!r} is not built here; clipforge builds the "
                              f"attention-pooled SigLIP towers: {', '.join(TIMM_SIGLIP)}")
    patch, size, width, layers, heads, hidden, act = TIMM_SIGLIP[timm_model_name]
    return {"image_size": image_size or size, "patch_size": patch, "width": width, "layers": layers,
            "head_width": width // heads, "mlp_ratio": mlp_ratio(hidden, width), "pool": "map", "act": act,
            "norm_eps": 1e-6}


def is_open_clip_siglip(model_cfg: dict) -> bool:
    return "siglip" in model_cfg.get("vision_cfg", {}).get("timm_model_name", "")


def config_from_open_clip(model_cfg: dict) -> dict:
    """clipforge's config for an open_clip SigLIP ``model_cfg`` (timm image tower, open_clip's text tower without a
    causal mask, pooled at the last token, a projection with a bias); anything else in it is refused by name."""
    from .openai import text_cfg_from_open_clip

    vision, text = model_cfg["vision_cfg"], dict(model_cfg["text_cfg"])
    if vision.get("timm_pool", "map") != "map" or vision.get("timm_proj", "none") != "none":
        raise CheckpointError(f"open_clip timm tower with pool {vision.get('timm_pool')!r} and projection "
                              f"{vision.get('timm_proj')!r} is not built here (SigLIP's map / none are)")
    if "hf_model_name" in text:  # nllb-clip-siglip: a Hugging Face text encoder beside the SigLIP image tower
        text_cfg = text_cfg_from_open_clip(text, "open_clip SigLIP config")
    else:
        text_cfg = {"mlp_ratio": 4.0, "proj": "matrix", "act": "gelu", "norm_eps": 1e-5, "hf_tokenizer_name": None,
                    "tokenizer_kwargs": {}, **text_cfg_from_open_clip(text, "open_clip SigLIP config")}
        if text_cfg.get("pool") != "last" or text_cfg.get("causal", True):
            raise CheckpointError(f"open_clip text tower settings not built here: {text}")
    config = {"embed_dim": model_cfg["embed_dim"], "init_logit_bias": model_cfg.get("init_logit_bias", -10.0),
              "logit_scale_max": None,
              "vision_cfg": tower_config(vision["timm_model_name"], vision.get("image_size")), "text_cfg": text_cfg}
    if "init_logit_scale" in model_cfg:
        config["init_logit_scale"] = model_cfg["init_logit_scale"]
    return config
