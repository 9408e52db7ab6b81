"""Checkpoint formats: read OpenAI, open_clip, Hugging Face and clipforge weights; write clipforge, HF and OpenAI.

Every reader returns a state dict in clipforge's key layout (``visual.*`` for the image tower, ``text.*`` for the
text tower, ``logit_scale``), which is OpenAI's layout with the text tower under ``text.``. Nothing is unpickled
unless the caller says the file is trusted: ``.pt``/``.bin`` files go through ``torch.load(weights_only=True)`` and
OpenAI's TorchScript archives through ``torch.jit.load``, which builds only TorchScript types.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FOLDER_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
# OpenAI's TorchScript archives carry these as attributes; they are not weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
_OPENAI_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file or key."""


# ----------------------------------------------------------------------------------------------------------- writing

@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def save_pretrained(model, folder: str | os.PathLike, config: dict | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (the architecture) for ``clipforge.load``."""
    folder = Path(folder)
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        config = infer_config(model.state_dict())
    save_safetensors(model.state_dict(), folder / WEIGHTS_NAME, {"format": "pt", "clipforge_config": json.dumps(config)})
    write_json(folder / CONFIG_NAME, {"format": "clipforge", "model_cfg": config})
    return folder


# ----------------------------------------------------------------------------------------------------------- reading

def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _read_file(path: Path, trust_pickle: bool) -> tuple[dict, dict | None]:
    """Raw tensors and, where the file carries one, its clipforge config."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        config = json.loads(meta["clipforge_config"]) if "clipforge_config" in meta else None
        return tensors, config
    if _is_torchscript(path):
        # OpenAI's released .pt files are TorchScript archives (what openai/CLIP's clip.load reads). Every one of
        # those models uses QuickGELU, which the weights alone cannot tell: return that as a partial config.
        return torch.jit.load(str(path), map_location="cpu").state_dict(), {"quick_gelu": True}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except __import__("pickle").UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle objects other than tensors ({str(exc).splitlines()[0]}). If you trust this "
            "file, pass trust_pickle=True (CLI: --trust-pickle); better, convert it once to safetensors."
        ) from None
    if isinstance(obj, torch.jit.ScriptModule):
        obj = obj.state_dict()
    return obj, None


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read any supported checkpoint into ``(state_dict in clipforge layout, config or None)``.

    Accepts OpenAI ``.pt`` (TorchScript or state dict), open_clip state dicts and training checkpoints, Hugging Face
    ``CLIPModel`` folders (safetensors or bin), clipforge folders and single safetensors files.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    config = None
    try:
        if path.is_dir():
            config_file = path / CONFIG_NAME
            folder_config = json.loads(config_file.read_text()) if config_file.exists() else {}
            weights = next((path / n for n in _FOLDER_WEIGHTS if (path / n).exists()), None)
            if weights is None:
                raise CheckpointError(f"{path}: folder holds none of {', '.join(_FOLDER_WEIGHTS)}")
            tensors, config = _read_file(weights, trust_pickle)
            if folder_config.get("model_type") == "clip" or "CLIPModel" in folder_config.get("architectures", []):
                return hf_to_clipforge(tensors), hf_config_to_clipforge(folder_config)
            config = folder_config.get("model_cfg", config)
        else:
            tensors, config = _read_file(path, trust_pickle)
    except CheckpointError:
        raise
    except Exception as exc:  # truncated zips, bad headers, broken JSON: say which file, not where in torch
        raise CheckpointError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return to_clipforge_state_dict(tensors, source=str(path)), config


