"""Hugging Face ``CLIPModel``, ``SiglipModel`` (SigLIP, and SigLIP 2 at a fixed resolution) and ``Siglip2Model``
(SigLIP 2's NaFlex towers: a linear patch embedding over flattened patches): their key layout and config, to and from
clipforge's.

Each table maps Hugging Face names to clipforge's once; the reverse direction uses the same tables inverted.
Hugging Face splits attention into q/k/v projections where clipforge (like OpenAI) keeps one fused ``in_proj``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .errors import CheckpointError
from .infer import mlp_ratio

_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
          "self_attn.out_proj": "attn.out_proj"}
_TOP = {
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
# SigLIP's: a patch bias, the attention-pooling head, a text projection with a bias (a Linear: not transposed)
_SIGLIP_TOP = {
    "vision_model.embeddings.patch_embedding.bias": "visual.conv1.bias",
    "vision_model.head.probe": "visual.head.probe",
    "text_model.head.weight": "text.text_projection.weight",
    "text_model.head.bias": "text.text_projection.bias",
    "logit_bias": "logit_bias",
    **{f"vision_model.head.{hf}.{kind}": f"visual.head.{ours}.{kind}" for kind in ("weight", "bias")
       for hf, ours in (("attention.out_proj", "attn.out_proj"), ("layernorm", "ln"), ("mlp.fc1", "mlp.c_fc"),
                        ("mlp.fc2", "mlp.c_proj"))},
    **{f"vision_model.head.attention.in_proj_{kind}": f"visual.head.attn.in_proj_{kind}" for kind in ("weight", "bias")},
}
_TOP.update(_SIGLIP_TOP)
_SCALARS = ("logit_scale", "logit_bias")  # shape [] in CLIPModel and clipforge, [1] in SiglipModel
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text.text_projection"}
_TOWERS = {"text_model.encoder.layers.": "text.transformer.resblocks.",
           "vision_model.encoder.layers.": "visual.transformer.resblocks."}


def _inverted(table: dict) -> dict:
    return {v: k for k, v in table.items()}


_TOP_INV, _TRANSPOSED_INV, _TOWERS_INV, _BLOCK_INV = map(_inverted, (_TOP, _TRANSPOSED, _TOWERS, _BLOCK))


def _rename_in_block(rest: str, table: dict, key: str) -> str:
    """``rest`` (a key inside one residual block) with its module prefix renamed through ``table``."""
    for name, renamed in table.items():
        if rest.startswith(name + "."):
            return renamed + rest[len(name):]
    raise CheckpointError(f"unexpected key {key!r} for a CLIP residual block")


def _split_block_key(key: str, towers: dict) -> tuple[str, str] | None:
    """``(renamed block prefix, rest)`` for a key inside a tower's residual block, else None."""
    prefix = next((p for p in towers if key.startswith(p)), None)
    if prefix is None:
        return None
    index, rest = key[len(prefix):].split(".", 1)
    return f"{towers[prefix]}{index}.", rest


def matches(state: dict) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in state)


NO_COCA = ("Hugging Face has no CoCa model class (a CLIPModel would drop the captioning decoder); write --to "
           "open_clip or clipforge")
CLIP_EOT = 49407  # the end-of-text id of OpenAI's vocabulary (its largest before any token is added)
MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model", "metaclip_2": "MetaClip2Model"}
_PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"


def is_clip_config(folder_config: dict) -> bool:
    """Whether a folder's ``config.json`` is a transformers ``CLIPModel``'s, ``SiglipModel``'s or
    ``MetaClip2Model``'s (CLIP's layout and keys, with its own tokenizer, pooled at its end-of-text id)."""
    return folder_config.get("model_type") in MODEL_TYPES or \
        bool(set(MODEL_TYPES.values()) & set(folder_config.get("architectures", [])))


def is_metaclip_2(folder_config: dict) -> bool:
    return folder_config.get("model_type") == "metaclip_2" or "MetaClip2Model" in folder_config.get("architectures", [])


