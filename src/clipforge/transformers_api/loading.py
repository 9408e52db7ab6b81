"""From a name to a folder or a model: local folders and hub repos' files fetched once into the cache,
transformers' ``from_pretrained`` keywords, and the clipforge ``CLIP`` a ``from_pretrained`` wraps."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path, PurePosixPath

import torch

from ..files import read_json
from ..hub_tokenizer import is_hub_name
from ..models.clip import CLIP


def _folder(name_or_path: str | os.PathLike, names: tuple[str, ...], subfolder: str | None = None) -> Path:
    """A local folder, or a hub repo's ``names`` (those it has) fetched once into the cache; ``subfolder``: the one
    inside it that holds them (diffusers' ``text_encoder``, ``tokenizer``)."""
    from ..pretrained import fetch_hub_files

    inner = _inner(subfolder)
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / inner).is_dir():
            raise FileNotFoundError(f"{path}: no subfolder {inner!r}")
        return path / inner
    repo, root = _hub_cache(name_or_path)
    # one marker per set of names: the tokenizer's files and the processor's are asked for on their own
    marker = f".complete-{inner.replace('/', '--') + '--' if subfolder else ''}{'-'.join(names)}"
    return fetch_hub_files(repo, tuple(f"{inner}/{n}" if subfolder else n for n in names), root, marker) / inner


def _optional_files(name_or_path: str | os.PathLike, names: tuple[str, ...], subfolder: str | None = None) -> None:
    """``names`` a hub repo may also hold, asked for in a round of their own (its own marker, beside ``_folder``'s):
    a repo whose other files a clipforge from before these were asked for fetched still reads without the hub, and
    says what it could not ask for. Nothing to do for a local folder."""
    from ..pretrained import DownloadError

    if Path(name_or_path).is_dir():
        return
    try:
        _folder(name_or_path, names, subfolder)
    except DownloadError as exc:
        warnings.warn(f"{name_or_path}: could not ask for {', '.join(names)} ({exc}); read without", stacklevel=3)


def _model_type(name_or_path, options: dict) -> str | None:
    """The ``model_type`` of the model a folder or hub repo holds (its ``config.json``), None where it has none; for
    a hub repo never fetched whose config cannot be fetched now (offline), None too."""
    from ..pretrained import DownloadError

    try:
        with _hub_options("from_pretrained", {k: v for k, v in options.items() if k in _HUB_KEYWORDS}):
            folder = _folder(name_or_path, ("config.json",), options.get("subfolder"))
    except DownloadError:
        return None
    return _read_json(folder / "config.json").get("model_type")


def _inner(subfolder: str | None) -> str:
    """A ``subfolder`` keyword as a relative path inside the folder or repo ("." for none)."""
    inner = PurePosixPath(subfolder or ".")
    if inner.is_absolute() or ".." in inner.parts:
        raise ValueError(f"subfolder {subfolder!r}: a folder inside the model's folder or repo, not outside it")
    return str(inner)


def _hub_cache(name_or_path) -> tuple[str, Path]:
    """``(OWNER/NAME, where its files are kept)`` for a hub repo's name; anything else named."""
    from ..pretrained import cache_dir

    repo = str(name_or_path).removeprefix("hf-hub:")
    if Path(name_or_path).exists() or "/" not in repo or not is_hub_name(repo):
        raise ValueError(f"{name_or_path}: expected a model folder or a Hugging Face Hub repo (OWNER/NAME)")
    return repo, cache_dir() / "transformers-api" / repo.replace("/", "--")


def _model_folder(name_or_path, subfolder: str | None, variant: str | None) -> Path:
    """A model's folder with its config and weights: local, or a hub repo's (``subfolder`` of it) fetched once
    into the cache, the first weights transformers would take (``checkpoint.io.weight_file_names``' order)."""
    from ..checkpoint import CheckpointError
    from ..checkpoint.io import weight_files
    from ..pretrained import fetch_hub_file

    folder = _folder(name_or_path, ("config.json",), subfolder)
    if Path(name_or_path).is_dir():
        return folder
    try:
        if weight_files(folder, variant):
            return folder
    except CheckpointError:
        pass  # a shard missing: an earlier fetch was cut short, and what is missing is fetched below
    repo, root = _hub_cache(name_or_path)
    prefix = "" if subfolder is None else f"{_inner(subfolder)}/"
    weight_files(folder, variant, fetch=lambda name: fetch_hub_file(repo, prefix + name, root,
                                                                     progress=not name.endswith(".json")))
    return folder


# transformers' from_pretrained keywords that change nothing here: attention is PyTorch's fused kernel (explicit,
# as transformers' eager attention, where output_attentions asks for its maps), the tokenizer and image processor
# are this module's, the weights are read as they are
_HARMLESS = {"attn_implementation", "low_cpu_mem_usage", "use_safetensors", "trust_remote_code", "use_fast"}
_HUB_KEYWORDS = {"cache_dir", "local_files_only", "revision", "subfolder", "token", "use_auth_token"}


