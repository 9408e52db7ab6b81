"""Checkpoint files in and out: read any supported file or folder into clipforge's layout, write clipforge folders
and safetensors, and load a state dict into a model with errors that name the key.

Nothing is unpickled unless the caller says the file is trusted: ``.pt``/``.bin`` files go through
``torch.load(weights_only=True)`` and OpenAI's TorchScript archives through ``torch.jit.load``, which builds only
TorchScript types.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ..files import atomic_path, write_json
from . import hf, openai, timm_siglip
from .errors import CheckpointError
from .infer import infer_config

CONFIG_NAME = "config.json"
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "model.safetensors"
# Foreign key layouts, each a module with ``matches(state)`` and ``to_clipforge(state)``; a new format is one more
# module in this tuple. clipforge's own layout (``text.*``) needs no conversion.
FORMATS = (timm_siglip, hf, openai)


# ----------------------------------------------------------------------------------------------------------- writing

def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def savable_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict for writing as a checkpoint, refused for a model whose tower was pruned
    (``prune_intermediate_layers``: blocks or a projection gone, which its config still names, so that no format
    would load it back)."""
    pruned = sorted({name.split(".")[0] or "model" for name, m in model.named_modules() if getattr(m, "pruned", False)})
    if pruned:
        raise CheckpointError(f"{' and '.join(pruned)}: pruned by prune_intermediate_layers, so the model's config no "
                              "longer describes it; save the model before pruning (and prune again after loading)")
    return model.state_dict()