def is_siglip(state_or_config: dict) -> bool:
    """A SigLIP model: a clipforge state dict with attention pooling, or a clipforge or HF config of one."""
    from ..models import is_siglip as is_siglip_config

    return "visual.head.probe" in state_or_config or state_or_config.get("model_type") in ("siglip", "siglip2") or \
        ("vision_cfg" in state_or_config and is_siglip_config(state_or_config))


def is_naflex(config: dict) -> bool:
    """A SigLIP 2 NaFlex model: a ``Siglip2Model`` config, or a clipforge config with a NaFlex image tower."""
    from ..models import is_naflex as is_naflex_config

    return config.get("model_type") == "siglip2" or "Siglip2Model" in config.get("architectures", []) or \
        ("vision_cfg" in config and is_naflex_config(config))


IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4's and 5's


def image_processor_config(files: dict) -> dict:
    """The image processor's settings among a folder's or repo's processor files (``{name: parsed JSON}``, a missing
    one absent): ``preprocessor_config.json`` as transformers 4 writes it, else transformers 5's
    ``processor_config.json``, which nests them under ``image_processor``; empty where neither has them."""
    if files.get(IMAGE_PROCESSOR_FILES[0]):
        return files[IMAGE_PROCESSOR_FILES[0]]
    return (files.get(IMAGE_PROCESSOR_FILES[1]) or {}).get("image_processor") or {}


def read_image_processor(folder: str | Path) -> dict:
    """``image_processor_config`` of a local folder."""
    folder = Path(folder)
    return image_processor_config({n: json.loads((folder / n).read_text(encoding="utf-8"))
                                   for n in IMAGE_PROCESSOR_FILES if (folder / n).is_file()})


def processor_preprocess(processor: dict) -> dict:
    """``Preprocess`` arguments from a ``CLIPImageProcessor`` config (``preprocessor_config.json``): its mean and std,
    bilinear for PIL's resample code 2, and "squash" for a resize to height x width without a center crop (as
    ``save_image_processor`` writes them; SigLIP's ``SiglipImageProcessor`` always squashes, and so, for a square
    image, does SigLIP 2's NaFlex processor: a plain image tensor goes in squashed to the tower's own grid)."""
    out = {k: tuple(processor[h]) for k, h in (("mean", "image_mean"), ("std", "image_std")) if processor.get(h)}
    if processor.get("resample") == 2:
        out["interpolation"] = "bilinear"
    size = processor.get("size")
    if str(processor.get("image_processor_type", "")).startswith("Siglip2ImageProcessor"):
        return {**out, "resize_mode": "squash"}
    crops = processor.get("do_center_crop", processor.get("image_processor_type") != "SiglipImageProcessor")
    if isinstance(size, dict) and "height" in size and "width" in size and not crops:
        out["resize_mode"] = "squash"
    return out