def _unwrap(obj) -> dict:
    """Training checkpoints nest the weights (``{"state_dict": ...}``) and DDP prefixes them with ``module.``."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the file holds no state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def to_clipforge_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    try:
        state = _unwrap(obj)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        return hf_to_clipforge(state)
    if "text.token_embedding.weight" in state or any(k.startswith("text.") for k in state):
        return dict(state)
    if "token_embedding.weight" in state:
        return openai_to_clipforge(state)
    raise CheckpointError(f"{source}: not a CLIP checkpoint (no text tower found among keys such as "
                          f"{', '.join(list(state)[:5])})")


def openai_to_clipforge(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key in _NON_WEIGHT_KEYS or key.endswith("attn_mask"):
            continue
        out["text." + key if key.startswith(_OPENAI_TEXT_PREFIXES) else key] = value
    return out


def clipforge_to_openai(state: dict) -> dict:
    """OpenAI/open_clip key layout (the text tower at the top level); loads into both of them."""
    return {(k[len("text."):] if k.startswith("text.") else k): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------- Hugging Face

_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
_HF_TOP = {
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
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text.text_projection"}
_HF_TOWERS = {"text_model.encoder.layers.": "text.transformer.resblocks.",
              "vision_model.encoder.layers.": "visual.transformer.resblocks."}


def hf_to_clipforge(state: dict) -> dict:
    state = {k[len("clip."):] if k.startswith("clip.") else k: v for k, v in state.items()}
    out, qkv = {}, {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.T.contiguous()
        else:
            prefix = next((p for p in _HF_TOWERS if key.startswith(p)), None)
            if prefix is None:
                raise CheckpointError(f"unexpected Hugging Face CLIP key {key!r}")
            index, rest = key[len(prefix):].split(".", 1)
            base = f"{_HF_TOWERS[prefix]}{index}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                proj, kind = rest.split(".")[1:]
                qkv.setdefault((base, kind), {})[proj[0]] = value
                continue
            for hf_name, ours in _HF_BLOCK.items():
                if rest.startswith(hf_name + "."):
                    out[base + ours + rest[len(hf_name):]] = value
                    break
            else:
                raise CheckpointError(f"unexpected Hugging Face CLIP key {key!r}")
    for (base, kind), parts in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def clipforge_to_hf(state: dict) -> dict:
    if "visual.proj" not in state:
        raise CheckpointError("Hugging Face CLIPModel has no ResNet image tower; only ViT models export to HF")
    top = {v: k for k, v in _HF_TOP.items()}
    transposed = {v: k for k, v in _HF_TRANSPOSED.items()}
    towers = {v: k for k, v in _HF_TOWERS.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.T.contiguous()
        elif key == "logit_bias":
            raise CheckpointError("Hugging Face CLIPModel has no logit_bias (SigLIP models do not export to CLIPModel)")
        else:
            prefix = next(p for p in towers if key.startswith(p))
            index, rest = key[len(prefix):].split(".", 1)
            base = f"{towers[prefix]}{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            ours = next(o for o in block if rest.startswith(o + "."))
            out[base + block[ours] + rest[len(ours):]] = value
    return out


def _mlp_ratio(hidden: int, width: int) -> float:
    """The ratio for which the model's ``int(width * ratio)`` gives back ``hidden``: plain ``hidden / width`` can land
    a rounding error below (448 * (453 / 448) = 452.99999999999994), and a model built from it would not fit."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def hf_config_to_clipforge(hf: dict) -> dict:
    text, vision = hf["text_config"], hf["vision_config"]
    for tower in (text, vision):
        if tower.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"unsupported Hugging Face activation {tower['hidden_act']!r}")
    return {
        "embed_dim": hf.get("projection_dim", 512),
        "vision_cfg": {
            "image_size": vision["image_size"], "patch_size": vision["patch_size"], "width": vision["hidden_size"],
            "layers": vision["num_hidden_layers"], "head_width": vision["hidden_size"] // vision["num_attention_heads"],
            "mlp_ratio": _mlp_ratio(vision["intermediate_size"], vision["hidden_size"]),
            "quick_gelu": vision.get("hidden_act", "quick_gelu") == "quick_gelu",
        },
        "text_cfg": {
            "context_length": text.get("max_position_embeddings", 77), "vocab_size": text.get("vocab_size", 49408),
            "width": text["hidden_size"], "heads": text["num_attention_heads"], "layers": text["num_hidden_layers"],
            "mlp_ratio": _mlp_ratio(text["intermediate_size"], text["hidden_size"]),
            "quick_gelu": text.get("hidden_act", "quick_gelu") == "quick_gelu",
        },
    }