@contextlib.contextmanager
def _hub_options(kind: str, options: dict, own: tuple = ()):
    """transformers' hub keywords for a ``from_pretrained``: ``cache_dir`` (where hub files are kept),
    ``local_files_only`` (nothing fetched: offline), ``revision`` (the main branch only), ``subfolder`` (read by
    ``_folder``), ``token`` (sent to the hub for a gated or private repo; True: the one ``pretrained.hub_token`` finds
    anyway); ``own``: the class's other keywords; anything else is named as not built."""
    from ..pretrained import cache_at, token_at

    unknown = set(options) - _HARMLESS - _HUB_KEYWORDS - set(own)
    if unknown:
        raise TypeError(f"{kind}: {', '.join(sorted(unknown))} not built here")
    if options.get("revision") not in (None, "main"):
        raise ValueError("revision: only a hub repo's main branch is fetched here")
    offline, before = options.get("local_files_only"), os.environ.get("CLIPFORGE_OFFLINE")
    if offline:
        os.environ["CLIPFORGE_OFFLINE"] = "1"
    token = options.get("token", options.get("use_auth_token"))  # use_auth_token: transformers 4's older name
    try:
        with cache_at(options.get("cache_dir")), token_at(token if isinstance(token, str) else None):
            yield
    finally:
        if offline and before is None:
            del os.environ["CLIPFORGE_OFFLINE"]
        elif offline:
            os.environ["CLIPFORGE_OFFLINE"] = before


def _read_json(path: Path) -> dict:
    """A folder's JSON file, or {} where it has none."""
    return read_json(path) if path.is_file() else {}


def _load_clip(name_or_path, dtype, device_map, options: dict) -> CLIP:
    from .. import load_model
    from ..checkpoint.hf import TOWER_TYPES

    name = os.fspath(name_or_path)
    with _hub_options("from_pretrained", options):
        if options.get("subfolder") is not None:
            name = os.fspath(_model_folder(name, options["subfolder"], None))
        tower_type = _read_json(Path(name) / "config.json").get("model_type") if os.path.isdir(name) else None
        if tower_type in TOWER_TYPES:
            kind = {"clip": "CLIP", "siglip": "Siglip", "siglip2": "Siglip2"}[TOWER_TYPES[tower_type][0]]
            raise ValueError(f"{name}: a transformers {tower_type} folder (one tower alone, as diffusers' text "
                             f"encoders are): load it with {kind}TextModel / {kind}VisionModel.from_pretrained")
        if not os.path.exists(name) and not name.startswith("hf-hub:"):
            if "/" not in name or not is_hub_name(name):
                raise ValueError(f"{name}: expected a model folder, a checkpoint file or a Hugging Face Hub repo "
                                 "(OWNER/NAME); zoo names load with clipforge.load")
            name = f"hf-hub:{name}"
        clip = load_model(name)
    return _placed(_checked_clip(clip, name_or_path), dtype, device_map)


def _checked_clip(clip, name_or_path) -> CLIP:
    if type(clip) is not CLIP:
        raise ValueError(f"{name_or_path}: a {type(clip).__name__}, not a CLIP model")
    return clip


def _placed(model: torch.nn.Module, dtype, device_map) -> torch.nn.Module:
    """``model`` in ``from_pretrained``'s ``dtype`` and on its ``device_map`` (one device, or "auto")."""
    if dtype not in (None, "auto"):
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if isinstance(device_map, dict):
        raise ValueError("device_map: one device (a string or torch.device) or 'auto'; models are not split here")
    if device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device_map) if device_map is not None else model


@contextlib.contextmanager
def _checkpoint_processor_files(name_or_path, subfolder: str | None, own: tuple[str, ...]):
    """For a checkpoint in another format than transformers' (a clipforge or open_clip folder, an OpenAI or open_clip
    file: what ``CLIPModel.from_pretrained`` reads too) without the files ``own`` names, the tokenizer and image
    processor files ``clipforge convert --to hf`` writes for it, in a temporary folder for the time of the ``with``;
    None for anything else (a transformers folder without them stays an error, as in transformers)."""
    import tempfile
    from types import SimpleNamespace

    from .. import read_model_config
    from ..checkpoint import CheckpointError, read_preprocess_cfg
    from ..checkpoint.hf import MODEL_TYPES, save_clip_tokenizer, save_image_processor, save_own_tokenizer

    path = Path(name_or_path)
    if subfolder is not None or not path.exists() or any((path / name).is_file() for name in own) or \
            _read_json(path / "config.json").get("model_type") in MODEL_TYPES:
        yield None
        return
    try:
        config = read_model_config(os.fspath(path))
    except CheckpointError:  # not a checkpoint (an empty folder): the caller's own error says what is missing
        yield None
        return
    size = config["vision_cfg"].get("image_size")
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    if "hf_model_name" in config["text_cfg"] or not isinstance(size, int):  # what convert --to hf refuses too
        yield None
        return
    model = SimpleNamespace(config=config, image_size=size, normalisation=read_preprocess_cfg(path))
    with tempfile.TemporaryDirectory(prefix="clipforge-processor-") as folder:
        save_image_processor(model, folder)
        (save_own_tokenizer if "hf_tokenizer_name" in config["text_cfg"] else save_clip_tokenizer)(model, folder)
        yield Path(folder)