def to_clipforge(state: dict) -> dict:
    state = {k[len("clip."):] if k.startswith("clip.") else k: v for k, v in state.items()}
    out, qkv = {}, {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key == _PATCH_KEY and value.ndim == 2:  # Siglip2Model's linear one, over (row, column, channel) patches
            patch = math.isqrt(value.shape[1] // 3)
            out[_TOP[key]] = value.reshape(value.shape[0], patch, patch, 3).permute(0, 3, 1, 2).contiguous()
            continue
        if key in _TOP:
            out[_TOP[key]] = value.reshape(()) if key in _SCALARS else value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.T.contiguous()
            continue
        split = _split_block_key(key, _TOWERS)
        if split is None:
            raise CheckpointError(f"unexpected Hugging Face CLIP key {key!r}")
        base, rest = split
        if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            proj, kind = rest.split(".")[1:]
            qkv.setdefault((base, kind), {})[proj[0]] = value
        else:
            out[base + _rename_in_block(rest, _BLOCK, key)] = value
    for (base, kind), parts in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def from_clipforge(state: dict, naflex: bool = False) -> dict:
    """A ``CLIPModel`` state dict, or a ``SiglipModel``'s for a SigLIP model (``Siglip2Model``'s with ``naflex``)."""
    siglip = is_siglip(state)
    if any(k.startswith("text_decoder.") for k in state):
        raise CheckpointError(NO_COCA)
    if "visual.proj" not in state and not siglip:
        trunk = {k.split(".")[2] for k in state if k.startswith("visual.trunk.")}
        kind = "FastViT" if "final_conv" in trunk else "ConvNeXt" if "stages" in trunk else \
            "EVA" if "blocks" in trunk else "ResNet"
        raise CheckpointError(f"Hugging Face CLIPModel has no {kind} image tower; only ViT models export to HF")
    if "logit_bias" in state and not siglip:
        raise CheckpointError("Hugging Face CLIPModel has no logit_bias (a CLIP trained with the sigmoid loss has no "
                              "transformers class; keep it as clipforge or safetensors)")
    return keys_from_clipforge(state, siglip, naflex)


def keys_from_clipforge(state: dict, siglip: bool, naflex: bool = False) -> dict:
    """clipforge keys (``visual.`` / ``text.``, either tower or both) renamed and split as transformers names them
    (``from_clipforge`` after its checks; a tower saved alone, ``transformers_api``'s ``save_pretrained``)."""
    out = {}
    for key, value in state.items():
        if key in _TOP_INV:
            out[_TOP_INV[key]] = value.reshape(1) if siglip and key in _SCALARS else value
            continue
        if key in _TRANSPOSED_INV:
            out[_TRANSPOSED_INV[key]] = value.T.contiguous()
            continue
        split = _split_block_key(key, _TOWERS_INV)
        if split is None:
            raise CheckpointError(f"{key!r} has no place in a Hugging Face CLIPModel")
        base, rest = split
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
        else:
            out[base + _rename_in_block(rest, _BLOCK_INV, key)] = value
    if naflex:  # a linear patch embedding over (row, column, channel) patches
        weight = out[_PATCH_KEY]
        out[_PATCH_KEY] = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()
    return out


# transformers' defaults for what a SiglipConfig file may leave out (its published configs are sparse)
_SIGLIP_TOWER_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
_SIGLIP_TEXT_DEFAULTS = {**_SIGLIP_TOWER_DEFAULTS, "vocab_size": 32000, "max_position_embeddings": 64}
_SIGLIP_VISION_DEFAULTS = {**_SIGLIP_TOWER_DEFAULTS, "image_size": 224, "patch_size": 16, "vision_use_head": True}
_NAFLEX_PATCHES = 256  # Siglip2VisionConfig's num_patches default: a 16 x 16 position grid
_HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


def _siglip_config_to_clipforge(hf: dict) -> dict:
    text = {**_SIGLIP_TEXT_DEFAULTS, **{k: v for k, v in hf.get("text_config", {}).items() if v is not None}}
    vision = {**_SIGLIP_VISION_DEFAULTS, **{k: v for k, v in hf.get("vision_config", {}).items() if v is not None}}
    for tower in (text, vision):
        if tower["hidden_act"] not in _HF_ACTIVATIONS:
            raise CheckpointError(f"unsupported Hugging Face activation {tower['hidden_act']!r}")
    if not vision["vision_use_head"]:
        raise CheckpointError("a SiglipModel without its attention-pooling head (vision_use_head: false) is not built "
                              "here")
    naflex = is_naflex(hf)
    if naflex:  # no image size: a grid of learned positions, resized to each image's
        patches = vision.get("num_patches", _NAFLEX_PATCHES)
        grid = math.isqrt(patches)
        if grid * grid != patches:
            raise CheckpointError(f"a Siglip2Model with {patches} position embeddings (not a square grid) is not built "
                                  "here")
        vision["image_size"] = grid * vision["patch_size"]
    width = vision["hidden_size"]
    projection = text.get("projection_size") or text["hidden_size"]
    if projection != width:
        raise CheckpointError(f"SigLIP text projection {projection} differs from the image width {width}")

    def tower(cfg: dict) -> dict:
        return {"width": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
                "mlp_ratio": mlp_ratio(cfg["intermediate_size"], cfg["hidden_size"]),
                "act": _HF_ACTIVATIONS[cfg["hidden_act"]], "norm_eps": cfg["layer_norm_eps"]}

    return {
        "embed_dim": width, "init_logit_bias": -10.0, "logit_scale_max": None,
        "vision_cfg": {"image_size": vision["image_size"], "patch_size": vision["patch_size"], **tower(vision),
                       "head_width": width // vision["num_attention_heads"], "pool": "map",
                       **({"naflex": True} if naflex else {})},
        "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"],
                     **tower(text), "heads": text["num_attention_heads"], "causal": False, "pool": "last",
                     "proj": "linear", "hf_tokenizer_name": None,  # the folder or repo it came from, once known
                     "tokenizer_kwargs": {"clean": "canonicalize"}},
    }


