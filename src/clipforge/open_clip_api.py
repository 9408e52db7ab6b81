"""open_clip's calls with open_clip's arguments, so that a script changes only its import (``import clipforge as
open_clip``): ``create_model``, ``create_model_and_transforms``, ``create_model_from_pretrained``, and the rest of its
namespace that scripts use (``build_zero_shot_classifier``, ``decode``, ImageNet's class names and templates ...).
The models, weights and preprocessing are ``clipforge.load``'s; what this module adds is the reading of open_clip's
keywords (``precision``, ``device``, ``force_*``, ``image_*``, ``aug_cfg``, ``cache_dir`` ...), and a clear error for
the few that ask for something clipforge does not do."""
from __future__ import annotations

import dataclasses

# open_clip's ``precision`` values: the dtype the weights are cast to ("amp*": fp32 weights, the caller autocasts)
_PRECISIONS = {"fp32": "float32", "amp": "float32", "amp_bf16": "float32", "amp_bfloat16": "float32",
               "fp16": "float16", "pure_fp16": "float16", "bf16": "bfloat16", "pure_bf16": "bfloat16"}

# open_clip's keywords of ``create_model`` (its others: the model config's own keys, merged into it)
OPEN_CLIP_KEYWORDS = frozenset({
    "pretrained", "load_weights", "precision", "device", "jit", "force_quick_gelu", "force_custom_text",
    "force_patch_dropout", "force_image_size", "force_preprocess_cfg", "force_context_length", "pretrained_image",
    "pretrained_text", "pretrained_image_path", "pretrained_text_path", "cache_dir", "output_dict",
    "require_pretrained", "weights_only", "quick_gelu", "trust_pickle"})

_AUGMENTATIONS = ("scale", "ratio")  # the AugmentationCfg fields clipforge's training crop takes


def create_model(model_name: str | dict, pretrained: str | None = None, **kwargs):
    """``clipforge.create_model``: a randomly initialised model from a zoo name or config dict, keyword overrides
    merged into its config (``create_model("ViT-B-32", quick_gelu=True, vision_cfg={"patch_dropout": 0.5})``); or,
    given ``pretrained``, an ``hf-hub:`` or ``local-dir:`` name, or any of open_clip's own keywords (``device``,
    ``precision``, ``force_image_size`` ...), open_clip's ``create_model``: the model with its weights, in training
    mode as open_clip returns it."""
    from .models import create_model as create_zoo_model

    loads = isinstance(model_name, str) and model_name.startswith(("hf-hub:", "local-dir:"))  # open_clip's names
    if pretrained is None and not loads and not (OPEN_CLIP_KEYWORDS & set(kwargs)):
        return create_zoo_model(model_name, **kwargs)
    return _model(model_name, pretrained, **kwargs)[0].train()


def create_model_and_transforms(model_name: str, pretrained: str | None = None, *, image_mean=None, image_std=None,
                                image_interpolation: str | None = None, image_resize_mode: str | None = None,
                                aug_cfg=None, **kwargs):
    """open_clip's call: ``(model, training transform, evaluation transform)``, the model in eval mode (call
    ``model.train()`` to train it: open_clip leaves it in training mode). ``image_*`` override the weights' own
    preprocessing; ``aug_cfg`` sets the training crop and colour changes (``_augmentation``)."""
    from .preprocess import image_transform

    augment = _augmentation(aug_cfg)
    model, preprocess = _model(model_name, pretrained, force_preprocess_cfg=_preprocess_overrides(
        image_mean, image_std, image_interpolation, image_resize_mode), **kwargs)
    train = image_transform(model.image_size, train=True, mean=preprocess.mean, std=preprocess.std, **augment)
    return model.eval(), train, preprocess


def create_model_from_pretrained(model_name: str, pretrained: str | None = None, *, image_mean=None, image_std=None,
                                 image_interpolation: str | None = None, image_resize_mode: str | None = None,
                                 return_transform: bool = True, **kwargs):
    """open_clip's call: ``(model, evaluation transform)`` (the model alone with ``return_transform=False``), the
    model in eval mode."""
    model, preprocess = _model(model_name, pretrained, force_preprocess_cfg=_preprocess_overrides(
        image_mean, image_std, image_interpolation, image_resize_mode), **kwargs)
    return (model.eval(), preprocess) if return_transform else model.eval()