def save_pretrained(model, folder: str | os.PathLike, config: dict | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (the architecture) for ``clipforge.load``."""
    folder = Path(folder)
    state = savable_state(model)
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        config = infer_config(state)
    from ..hub_tokenizer import copy_tokenizer_files, without_local_tokenizer_path

    source, config = config, without_local_tokenizer_path(config)  # SigLIP's tokenizer: its files, not its path
    save_safetensors(state, folder / WEIGHTS_NAME, {"format": "pt", "clipforge_config": json.dumps(config)})
    preprocess = getattr(model, "normalisation", None)  # the weights' own preprocessing (a DFN tag's squash, say)
    write_json(folder / CONFIG_NAME, {"format": "clipforge", "model_cfg": config,
                                      **({"preprocess_cfg": preprocess} if preprocess else {})})
    copy_tokenizer_files(source, folder)
    return folder


def read_preprocess_cfg(path: str | os.PathLike) -> dict:
    """``Preprocess`` arguments a checkpoint folder records beside its weights (``preprocess_cfg`` in clipforge's
    ``config.json`` or open_clip's ``open_clip_config.json``; a Hugging Face folder's image processor,
    ``hf.read_image_processor``); empty where it records none (OpenAI's)."""
    path = Path(path)
    if not path.is_dir():
        return {}
    try:
        config_file = next((path / n for n in (CONFIG_NAME, OPEN_CLIP_CONFIG_NAME) if (path / n).is_file()), None)
        config = json.loads(config_file.read_text()) if config_file else {}
        if "preprocess_cfg" in config:
            found = config["preprocess_cfg"]
        else:
            found = hf.processor_preprocess(hf.read_image_processor(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable preprocessing settings ({exc})") from None
    from ..preprocess import PREPROCESS_KEYS

    return {k: tuple(v) if isinstance(v, list) else v for k, v in found.items() if v and k in PREPROCESS_KEYS}


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
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle objects other than tensors ({str(exc).splitlines()[0]}). If you trust this "
            "file, pass trust_pickle=True (CLI: --trust-pickle); better, convert it once to safetensors."
        ) from None
    if isinstance(obj, torch.jit.ScriptModule):
        obj = obj.state_dict()
    return obj, None


def weight_file_names(variant: str | None = None, open_clip: bool = False) -> list[str]:
    """The names a folder's weights may have, in the order transformers takes them: ``model.safetensors``, a sharded
    checkpoint's ``model.safetensors.index.json``, then the pickles (``pytorch_model.bin``, its index); with
    ``variant`` (diffusers' "fp16") ``model.fp16.safetensors`` and so on; with ``open_clip``, open_clip's names
    after transformers' of the same kind (safetensors before any pickle)."""
    stem = f"model.{variant}" if variant else "model"
    safetensors, pickles = [f"{stem}.safetensors"], [f"pytorch_{stem}.bin"]
    if open_clip:
        safetensors.append("open_clip_model.safetensors")
        pickles.append("open_clip_pytorch_model.bin")
    return safetensors + [f"{stem}.safetensors.index.json"] + pickles + [f"pytorch_{stem}.bin.index.json"]


def weight_files(folder: Path, variant: str | None = None, fetch=None, open_clip: bool = False) -> list[Path]:
    """A folder's weight files: the first of ``weight_file_names`` it holds, or the shards its index lists. ``fetch``
    (a hub repo's files: ``name -> Path or None``) is asked for each name in turn where given; by default a name is
    looked for in ``folder``. Empty where there are none; a shard its index lists but which is not there raises."""
    fetch = fetch or _in_folder(folder)
    for name in weight_file_names(variant, open_clip):
        found = fetch(name)
        if found is not None:
            return index_shards(found, fetch) if name.endswith(".index.json") else [found]
    return []


def index_shards(index: Path, fetch=None) -> list[Path]:
    """The shard files a sharded checkpoint's index (``model.safetensors.index.json``) lists, beside it (or as
    ``fetch`` gives them: ``weight_files``)."""
    fetch = fetch or _in_folder(index.parent)
    shards = {name: fetch(name) for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))}
    missing = [name for name, found in shards.items() if found is None]
    if missing:
        raise CheckpointError(f"{index}: shard {missing[0]} is missing")
    return list(shards.values())


def _in_folder(folder: Path):
    """``weight_files``' default ``fetch``: a name's file in ``folder``, or None."""
    return lambda name: folder / name if (folder / name).is_file() else None


def read_weight_files(files: list[Path], trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``weight_files``, as they are stored (no renaming)."""
    tensors = {}
    for path in files:
        try:
            tensors.update(_read_file(path, trust_pickle)[0])
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return tensors


SHARDED = "sharded"  # the subfolder of a --fsdp step folder that torch.distributed.checkpoint writes


def is_sharded_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SHARDED / ".metadata").exists()


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read any supported checkpoint into ``(state_dict in clipforge layout, config or None)``.

    Accepts OpenAI ``.pt`` (TorchScript or state dict), open_clip state dicts and training checkpoints (SigLIP's timm
    towers included), Hugging Face ``CLIPModel`` and ``SiglipModel`` folders (safetensors or bin), clipforge folders
    and single safetensors files.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    config = None
    try:
        if is_sharded_checkpoint(path):  # a --fsdp training checkpoint (DCP)
            from ..train.fsdp import read_sharded_weights

            return read_sharded_weights(path)
        if path.is_dir():
            files = weight_files(path, open_clip=True)  # several: a large transformers model's shards
            if not files:
                raise CheckpointError(f"{path}: folder holds none of {', '.join(weight_file_names(open_clip=True))}")
            tensors, config = (_read_file(files[0], trust_pickle) if len(files) == 1 else
                               (read_weight_files(files, trust_pickle), None))
            folder_config, is_hf = _folder_config(path)
            if is_hf:
                return hf.to_clipforge(tensors), folder_config
            config = folder_config or config
        elif path.name.endswith(".index.json"):  # a sharded checkpoint's index: its shards lie beside it
            tensors = read_weight_files(index_shards(path), trust_pickle)
        else:
            tensors, config = _read_file(path, trust_pickle)
        if (config or {}).get("objective", "contrastive") != "contrastive":
            return tensors, config  # an image tower trained another way (clipforge.bow): its own layout
    except CheckpointError:
        raise
    except Exception as exc:  # truncated zips, bad headers, broken JSON: say which file, not where in torch
        raise CheckpointError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return to_clipforge_state_dict(tensors, source=str(path)), config


def _folder_config(folder: Path) -> tuple[dict | None, bool]:
    """``(the model config a checkpoint folder's JSON names, whether it is a Hugging Face folder)``: clipforge's
    ``config.json`` (its ``model_cfg``), a transformers ``config.json`` or open_clip's ``open_clip_config.json``
    (translated, or refused by name); None where the folder names none."""
    config_file = folder / CONFIG_NAME
    folder_config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if hf.is_clip_config(folder_config):
        config = hf.config_to_clipforge(folder_config)
        added = hf.added_tokens_settings(folder, config)  # a textual inversion's placeholders, matched as transformers
        if added:
            config["text_cfg"]["tokenizer_kwargs"] = {**config["text_cfg"].get("tokenizer_kwargs", {}), **added}
        return config, True
    open_clip_config = folder / OPEN_CLIP_CONFIG_NAME  # an open_clip model folder (local-dir:, a hub repo)
    if not folder_config and open_clip_config.exists():
        folder_config = json.loads(open_clip_config.read_text())
        if folder_config.get("model_cfg"):  # as a hub repo's: translated, or refused by name
            folder_config["model_cfg"] = openai.config_from_open_clip(folder_config["model_cfg"], str(folder))
    return folder_config.get("model_cfg"), False


def read_config(path: str | os.PathLike) -> dict | None:
    """The model config a checkpoint folder names, without reading its weights (None: a file, or a folder naming
    none, whose architecture ``read_checkpoint`` reads off the weights)."""
    path = Path(path)
    if not path.is_dir() or is_sharded_checkpoint(path):
        return None
    try:
        return _folder_config(path)[0]
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read its config ({type(exc).__name__}: {exc})") from None


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
    """A state dict (or a training checkpoint holding one) in any known key layout -> clipforge's layout."""
    try:
        state = _unwrap(obj)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    for layout in FORMATS:
        if layout.matches(state):
            return layout.to_clipforge(state)
    if any(k.startswith("text.") for k in state):
        return dict(state)
    raise CheckpointError(f"{source}: not a CLIP checkpoint (no text tower found among keys such as "
                          f"{', '.join(list(state)[:5])})")


def resize_positions(state: dict, model: torch.nn.Module) -> dict:
    """``state`` with its image position grid and text positions resized to ``model``'s, as open_clip does when a
    model is asked for another image size or context length than its weights' (``force_image_size`` /
    ``force_context_length``): the grid bicubically with antialiasing, a class token's position kept (CLIP's ViT
    as open_clip's ``resize_pos_embed``; SigLIP's and the timm-named trunks' ``pos_embed`` as timm's
    ``set_input_size``, which open_clip calls for them); text positions linearly. Rotary positions are computed for
    the model's own grid. Anything else that does not fit is left for ``load_into`` to name."""
    import torch.nn.functional as F

    expected, state = model.state_dict(), dict(state)
    for key in ("visual.positional_embedding", "visual.trunk.pos_embed"):
        if _resizable(state, expected, key):
            state[key] = _resized_grid(state[key], len(expected[key][..., 0].flatten()))
    key = "text.positional_embedding"
    if _resizable(state, expected, key):
        state[key] = F.interpolate(state[key].T[None], size=len(expected[key]), mode="linear",
                                   align_corners=False)[0].T
    return state


def _resized_grid(old: torch.Tensor, positions: int) -> torch.Tensor:
    """A square grid of positions ([L, width] or timm's [1, L, width]), after a class token's position when there is
    one, resized to ``positions`` in all; unchanged when neither reading makes both grids square."""
    import torch.nn.functional as F

    rows = old.reshape(-1, old.shape[-1])
    for prefix in (1, 0):  # a class token's position first, or none (SigLIP; a class token without one)
        side, size = math.isqrt(len(rows) - prefix), math.isqrt(positions - prefix)
        if side * side + prefix == len(rows) and size * size + prefix == positions:
            grid = rows[prefix:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            resized = torch.cat([rows[:prefix], grid.permute(0, 2, 3, 1).reshape(size * size, -1).to(rows.dtype)])
            return resized.reshape(*old.shape[:-2], positions, old.shape[-1])
    return old


def _resizable(state: dict, expected: dict, key: str) -> bool:
    """Both hold ``key`` as [positions, width] (or [1, positions, width]) of the same width and a different number of
    positions."""
    old, new = state.get(key), expected.get(key)
    return old is not None and new is not None and old.dim() == new.dim() and old.dim() in (2, 3) \
        and old.shape[:-2] == new.shape[:-2] and old.shape[-1] == new.shape[-1] and old.shape[-2] != new.shape[-2]


def load_into(model: torch.nn.Module, state: dict, source: str = "checkpoint"):
    """``load_state_dict`` with errors that name the key and both shapes; returns its missing and unexpected keys
    (only batch-norm counters can be missing, and none unexpected but what old savers added and no model uses)."""
    expected = model.state_dict()
    # what older transformers and open_clip versions saved with a Hugging Face text tower and this model does not use:
    # position ids (a buffer, not weights) and the pooler head of a mean-pooled tower
    state = {k: v for k, v in state.items() if k in expected or not (k.endswith(".position_ids") or
                                                                     k.startswith("text.transformer.pooler."))}
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
    return model.load_state_dict(state, strict=False)