def config_to_clipforge(hf: dict) -> dict:
    if hf.get("model_type") in ("siglip", "siglip2") or \
            {"SiglipModel", "Siglip2Model"} & set(hf.get("architectures", [])):
        return _siglip_config_to_clipforge(hf)
    text, vision = hf["text_config"], hf["vision_config"]
    for tower in (text, vision):
        if tower.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"unsupported Hugging Face activation {tower['hidden_act']!r}")
    config = {
        "embed_dim": hf.get("projection_dim", 512),
        "vision_cfg": {
            "image_size": vision["image_size"], "patch_size": vision["patch_size"], "width": vision["hidden_size"],
            "layers": vision["num_hidden_layers"], "head_width": vision["hidden_size"] // vision["num_attention_heads"],
            "mlp_ratio": mlp_ratio(vision["intermediate_size"], vision["hidden_size"]),
            "quick_gelu": vision.get("hidden_act", "quick_gelu") == "quick_gelu",
        },
        "text_cfg": {
            "context_length": text.get("max_position_embeddings", 77), "vocab_size": text.get("vocab_size", 49408),
            "width": text["hidden_size"], "heads": text["num_attention_heads"], "layers": text["num_hidden_layers"],
            "mlp_ratio": mlp_ratio(text["intermediate_size"], text["hidden_size"]),
            "quick_gelu": text.get("hidden_act", "quick_gelu") == "quick_gelu",
        },
    }
    if is_metaclip_2(hf):  # pooled at the first end-of-text token; its tokenizer files lie beside the weights
        config["text_cfg"].update(pool="eos", eos_id=text.get("eos_token_id", 2), hf_tokenizer_name=None)
    elif text.get("eos_token_id", CLIP_EOT) != 2:
        # transformers pools a CLIP text at its first end-of-text token, the row's largest id (argmax) only for
        # configs written before it did so (eos_token_id 2); the two differ once tokens are added after it
        # (textual inversion's placeholders, ``resize_token_embeddings``)
        config["text_cfg"].update(pool="eos", eos_id=text.get("eos_token_id", CLIP_EOT))
    return config