def _model(model_name, pretrained: str | None = None, load_weights: bool = True, precision: str = "fp32",
           device="cpu", jit: bool = False, force_quick_gelu: bool = False, force_custom_text: bool = False,
           force_patch_dropout: float | None = None, force_image_size=None, force_preprocess_cfg: dict | None = None,
           force_context_length: int | None = None, pretrained_image: bool = False, pretrained_text: bool = True,
           pretrained_image_path: str | None = None, pretrained_text_path: str | None = None,
           cache_dir: str | None = None, output_dict: bool | None = None, require_pretrained: bool = False,
           weights_only: bool = True, quick_gelu: bool | None = None, trust_pickle: bool = False, **model_kwargs):
    """``(model, evaluation transform)`` from open_clip's arguments. ``force_custom_text`` (a state-dict layout:
    clipforge reads both) and ``output_dict`` (the forward's ``CLIPOutput`` unpacks as a tuple and reads as a dict)
    change nothing here."""
    import torch

    from . import load_model
    from .models import get_model_config, is_model_name
    from .models import is_naflex
    from .preprocess import NaFlexPreprocess, Preprocess, PREPROCESS_KEYS
    from .pretrained import cache_at

    if isinstance(model_name, dict):
        raise TypeError("open_clip's create_model takes a model name; a config dict builds a random model: "
                        "clipforge.create_model(config) without open_clip's keywords")
    refused = {"jit": (jit, "TorchScript is not built here: run the model eagerly, or torch.compile(model)"),
               "pretrained_image": (pretrained_image, "timm's ImageNet weights for the image tower are not fetched "
                                    "here: load a whole CLIP checkpoint with pretrained="),
               "pretrained_image_path": (pretrained_image_path, "one tower's weights alone are not loaded here: "
                                         "load a whole CLIP checkpoint with pretrained="),
               "pretrained_text_path": (pretrained_text_path, "one tower's weights alone are not loaded here: "
                                        "load a whole CLIP checkpoint with pretrained=")}
    for name, (value, why) in refused.items():
        if value:
            raise ValueError(f"{name}={value!r}: {why}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of open_clip's: {', '.join(_PRECISIONS)}")
    unknown = set(force_preprocess_cfg or {}) - set(PREPROCESS_KEYS)
    if unknown:
        raise ValueError(f"force_preprocess_cfg: {', '.join(sorted(unknown))} not among {', '.join(PREPROCESS_KEYS)}")
    if not load_weights:
        pretrained = None
    if require_pretrained and pretrained is None:
        raise ValueError(f"require_pretrained=True, but no pretrained weights were named for {model_name}")
    overrides = dict(model_kwargs)
    if force_quick_gelu:
        quick_gelu = True
    vision = {k: v for k, v in (("patch_dropout", force_patch_dropout), ("image_size", force_image_size))
              if v is not None}
    if isinstance(vision.get("image_size"), (tuple, list)):
        height, width = vision["image_size"]
        if height != width:
            raise ValueError(f"force_image_size {tuple(vision['image_size'])}: clipforge's towers take square images")
        vision["image_size"] = height
    text = {"context_length": force_context_length} if force_context_length is not None else {}
    if not pretrained_text and pretrained is None and is_model_name(model_name) and \
            "hf_model_name" in get_model_config(model_name).get("text_cfg", {}):
        text["hf_pretrained"] = False  # a Hugging Face text tower left randomly initialised, as open_clip does
    for key, values in (("vision_cfg", vision), ("text_cfg", text)):
        if values:
            overrides[key] = {**overrides.get(key, {}), **values}
    with cache_at(cache_dir):
        model = load_model(model_name, pretrained, quick_gelu, trust_pickle or not weights_only,
                           overrides=overrides)
    model.normalisation = {**model.normalisation, **(force_preprocess_cfg or {})}
    model.to(device=device, dtype=getattr(torch, _PRECISIONS[precision]))
    if is_naflex(getattr(model, "config", None) or {}):  # SigLIP 2 NaFlex (open_clip has none): each image at its own aspect ratio
        return model, NaFlexPreprocess.for_model(model)
    return model, Preprocess(model.image_size, **model.normalisation)