def clipforge_config_to_hf(config: dict, logit_scale: float) -> dict:
    vision, text = config["vision_cfg"], config["text_cfg"]
    if isinstance(vision["layers"], (list, tuple)):
        raise CheckpointError("Hugging Face CLIPModel has no ResNet image tower; only ViT models export to HF")
    top_gelu = config.get("quick_gelu", False)
    act = lambda cfg: "quick_gelu" if cfg.get("quick_gelu", top_gelu) else "gelu"  # noqa: E731
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config["embed_dim"],
        "logit_scale_init_value": logit_scale,
        "text_config": {
            "hidden_size": text["width"], "intermediate_size": int(text["width"] * text.get("mlp_ratio", 4.0)),
            "num_attention_heads": text.get("heads", text["width"] // 64), "num_hidden_layers": text["layers"],
            "max_position_embeddings": text["context_length"], "vocab_size": text["vocab_size"],
            "hidden_act": act(text), "layer_norm_eps": 1e-5, "projection_dim": config["embed_dim"],
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "model_type": "clip_text_model",
        },
        "vision_config": {
            "hidden_size": vision["width"], "intermediate_size": int(vision["width"] * vision.get("mlp_ratio", 4.0)),
            "num_attention_heads": vision["width"] // vision.get("head_width", 64),
            "num_hidden_layers": vision["layers"], "image_size": vision["image_size"],
            "patch_size": vision["patch_size"], "num_channels": 3, "hidden_act": act(vision), "layer_norm_eps": 1e-5,
            "projection_dim": config["embed_dim"], "model_type": "clip_vision_model",
        },
    }


# -------------------------------------------------------------------------------------------------- architecture

def _count(state: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def infer_config(state: dict) -> dict:
    """Rebuild the architecture from weight shapes, as openai/CLIP's ``build_model`` does."""
    try:
        text_width = state["text.ln_final.weight"].shape[0]
        text_layers = _count(state, "text.transformer.resblocks.")
        text_cfg = {
            "context_length": state["text.positional_embedding"].shape[0],
            "vocab_size": state["text.token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": text_width // 64,
            "layers": text_layers,
            "mlp_ratio": _mlp_ratio(state["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], text_width),
        }
        embed_dim = state["text.text_projection"].shape[1]
        if "visual.proj" in state:
            width = state["visual.conv1.weight"].shape[0]
            patch = state["visual.conv1.weight"].shape[-1]
            grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
            vision_cfg = {
                "image_size": patch * grid, "patch_size": patch, "width": width,
                "layers": _count(state, "visual.transformer.resblocks."),
                "mlp_ratio": _mlp_ratio(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], width),
            }
        else:
            layers = [_count(state, f"visual.layer{i}.") for i in range(1, 5)]
            output_width = round(math.sqrt(state["visual.attnpool.positional_embedding"].shape[0] - 1))
            vision_cfg = {"image_size": output_width * 32, "layers": layers,
                          "width": state["visual.layer1.0.conv1.weight"].shape[0]}
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the architecture: key {exc.args[0]!r} is missing") from None
    config = {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    _adopt_zoo_heads(config)
    if "logit_bias" in state:
        config["init_logit_bias"] = float(state["logit_bias"])
    return config


def _shape_signature(config: dict) -> tuple | None:
    """Everything about an architecture that weight shapes reveal (not the attention head count)."""
    try:
        def tower(cfg: dict, keys: tuple[str, ...]) -> tuple:
            hidden = int(cfg["width"] * cfg.get("mlp_ratio", 4.0)) if isinstance(cfg["layers"], int) else 0  # as built
            return tuple(str(cfg.get(k)) for k in keys) + (hidden,)

        return (config["embed_dim"], tower(config["vision_cfg"], ("image_size", "patch_size", "width", "layers")),
                tower(config["text_cfg"], ("context_length", "vocab_size", "width", "layers")))
    except (KeyError, TypeError):  # e.g. a Hugging Face text tower: not comparable
        return None


def _adopt_zoo_heads(config: dict) -> None:
    """Weights do not reveal how many attention heads split a width: 64-wide heads (OpenAI's) are assumed, unless
    a zoo architecture has exactly these shapes, whose head layout is taken (LAION's ViT-H/g/bigG use 80-104).
    Other architectures with other head widths need their name: ``clipforge.load(NAME, pretrained=PATH)``."""
    from .models import get_model_config, list_models

    signature = _shape_signature(config)
    for name in list_models():
        zoo = get_model_config(name)
        if _shape_signature(zoo) != signature:
            continue
        if "head_width" in zoo["vision_cfg"]:
            config["vision_cfg"]["head_width"] = zoo["vision_cfg"]["head_width"]
        if "heads" in zoo["text_cfg"]:
            config["text_cfg"]["heads"] = zoo["text_cfg"]["heads"]
        return


def load_into(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """``load_state_dict`` with errors that name the key and both shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:4])}")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source} does not fit the model: {key!r} has shape {tuple(value.shape)} in the "
                                  f"checkpoint but {tuple(expected[key].shape)} in the model")
    model.load_state_dict(state, strict=False)