def added_tokens_settings(folder: str | Path, config: dict) -> dict:
    """``tokenizer_kwargs`` for the tokens a transformers CLIP folder's tokenizer adds after OpenAI's vocabulary, in id
    order (a textual inversion's placeholders: ``tokenizer.add_tokens``), matched as transformers matches them
    (``split_added_tokens``); empty where it adds none or holds no tokenizer. What clipforge's BPE tokenizer cannot
    match as transformers does is named in a warning and left out: a token of the vocabulary itself registered whole
    (a "!" padding token: "!!" is two of it in transformers, one BPE piece here), tokens added out of order."""
    import warnings

    from ..tokenizer import check_added_tokens, vocab_and_merges

    folder = Path(folder)
    if "hf_tokenizer_name" in config["text_cfg"] or not ((folder / "tokenizer.json").is_file() or (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        return {}  # a tokenizer of its own (MetaCLIP 2's), or none beside the weights
    from ..transformers_api import CLIPTokenizer

    try:
        added = CLIPTokenizer.from_pretrained(folder).get_added_vocab()
    except Exception as exc:  # the model loads without them; say why its tokenizer may differ
        warnings.warn(f"{folder}: its tokenizer files could not be read for added tokens ({type(exc).__name__}: "
                      f"{exc}); clipforge's tokenizer is OpenAI's BPE alone", stacklevel=3)
        return {}
    vocab = vocab_and_merges()[0]
    first = len(vocab)
    whole = sorted(t for t, i in added.items() if i < first and t not in (HF_SOT, HF_EOT))
    if whole:
        warnings.warn(f"{folder}: its tokenizer matches {', '.join(map(repr, whole))} whole; clipforge's tokenizer "
                      "splits text as OpenAI's BPE does (open_clip's ids), which differ where one runs into other "
                      "characters; clipforge.transformers_api.CLIPTokenizer gives transformers' ids", stacklevel=3)
    tokens = [t for t, i in sorted(added.items(), key=lambda item: item[1]) if i >= first]
    if not tokens:
        return {}
    try:
        ids = [added[t] for t in tokens]
        if ids != list(range(first, first + len(tokens))):
            raise ValueError(f"ids {ids} do not follow the vocabulary's {first} in order")
        check_added_tokens(tokens, vocab, split=True)  # refuses what the tokenizer cannot match
    except ValueError as exc:
        warnings.warn(f"{folder}: its tokenizer's added tokens are left out of clipforge's tokenizer ({exc}); "
                      "clipforge.transformers_api.CLIPTokenizer reads them", stacklevel=3)
        return {}
    return {"additional_special_tokens": tokens, "split_added_tokens": True}


# transformers' one-tower folders (diffusers' text encoders, IP-Adapter's image encoder, a VLM's SigLIP tower): the
# model family and the tower's side
TOWER_TYPES = {"clip_text_model": ("clip", "text"), "clip_vision_model": ("clip", "vision"),
               "siglip_text_model": ("siglip", "text"), "siglip_vision_model": ("siglip", "vision"),
               "siglip2_text_model": ("siglip2", "text"), "siglip2_vision_model": ("siglip2", "vision")}
_PLACEHOLDER_TOWER = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                      "image_size": 8, "patch_size": 8}


def tower_config_to_clipforge(folder_config: dict) -> tuple[dict, str]:
    """``(clipforge config, "text" or "vision")`` for a one-tower folder's ``config.json``: the tower's settings as
    the whole model's config would hold them (the other tower a placeholder, never built). A SigLIP image tower
    saved without its pooling head (``vision_use_head: false``) is translated with one: its loader drops it."""
    family, side = TOWER_TYPES[folder_config["model_type"]]
    tower = {k: v for k, v in folder_config.items() if k not in ("model_type", "architectures")}
    other = dict(_PLACEHOLDER_TOWER)
    if family in ("siglip", "siglip2"):  # the text projection's width is the image tower's
        tower["vision_use_head"] = True
        width = tower.get("hidden_size", 768)
        if side == "text":
            width = tower.get("projection_size") or width
        other.update(hidden_size=width, projection_size=width)
    hf = {"model_type": family, f"{side}_config": tower, f"{'vision' if side == 'text' else 'text'}_config": other,
          "projection_dim": tower.get("projection_dim", 512)}
    return config_to_clipforge(hf), side


def _hf_activation(cfg: dict, config: dict) -> str:
    """transformers' name for a tower's activation (``models.clip.tower_activation``)."""
    from ..models.clip import tower_activation

    names = {ours: theirs for theirs, ours in _HF_ACTIVATIONS.items() if theirs != "gelu_new"}
    return names[tower_activation(cfg, config.get("quick_gelu", False))]


def _siglip_config_from_clipforge(config: dict) -> dict:
    vision, text = config["vision_cfg"], config["text_cfg"]
    if text.get("causal", True) or text.get("pool") != "last" or text.get("proj") != "linear":
        raise CheckpointError("Hugging Face SiglipModel's text tower is bidirectional, pooled at the last token and "
                              "projected with a bias; this model's is not (keep it as a clipforge folder)")

    model_type = "siglip2" if is_naflex(config) else "siglip"

    def tower(cfg: dict, kind: str) -> dict:
        return {"hidden_size": cfg["width"], "intermediate_size": int(cfg["width"] * cfg.get("mlp_ratio", 4.0)),
                "num_hidden_layers": cfg["layers"], "hidden_act": _hf_activation(cfg, config),
                "layer_norm_eps": cfg.get("norm_eps", 1e-6 if kind == "vision" else 1e-5),
                "model_type": f"{model_type}_{kind}_model"}

    grid = vision["image_size"] // vision["patch_size"]
    size = {"num_patches": grid * grid} if model_type == "siglip2" else {"image_size": vision["image_size"]}
    return {
        "architectures": [MODEL_TYPES[model_type]], "model_type": model_type,
        "text_config": {**tower(text, "text"), "num_attention_heads": text.get("heads", text["width"] // 64),
                        "max_position_embeddings": text["context_length"], "vocab_size": text["vocab_size"],
                        "projection_size": config["embed_dim"]},
        "vision_config": {**tower(vision, "vision"), "num_attention_heads": vision["width"] // vision.get("head_width", 64),
                          **size, "patch_size": vision["patch_size"], "num_channels": 3, "vision_use_head": True},
    }


def config_from_clipforge(config: dict, logit_scale: float) -> dict:
    """A ``CLIPModel`` config.json, or a ``SiglipModel``'s for a SigLIP model."""
    from ..models import tower_kind

    vision, text = config["vision_cfg"], config["text_cfg"]
    if "hf_model_name" in text:
        raise CheckpointError(f"Hugging Face CLIPModel's and SiglipModel's text towers are their own transformers; this "
                              f"model's is a Hugging Face encoder ({text['hf_model_name']}); write --to open_clip or "
                              "clipforge")
    if vision.get("ls_init_value") is not None or text.get("ls_init_value") is not None:
        raise CheckpointError("Hugging Face CLIPModel's and SiglipModel's blocks have no LayerScale (this model scales "
                              "its towers' residual branches: ViT-M-16-alt's kind); write --to open_clip or clipforge")
    if is_siglip(config):
        return _siglip_config_from_clipforge(config)
    if "multimodal_cfg" in config:
        raise CheckpointError(NO_COCA)
    kind = tower_kind(config)
    if kind != "ViT" or "tower" in vision:  # timm's plain ViTs (MobileCLIP-B's: timm's names) are not CLIPModel's
        kind = "timm ViT" if kind == "ViT" else kind
        raise CheckpointError(f"Hugging Face CLIPModel has no {kind} image tower; only CLIP's ViT models export to HF")
    if vision.get("pool", "tok") != "tok" or not vision.get("ln_pre", True) or text.get("pool", "eot") == "last" \
            or not text.get("causal", True) or text.get("proj", "matrix") != "matrix":
        raise CheckpointError("Hugging Face CLIPModel pools the class token after ln_pre and the text at its "
                              "end-of-text token under a causal mask; this model (CLIPA's settings) is not one; write "
                              "--to open_clip or clipforge")
    at_first_eos = text.get("pool") == "eos"
    model_type = "metaclip_2" if at_first_eos and text["eos_id"] != CLIP_EOT else "clip"  # its own tokenizer's ids
    # CLIP: transformers' eos_token_id 2 pools at the largest id (clipforge's "eot"), which differs from pooling at
    # the first end-of-text token only with ids after it (a vocabulary grown for added tokens)
    argmax = not at_first_eos and text["vocab_size"] > CLIP_EOT + 1
    ids = {"bos_token_id": 0, "eos_token_id": text["eos_id"], "pad_token_id": 1} if model_type == "metaclip_2" else \
        {"bos_token_id": 49406, "eos_token_id": 2 if argmax else CLIP_EOT, "pad_token_id": 1}
    return {
        "architectures": [MODEL_TYPES[model_type]],
        "model_type": model_type,
        "projection_dim": config["embed_dim"],
        "logit_scale_init_value": logit_scale,
        "text_config": {
            "hidden_size": text["width"], "intermediate_size": int(text["width"] * text.get("mlp_ratio", 4.0)),
            "num_attention_heads": text.get("heads", text["width"] // 64), "num_hidden_layers": text["layers"],
            "max_position_embeddings": text["context_length"], "vocab_size": text["vocab_size"],
            "hidden_act": _hf_activation(text, config), "layer_norm_eps": 1e-5,
            "projection_dim": config["embed_dim"], **ids, "model_type": f"{model_type}_text_model",
        },
        "vision_config": {
            "hidden_size": vision["width"], "intermediate_size": int(vision["width"] * vision.get("mlp_ratio", 4.0)),
            "num_attention_heads": vision["width"] // vision.get("head_width", 64),
            "num_hidden_layers": vision["layers"], "image_size": vision["image_size"],
            "patch_size": vision["patch_size"], "num_channels": 3, "hidden_act": _hf_activation(vision, config),
            "layer_norm_eps": 1e-5, "projection_dim": config["embed_dim"],
            "model_type": f"{model_type}_vision_model",
        },
    }


def save(model, folder: str | Path) -> Path:
    """A ``CLIPModel`` (or ``SiglipModel``) folder that transformers loads (``model.safetensors`` + ``config.json``),
    with the files its processor reads, so that text and images go in as clipforge's own tokenizer and preprocess
    send them."""
    from ..files import write_json
    from .io import savable_state, save_safetensors

    folder = Path(folder)
    state = savable_state(model)
    config = config_from_clipforge(model.config, float(model.logit_scale.detach()))
    own_tokenizer = "hf_tokenizer_name" in model.config["text_cfg"]  # SigLIP's, MetaCLIP 2's
    if own_tokenizer:  # its tokenizer files (fetched from its hub repo if need be) before anything is written
        from ..hub_tokenizer import tokenizer_files

        tokenizer_files(model.config, fetch=True)
    save_safetensors(from_clipforge(state, naflex=is_naflex(model.config)), folder / "model.safetensors",
                     {"format": "pt"})
    write_json(folder / "config.json", config)
    save_image_processor(model, folder)
    if own_tokenizer:
        save_own_tokenizer(model, folder)
    else:
        save_clip_tokenizer(model, folder)
    return folder


HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"  # transformers' names for OpenAI's two special tokens


def save_image_processor(model, folder: str | Path) -> None:
    """``preprocessor_config.json``: the model's evaluation transform (``image_processor_settings``)."""
    from ..files import write_json
    from ..preprocess import NaFlexPreprocess, Preprocess

    preprocess = NaFlexPreprocess.for_model(model) if is_naflex(model.config) else \
        Preprocess(model.image_size, **(getattr(model, "normalisation", None) or {}))
    write_json(Path(folder) / "preprocessor_config.json", image_processor_settings(preprocess))


def image_processor_settings(preprocess) -> dict:
    """An evaluation transform as transformers' image processor settings: a ``Preprocess`` (bicubic or bilinear
    short-side resize and centre crop, or a squash; its mean and std) as a ``CLIPImageProcessor``, which expresses
    both (SigLIP's own processor squashes only); a ``NaFlexPreprocess`` as a ``Siglip2ImageProcessor``."""
    from ..preprocess import NaFlexPreprocess

    settings = preprocess.settings
    if isinstance(preprocess, NaFlexPreprocess):  # transformers' NaFlex processor: aspect kept, up to the patches
        return {"image_processor_type": "Siglip2ImageProcessor", "do_resize": True, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 2,
                "image_mean": list(settings["mean"]), "image_std": list(settings["std"]),
                "patch_size": settings["patch_size"], "max_num_patches": settings["max_patches"]}
    size, squash = preprocess.image_size, settings["resize_mode"] == "squash"  # the whole image to a square (DFN)
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"height": size, "width": size} if squash else {"shortest_edge": size},
        "resample": 2 if settings["interpolation"] == "bilinear" else 3,  # PIL's codes
        "do_center_crop": not squash, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": list(settings["mean"]), "image_std": list(settings["std"]),
    }


def save_own_tokenizer(model, folder: str | Path) -> None:
    """The model's tokenizer files, with ``model_input_names: ["input_ids"]`` in ``tokenizer_config.json``: SigLIP was
    trained without a padding mask (as open_clip and clipforge run it), and transformers' SiglipModel masks padding
    whenever its tokenizer hands it an ``attention_mask``, which its zero-shot pipeline always passes on. (A causal
    tower such as MetaCLIP 2's gives the same features either way.)"""
    from ..files import read_json, write_json
    from ..hub_tokenizer import copy_tokenizer_files, has_tokenizer_files

    folder = Path(folder)
    copy_tokenizer_files(model.config, folder, fetch=True)
    config_file = folder / "tokenizer_config.json"
    if not has_tokenizer_files(folder):
        return  # no tokenizer known (weights alone were loaded): none is written
    settings = read_json(config_file) if config_file.is_file() else {}
    write_json(config_file, {**settings, "model_input_names": ["input_ids"],
                             "model_max_length": model.config["text_cfg"]["context_length"]})


def save_clip_tokenizer(model, folder: str | Path) -> None:
    """OpenAI's BPE as a ``CLIPTokenizer`` (``vocab.json``, ``merges.txt``, the tokens added after it). Its ids are
    clipforge's but for padding: transformers pads with ``<|endoftext|>`` (as OpenAI's own transformers export does;
    padding with id 0, "!", would make "!" a special token and split "!!"), and the features are the same either
    way."""
    from ..files import atomic_path, write_json
    from ..tokenizer import EOT_TOKEN, SOT_TOKEN, vocab_and_merges

    folder = Path(folder)
    vocab, merges = vocab_and_merges()
    renamed = {SOT_TOKEN: HF_SOT, EOT_TOKEN: HF_EOT}
    write_json(folder / "vocab.json", {renamed.get(token, token): i for token, i in vocab.items()})
    with atomic_path(folder / "merges.txt") as tmp:
        tmp.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": HF_SOT, "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": HF_EOT}
    write_json(folder / "special_tokens_map.json", special)
    settings = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model.config["text_cfg"]["context_length"],
                "errors": "replace", **special}
    # tokens added after the vocabulary (a textual inversion's), as transformers' add_tokens saves them: where
    # transformers 5 and 4 (4.34 on) read them, and transformers 4's older place
    added = model.config["text_cfg"].get("tokenizer_kwargs", {}).get("additional_special_tokens") or ()
    added_ids = {token: len(vocab) + k for k, token in enumerate(added)}
    if added_ids:
        as_added = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": False}
        settings["added_tokens_decoder"] = {str(i): {"content": token, **as_added} for token, i in added_ids.items()}
        write_json(folder / "added_tokens.json", added_ids)
    else:
        (folder / "added_tokens.json").unlink(missing_ok=True)  # one an earlier write left would add its tokens
    write_json(folder / "tokenizer_config.json", settings)