def _preprocess_overrides(mean, std, interpolation, resize_mode) -> dict:
    values = {"mean": mean, "std": std, "interpolation": interpolation, "resize_mode": resize_mode}
    return {k: tuple(v) if k in ("mean", "std") else v for k, v in values.items() if v is not None}


def _augmentation(aug_cfg) -> dict:
    """The training transform's arguments from open_clip's ``aug_cfg`` (a dict or its ``AugmentationCfg``): the crop's
    ``scale`` and ``ratio``, and as open_clip's own (non-timm) transform applies them, ``color_jitter`` when
    ``color_jitter_prob`` is set and ``gray_scale_prob``; what only timm's pipeline does (``use_timm``, random
    erasing) is refused by name."""
    if aug_cfg is None:
        return {}
    cfg = dataclasses.asdict(aug_cfg) if dataclasses.is_dataclass(aug_cfg) else dict(aug_cfg)
    colour = ("color_jitter", "color_jitter_prob", "gray_scale_prob")
    others = sorted(k for k, v in cfg.items() if k not in _AUGMENTATIONS + colour and v not in (None, False, 0, 0.0))
    if others:
        raise ValueError(f"aug_cfg: {', '.join(others)} not built here; clipforge's training transform takes "
                         f"{', '.join(_AUGMENTATIONS + colour)} (open_clip's own transform without timm)")
    found = {k: tuple(cfg[k]) for k in _AUGMENTATIONS if cfg.get(k) is not None}
    if cfg.get("color_jitter_prob"):  # open_clip applies the jitter only with a probability
        found.update(color_jitter=cfg["color_jitter"], color_jitter_prob=cfg["color_jitter_prob"])
    if cfg.get("gray_scale_prob"):
        found["gray_scale_prob"] = cfg["gray_scale_prob"]
    return found


# ---------------------------------------------------------------------------------- the rest of open_clip's namespace
# What zero-shot and captioning scripts take from open_clip beside the model: the same values and results.

@dataclasses.dataclass
class AugmentationCfg:
    """open_clip's ``aug_cfg`` fields; clipforge's training transform takes ``scale``, ``ratio``, ``color_jitter``
    (with ``color_jitter_prob``) and ``gray_scale_prob`` (timm's, ``use_timm`` and random erasing, are refused by
    name when set)."""
    scale: tuple = (0.9, 1.0)
    ratio: tuple | None = None
    color_jitter: float | tuple | None = None
    re_prob: float | None = None
    re_count: int | None = None
    use_timm: bool = False
    color_jitter_prob: float | None = None
    gray_scale_prob: float | None = None


def build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch: int | None = 10,
                               device="cpu", use_tqdm: bool = False):
    """open_clip's call: classifier weights ``[embed_dim, n_classes]`` (``zeroshot.zero_shot_classifier``), the
    templates strings with ``{}`` or callables (open_clip's ``OPENAI_IMAGENET_TEMPLATES``), ``num_classes_per_batch``
    classes' prompts per text batch (all at once: None)."""
    import torch

    from .zeroshot import zero_shot_classifier

    classnames = list(classnames)
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    step = num_classes_per_batch or len(classnames)
    batches = [classnames[start:start + step] for start in range(0, len(classnames), step)]
    if use_tqdm:
        from tqdm import tqdm

        batches = tqdm(batches, desc="class embeddings", unit="batch")
    return torch.cat([zero_shot_classifier(model, tokenizer, batch, templates, device=device) for batch in batches],
                     dim=1)


