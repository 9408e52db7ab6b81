"""The architecture of a state dict in clipforge's layout, read off its weight shapes (as openai/CLIP's
``build_model`` does), with the attention head layout taken from the zoo where the shapes match one of its models."""
from __future__ import annotations

import math

from .errors import CheckpointError


def mlp_ratio(hidden: int, width: int) -> float:
    """The ratio for which the model's ``int(width * ratio)`` gives back ``hidden``: plain ``hidden / width`` can land
    a rounding error below (448 * (453 / 448) = 452.99999999999994), and a model built from it would not fit."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _count(state: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _layer_scale(state: dict, blocks: str) -> dict:
    """LayerScale shows in the weights (``ls_1.gamma``), its initial value does not (nor in the outputs): a
    placeholder, replaced by the zoo architecture's where one has these shapes (``_adopt_zoo_heads``)."""
    return {"ls_init_value": 1e-5} if f"{blocks}0.ls_1.gamma" in state else {}


def infer_config(state: dict) -> dict:
    """Rebuild the architecture from weight shapes."""
    try:
        text_width = state["text.ln_final.weight"].shape[0]
        text_cfg = {
            "context_length": state["text.positional_embedding"].shape[0],
            "vocab_size": state["text.token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": text_width // 64,
            "layers": _count(state, "text.transformer.resblocks."),
            "mlp_ratio": mlp_ratio(state["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], text_width),
        }
        text_cfg.update(_layer_scale(state, "text.transformer.resblocks."))
        if "visual.head.probe" in state:
            return _infer_siglip(state, text_cfg)
        embed_dim = state["text.text_projection"].shape[1]
        partial = {"embed_dim": embed_dim, "text_cfg": text_cfg}
        if "visual.trunk.final_conv.se.fc1.weight" in state:
            from .timm_fastvit import TIMM_FASTVIT, tower_config

            return _infer_timm_tower(state, partial, {n: tower_config(n) for n in TIMM_FASTVIT}, "FastViT",
                                     size_in_weights=False)
        if any(k.startswith("visual.trunk.stages.") for k in state):
            return _infer_convnext(state, partial)
        if any(k.startswith("visual.trunk.blocks.") for k in state):
            from .timm_eva import TIMM_EVA, tower_config

            return _infer_timm_tower(state, partial, {n: tower_config(n) for n in TIMM_EVA}, "Eva/ViT")
        if "visual.proj" in state:
            width = state["visual.conv1.weight"].shape[0]
            patch = state["visual.conv1.weight"].shape[-1]
            grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
            vision_cfg = {
                "image_size": patch * grid, "patch_size": patch, "width": width,
                "layers": _count(state, "visual.transformer.resblocks."),
                "mlp_ratio": mlp_ratio(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], width),
            }
            if "visual.ln_pre.weight" not in state:  # CLIPA's
                vision_cfg["ln_pre"] = False
            vision_cfg.update(_layer_scale(state, "visual.transformer.resblocks."))
            if "visual.attn_pool.query" in state:  # CoCa's
                vision_cfg.update(attentional_pool=True,
                                  attn_pooler_queries=state["visual.attn_pool.query"].shape[0])
        else:
            layers = [_count(state, f"visual.layer{i}.") for i in range(1, 5)]
            output_width = round(math.sqrt(state["visual.attnpool.positional_embedding"].shape[0] - 1))
            vision_cfg = {"image_size": output_width * 32, "layers": layers,
                          "width": state["visual.layer1.0.conv1.weight"].shape[0]}
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the architecture: key {exc.args[0]!r} is missing") from None
    config = {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if "text.cls_emb" in state:  # CoCa: a class token after the text, a captioning decoder
        text_cfg.update(context_length=text_cfg["context_length"] - 1, embed_cls=True)
        width = state["text_decoder.ln_final.weight"].shape[0]
        config["multimodal_cfg"] = {
            "context_length": text_cfg["context_length"],
            "vocab_size": state["text_decoder.text_projection"].shape[1], "width": width, "heads": width // 64,
            "layers": _count(state, "text_decoder.resblocks."),
            "mlp_ratio": mlp_ratio(state["text_decoder.resblocks.0.mlp.c_fc.weight"].shape[0], width)}
    _adopt_zoo_heads(config)
    if "logit_bias" in state:
        config["init_logit_bias"] = float(state["logit_bias"])
    return config


def _text_shape(cfg: dict) -> tuple:
    return tuple(cfg.get(k) for k in ("context_length", "vocab_size", "width", "layers")) + \
        (int(cfg.get("width", 0) * cfg.get("mlp_ratio", 4.0)),)


def _infer_convnext(state: dict, config: dict) -> dict:
    """A ConvNeXt model's architecture. Its image size and LayerNorm eps are not in the weights: they come from the
    zoo architecture with these shapes (open_clip's names), else 224 pixels and timm's 1e-6."""
    stages = _count(state, "visual.trunk.stages.")
    config["vision_cfg"] = {
        "image_size": 224, "depths": [_count(state, f"visual.trunk.stages.{i}.blocks.") for i in range(stages)],
        "dims": [state[f"visual.trunk.stages.{i}.blocks.0.conv_dw.weight"].shape[0] for i in range(stages)],
        "norm_eps": 1e-6, "proj": "mlp" if "visual.head.mlp.fc1.weight" in state else "linear"}
    shapes = ("depths", "dims", "proj")
    zoo = _zoo_match(lambda zoo: zoo["vision_cfg"].get("depths") is not None and
                     zoo["embed_dim"] == config["embed_dim"] and
                     all(zoo["vision_cfg"].get(k) == config["vision_cfg"][k] for k in shapes) and
                     _text_shape(zoo["text_cfg"]) == _text_shape(config["text_cfg"]))
    if zoo is not None:
        config["vision_cfg"].update(image_size=zoo["vision_cfg"]["image_size"],
                                    norm_eps=zoo["vision_cfg"].get("norm_eps", 1e-6))
        config["text_cfg"]["heads"] = zoo["text_cfg"].get("heads", config["text_cfg"]["heads"])
    return config


def _zoo_match(fits) -> dict | None:
    """The config of the first zoo architecture (in ``list_models`` order) for which ``fits(config)`` holds, or None.

    Where architectures of different image sizes fit (open_clip's ``convnext_base_w`` and ``convnext_base_w_320``,
    ``ViTamin-XL-256`` and ``-336``: the same weights' shapes), the weights cannot say which they are: the first is
    taken and a warning names the others and how to choose one."""
    import warnings

    from ..models import get_model_config, list_models

    found = [(name, zoo) for name in list_models() if fits(zoo := get_model_config(name))]
    if not found:
        return None
    sizes = {}
    for name, zoo in found:
        sizes.setdefault(zoo["vision_cfg"]["image_size"], name)
    if len(sizes) > 1:
        warnings.warn(f"these weights fit {' and '.join(f'{n} ({s} px)' for s, n in sizes.items())}, which differ "
                      f"only in what the weights do not show; read as {found[0][0]}: to read them as another, name it "
                      "(clipforge.load(NAME, pretrained=PATH), or --model NAME --pretrained PATH)", stacklevel=3)
    return found[0][1]


def _infer_timm_tower(state: dict, config: dict, towers: dict[str, dict], kind: str,
                      size_in_weights: bool = True) -> dict:
    """An image tower under timm's names (EVA, PE, timm's ViT, FastViT): the one of ``towers`` (timm name ->
    clipforge ``vision_cfg``) whose parameters have exactly these names and shapes (block kinds are not in the
    weights; timm's towers are few and all in the zoo). The zoo architecture with both towers' shapes gives the text
    tower's unseen settings (heads, causal mask ...) and, where the weights do not show it, the image size."""
    import torch

    from ..models.clip import build_vision_tower

    prefix = "visual."
    shapes = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    blocks = _count(state, "visual.trunk.blocks.")  # a transformer trunk's depth (FastViT's stages have none)

    def fits(cfg: dict) -> bool:
        if blocks and cfg.get("layers") != blocks:  # another depth: no need to build it to know
            return False
        with torch.device("meta"):  # names and shapes only: no memory, little time
            tower = build_vision_tower(cfg, config["embed_dim"], False)
        return {k: tuple(v.shape) for k, v in tower.state_dict().items()} == shapes

    config["vision_cfg"] = next((cfg for cfg in towers.values() if fits(cfg)), None)
    if config["vision_cfg"] is None:
        raise CheckpointError(f"an image tower with timm's {kind} names ({len(shapes)} tensors) that is none of the "
                              f"towers clipforge builds ({', '.join(towers)})")
    sizeless = {**config["vision_cfg"], "image_size": None}
    if size_in_weights and any(cfg["image_size"] != config["vision_cfg"]["image_size"] and
                               {**cfg, "image_size": None} == sizeless and fits(cfg) for cfg in towers.values()):
        size_in_weights = False  # the same tower at another size has the same shapes (ViTamin-XL: no position table)

    def key(vision: dict) -> dict:  # where the weights do not show the image size (FastViT), the zoo's is taken
        return vision if size_in_weights else {**vision, "image_size": None}

    zoo = _zoo_match(lambda zoo: key(zoo["vision_cfg"]) == key(config["vision_cfg"]) and
                     zoo["embed_dim"] == config["embed_dim"] and
                     _text_shape(zoo["text_cfg"]) == _text_shape(config["text_cfg"]))
    if zoo is not None:
        config["vision_cfg"]["image_size"] = zoo["vision_cfg"]["image_size"]
        config["text_cfg"].update({k: zoo["text_cfg"][k] for k in UNSEEN_SETTINGS["text_cfg"] if k in zoo["text_cfg"]})
    return config


def _infer_siglip(state: dict, text_cfg: dict) -> dict:
    """A SigLIP model's architecture; the MLP activation (exact or tanh GELU) is not in the weights: exact is assumed,
    name the architecture (``clipforge.load(NAME, pretrained=PATH)``) for a model that uses the other."""
    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    projection = state.get("text.text_projection.weight")
    text_cfg.update(causal=False, pool="last", proj="none" if projection is None else "linear", norm_eps=1e-6)
    config = {
        "embed_dim": width, "init_logit_bias": float(state.get("logit_bias", -10.0)), "logit_scale_max": None,
        "vision_cfg": {"image_size": patch * round(math.sqrt(state["visual.positional_embedding"].shape[0])),
                       "patch_size": patch, "width": width, "layers": _count(state, "visual.transformer.resblocks."),
                       "mlp_ratio": mlp_ratio(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], width),
                       "pool": "map", "norm_eps": 1e-6},
        "text_cfg": text_cfg,
    }
    _adopt_zoo_heads(config)
    return config


def _shape_signature(config: dict) -> tuple | None:
    """Everything about an architecture that weight shapes reveal (not the attention head count; of the image size,
    the pixels the patches cover: SigLIP's 384 px in 14-pixel patches are 27 patches, as 378 px are)."""
    from ..models import is_resnet

    try:
        def tower(cfg: dict, keys: tuple[str, ...], transformer: bool) -> tuple:
            hidden = int(cfg["width"] * cfg.get("mlp_ratio", 4.0)) if transformer else 0  # as built
            return tuple(str(cfg.get(k)) for k in keys) + (hidden, cfg.get("ls_init_value") is not None)

        vision = config["vision_cfg"]
        if isinstance(vision.get("patch_size"), int) and isinstance(vision.get("image_size"), int):
            vision = {**vision, "image_size": vision["image_size"] // vision["patch_size"] * vision["patch_size"]}
        return (config["embed_dim"],
                tower(vision, ("tower", "image_size", "patch_size", "width", "layers", "ln_pre", "attentional_pool"),
                      not is_resnet(config)),
                tower(config["text_cfg"], ("context_length", "vocab_size", "width", "layers"), True))
    except (KeyError, TypeError):  # e.g. a Hugging Face text tower: not comparable
        return None


# what weights do not show, taken from the zoo architecture with the same shapes
UNSEEN_SETTINGS = {"vision_cfg": ("head_width", "act", "pool", "final_ln_after_pool", "attn_pooler_heads",
                                  "ls_init_value"),
                   "text_cfg": ("heads", "act", "pool", "eos_id", "causal", "hf_tokenizer_name", "tokenizer_kwargs",
                                "pad_id", "correct_cls_mask", "ls_init_value"),
                   "multimodal_cfg": ("heads", "attn_pooler_heads", "n_queries", "dim_head")}


def _adopt_zoo_heads(config: dict) -> None:
    """Weights do not reveal how many attention heads split a width, which GELU a tower uses (SigLIP's), how it pools
    (CLIPA's mean of patches, MetaCLIP 2's end-of-text id) nor its tokenizer: OpenAI's CLIP is assumed (64-wide heads,
    exact GELU, class and EOT tokens), unless a zoo architecture has exactly these shapes, whose settings are taken
    (LAION's ViT-H/g/bigG use 80-104-wide heads; SigLIP 2's towers mostly tanh GELU, and its 256k vocabulary tells it
    from SigLIP's; CLIPA's 32-token BERT vocabulary and missing ln_pre, MetaCLIP 2's 901,629-token XLM-V). Others need
    their name: ``clipforge.load(NAME, pretrained=PATH)``. The zoo architecture's image size is taken too: where
    several sizes fit (ViT-SO400M-14-SigLIP-378 and -384), the first, with a warning (``_zoo_match``)."""
    signature = _shape_signature(config)
    zoo = None if signature is None else _zoo_match(lambda zoo: _shape_signature(zoo) == signature)
    if zoo is None:
        return
    for tower, keys in (*UNSEEN_SETTINGS.items(), ("vision_cfg", ("image_size",))):
        if tower in config and tower in zoo:
            config[tower].update({k: zoo[tower][k] for k in keys if k in zoo[tower]})