def build_zero_shot_classifier_legacy(model, tokenizer, classnames, templates, device="cpu",
                                      use_tqdm: bool = False):
    """open_clip's older call (one class's prompts at a time): the same weights as ``build_zero_shot_classifier``."""
    return build_zero_shot_classifier(model, tokenizer, classnames, templates, 1, device, use_tqdm)


def get_cast_dtype(precision: str):
    """open_clip's: the dtype a model's towers cast to under ``precision`` ("bf16", "fp16"), else None."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def get_input_dtype(precision: str):
    """open_clip's: the dtype images are given in under ``precision`` ("bf16" / "pure_bf16", "fp16" /
    "pure_fp16"), else None."""
    import torch

    return {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "fp16": torch.float16,
            "pure_fp16": torch.float16}.get(precision)


def load_checkpoint(model, checkpoint_path, strict: bool = True, weights_only: bool = True, device="cpu"):
    """open_clip's: the weights of a checkpoint file or folder (any format ``clipforge.load`` reads: open_clip's state
    dicts and training checkpoints, OpenAI's, Hugging Face's, clipforge's) into ``model``, its position grids resized
    to the model's as open_clip's loader resizes them. Returns ``load_state_dict``'s missing and unexpected keys;
    with ``strict`` a mismatch is an error naming the keys and shapes. ``weights_only=False`` unpickles anything
    (only for files you trust). ``device`` changes nothing: tensors go where the model's are."""
    from .checkpoint import read_checkpoint
    from .checkpoint.io import load_into, resize_positions

    state, _ = read_checkpoint(checkpoint_path, trust_pickle=not weights_only)
    state = resize_positions(state, model)
    return load_into(model, state, str(checkpoint_path)) if strict else model.load_state_dict(state, strict=False)


def get_pretrained_cfg(model: str, tag: str) -> dict:
    """open_clip's: a pretrained tag's source and preprocessing (``url``, ``mean``, ``std``, ``interpolation``,
    ``resize_mode``, ``quick_gelu``), or {} for a tag this model does not have."""
    from .pretrained import get_pretrained
    from .preprocess import Preprocess

    try:
        source = get_pretrained(model, tag)
    except ValueError:
        return {}
    preprocess = Preprocess(224, **source.preprocess)  # its defaults filled in
    return {"url": source.url, "mean": preprocess.mean, "std": preprocess.std,
            "interpolation": preprocess.interpolation, "resize_mode": preprocess.resize_mode,
            "quick_gelu": source.quick_gelu}


def get_pretrained_url(model: str, tag: str) -> str:
    """open_clip's: the tag's weights URL, or "" where the model has no such tag."""
    return get_pretrained_cfg(model, tag).get("url", "")


def is_pretrained_cfg(model: str, tag: str) -> bool:
    return bool(get_pretrained_cfg(model, tag))


def download_pretrained_from_url(url: str, cache_dir: str | None = None) -> str:
    """open_clip's: ``url`` fetched into the cache (or ``cache_dir``) once, verified where its SHA-256 is known;
    the local path."""
    from .pretrained import cache_at, download

    with cache_at(cache_dir):
        return str(download(url))


def download_pretrained(cfg: dict, prefer_hf_hub: bool = True, cache_dir: str | None = None) -> str:
    """open_clip's: the weights a ``get_pretrained_cfg`` dict names (its ``url``, or its ``hf_hub`` repo's weights),
    fetched once; "" where it names none."""
    from .pretrained import cache_at, fetch_hub

    hub = (cfg.get("hf_hub") or "").strip("/")
    with cache_at(cache_dir):
        if hub and (prefer_hf_hub or not cfg.get("url")):
            return str(fetch_hub(hub).weights)
    return download_pretrained_from_url(cfg["url"], cache_dir) if cfg.get("url") else ""


def set_model_preprocess_cfg(model, preprocess_cfg: dict) -> None:
    """open_clip's: the preprocessing ``get_model_preprocess_cfg`` (and ``clipforge.load``'s preprocess) will give
    for ``model``: ``mean``, ``std``, ``interpolation``, ``resize_mode``; a ``size`` other than the model's input,
    another ``mode`` than RGB or a ``fill_color`` are refused (clipforge's towers take their own square size)."""
    from .preprocess import PREPROCESS_KEYS, Preprocess

    size = preprocess_cfg.get("size", model.image_size)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size != (model.image_size, model.image_size) or preprocess_cfg.get("mode", "RGB") != "RGB" or \
            preprocess_cfg.get("fill_color", 0) != 0:
        raise ValueError(f"preprocess_cfg {preprocess_cfg}: this model takes {model.image_size}-pixel RGB images "
                         "(size, mode and fill_color are not settings here)")
    settings = {k: tuple(v) if k in ("mean", "std") else v for k, v in preprocess_cfg.items() if k in PREPROCESS_KEYS}
    Preprocess(model.image_size, **settings)  # a bad value said now, not at the first image
    model.normalisation = settings


def convert_weights_to_lp(model, dtype=None) -> None:
    """open_clip's: the model's weights in a low precision (float16 unless ``dtype``), in place, as ``precision=``
    casts them here (every floating-point tensor: clipforge's layers compute in their weights' dtype)."""
    import torch

    model.to(torch.float16 if dtype is None else dtype)


def convert_weights_to_fp16(model) -> None:
    """open_clip's: ``convert_weights_to_lp`` with float16."""
    convert_weights_to_lp(model)


def trace_model(model, batch_size: int = 256, device="cpu"):
    """open_clip's TorchScript tracing is not built here."""
    raise NotImplementedError("trace_model: TorchScript is not built here; run the model eagerly, "
                              "torch.compile(model), or `clipforge export onnx` for a traced graph")


def get_model_preprocess_cfg(model) -> dict:
    """open_clip's: the preprocessing the model's weights were trained with, as open_clip's ``preprocess_cfg`` dict
    (``size``, ``mode``, ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``fill_color``)."""
    from .preprocess import Preprocess

    preprocess = Preprocess(model.image_size, **getattr(model, "normalisation", {}))  # its defaults filled in
    return {"size": (model.image_size, model.image_size), "mode": "RGB", "mean": preprocess.mean,
            "std": preprocess.std, "interpolation": preprocess.interpolation, "resize_mode": preprocess.resize_mode,
            "fill_color": 0}


def get_model_tokenize_cfg(model) -> dict:
    """open_clip's: the text tower's ``context_length`` and ``vocab_size``, where it has them."""
    text = getattr(model, "text", model)
    return {key: getattr(text, key) for key in ("context_length", "vocab_size") if getattr(text, key, None) is not None}


def list_openai_models() -> list[str]:
    """open_clip's: the OpenAI checkpoints' names (``ViT-B-32`` ...)."""
    return list_pretrained_models_by_tag("openai")


def load_openai_model(name: str, precision: str | None = None, device=None, cache_dir: str | None = None):
    """open_clip's: an OpenAI checkpoint by name (``list_openai_models``) or path, as a model in eval mode;
    ``precision`` defaults to fp32 on CPU and fp16 on a GPU, as open_clip's."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("fp32" if device.type == "cpu" else "fp16")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of open_clip's: {', '.join(_PRECISIONS)}")
    from pathlib import Path

    pretrained = None if Path(name).exists() else "openai"
    # every OpenAI model uses QuickGELU, which a state dict cannot show
    return _model(name, pretrained, precision=precision, device=device, cache_dir=cache_dir,
                  quick_gelu=True)[0].eval()


def decode(output_ids) -> str:
    """open_clip's ``decode``: OpenAI BPE ids (a CoCa's ``generate`` row) back to text, special tokens included."""
    from .tokenizer import get_tokenizer

    return get_tokenizer().decode(output_ids)


def list_pretrained_tags_by_model(model: str) -> list[str]:
    from .pretrained import list_pretrained

    return [tag for _, tag in list_pretrained(model)]


def list_pretrained_models_by_tag(tag: str) -> list[str]:
    from .pretrained import list_pretrained

    return [model for model, known in list_pretrained() if known == tag]


def add_model_config(path) -> None:
    """open_clip's call: the architectures in an open_clip model-config JSON file, or a folder of them, into the zoo
    under their file names (translated as an open_clip folder's config is; what clipforge does not build is refused
    by name)."""
    import json
    from pathlib import Path

    from .checkpoint.openai import config_from_open_clip
    from .models import register_model_config

    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no model config JSON files there")
    for file in files:
        config = json.loads(file.read_text())
        if not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{file}: not an open_clip model config (needs embed_dim, vision_cfg and text_cfg)")
        register_model_config(file.stem, config_from_open_clip(config, str(file)))


_SIMPLE_IMAGENET_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                              "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


def _as_callables(templates) -> tuple:
    from .prompts import fill

    return tuple((lambda classname, template=template: fill(template, classname)) for template in templates)


def __getattr__(name: str):  # the shipped class names and templates are read on first use
    from .preprocess import OPENAI_MEAN, OPENAI_STD
    from .prompts import shipped_classnames, shipped_templates

    values = {"IMAGENET_CLASSNAMES": lambda: tuple(shipped_classnames("imagenet1k")),
              "OPENAI_IMAGENET_TEMPLATES": lambda: _as_callables(shipped_templates("imagenet1k")),
              "SIMPLE_IMAGENET_TEMPLATES": lambda: _as_callables(_SIMPLE_IMAGENET_TEMPLATES),
              "OPENAI_DATASET_MEAN": lambda: tuple(OPENAI_MEAN), "OPENAI_DATASET_STD": lambda: tuple(OPENAI_STD)}
    if name not in values:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = values[name]()
    return globals()[name]


class _TowerCfg:
    """A tower's settings as open_clip's ``CLIPVisionCfg`` / ``CLIPTextCfg`` take them (its JSON model configs'
    keys), for ``clipforge.CLIP(embed_dim, vision_cfg=..., text_cfg=...)`` as open_clip's ``CLIP`` is called; the
    sizes open_clip's dataclass defaults to are written out, the rest as given."""

    sizes: dict = {}

    def __init__(self, **values):
        self.__dict__.update(values)

    def to_open_clip(self) -> dict:
        return {**self.sizes, **vars(self)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class CLIPVisionCfg(_TowerCfg):
    sizes = {"layers": 12, "width": 768, "patch_size": 16, "image_size": 224}


class CLIPTextCfg(_TowerCfg):
    sizes = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}


def _open_clip_tower(cfg, sizes: dict) -> dict:
    """An open_clip tower config from ``_TowerCfg``, open_clip's own dataclass (its fields that differ from their
    defaults, and the sizes) or a dict (as it is)."""
    import dataclasses

    if isinstance(cfg, dict):
        return cfg
    if isinstance(cfg, _TowerCfg):
        return cfg.to_open_clip()
    if dataclasses.is_dataclass(cfg):
        changed = {}
        for field in dataclasses.fields(cfg):
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
            if getattr(cfg, field.name) != default or field.name in sizes:
                changed[field.name] = getattr(cfg, field.name)
        return changed
    raise TypeError(f"a tower config is a dict, CLIPVisionCfg or CLIPTextCfg, not a {type(cfg).__name__}")


def config_from_open_clip_cfgs(embed_dim: int, vision_cfg, text_cfg, quick_gelu: bool = False,
                               init_logit_bias: float | None = None) -> dict:
    """clipforge's model config for open_clip's ``CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu)`` call, through
    the translation open_clip model folders take (``checkpoint.openai.config_from_open_clip``: what clipforge would
    build differently is refused by name)."""
    from .checkpoint.openai import config_from_open_clip

    model_cfg = {"embed_dim": embed_dim, "quick_gelu": quick_gelu,
                 "vision_cfg": _open_clip_tower(vision_cfg, CLIPVisionCfg.sizes),
                 "text_cfg": _open_clip_tower(text_cfg, CLIPTextCfg.sizes)}
    if init_logit_bias is not None:
        model_cfg["init_logit_bias"] = init_logit_bias
    return config_from_open_clip(model_cfg, "CLIP(embed_dim, vision_cfg, text_cfg)")
