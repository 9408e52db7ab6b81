"""Pretrained tags: where public weights live, and a download cache that never keeps a partial or wrong file.

Files land in ``$CLIPFORGE_CACHE`` (default ``~/.cache/clipforge``) under a name derived from the URL. A download
streams into a temporary file beside the final one, is checked against its SHA-256 (from the registry, or the
server's ETag for Hugging Face LFS files) and only then renamed into place. With ``CLIPFORGE_OFFLINE=1`` (or
``HF_HUB_OFFLINE=1``) nothing is fetched: cached files are used and anything else is a clear error.

``pretrained.json`` holds every tag open_clip has for an architecture clipforge builds, with its file, activation
and image preprocessing as open_clip's registry gives them (``tests/test_parity.py`` compares the two). One
deliberate difference: ViT-B-16-plus-240 ``laion400m_e32`` names its release file, since open_clip's Hugging Face
name for that tag is the ``laion400m_e31`` repository.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


QUICKGELU_SUFFIX = "-quickgelu"


class DownloadError(RuntimeError):
    """A pretrained file could not be fetched or failed verification; nothing was cached."""


class NotFoundError(DownloadError):
    """The server has no such file (HTTP 404)."""


@dataclass(frozen=True)
class PretrainedSource:
    url: str
    sha256: str | None = None
    quick_gelu: bool = False
    fallback_url: str | None = None  # tried when ``url`` does not exist (older Hugging Face repos: no safetensors)
    # the weights' own preprocessing where it is not OpenAI's (``Preprocess`` arguments)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize_mode: str | None = None
    interpolation: str | None = None
    # tried in order after ``url``, before the fallback: a transformers repo's other weight files (a ``.index.json``
    # is a sharded checkpoint's index); ``checkpoint.io.weight_file_names`` orders them
    alternative_urls: tuple[str, ...] = ()

    @property
    def urls(self) -> tuple[str, ...]:
        """Every place these weights may be, in the order they are tried."""
        return (self.url, *self.alternative_urls, *((self.fallback_url,) if self.fallback_url else ()))

    @property
    def preprocess(self) -> dict:
        """``Preprocess`` keyword arguments these weights need (empty: OpenAI's)."""
        from .preprocess import PREPROCESS_KEYS  # here: this module does not import torch

        return {k: getattr(self, k) for k in PREPROCESS_KEYS if getattr(self, k)}


_REGISTRY: dict[tuple[str, str], PretrainedSource] = {}


def _load_builtin() -> None:
    data = json.loads((resources.files(__package__) / "pretrained.json").read_text())
    for model, tags in data.items():
        for tag, entry in tags.items():
            url, fallback = entry.get("url"), None
            if url is None:  # open_clip's files in a Hugging Face repo: safetensors where present, else its .bin
                owner, name, *file = entry["hf_hub"].split("/", 2)  # or the one file named (ViTamin's)
                repo = f"https://huggingface.co/{owner}/{name}/resolve/main"
                url, fallback = (f"{repo}/{file[0]}", None) if file else \
                    (f"{repo}/open_clip_model.safetensors", f"{repo}/open_clip_pytorch_model.bin")
            sha = entry.get("sha256")
            if sha is None and "openaipublic" in url:  # OpenAI put each file's SHA-256 in its URL
                sha = url.rstrip("/").split("/")[-2]
            mean, std = (tuple(entry[k]) if k in entry else None for k in ("mean", "std"))
            _REGISTRY[(model, tag)] = PretrainedSource(url, sha, entry.get("quick_gelu", False), fallback, mean, std,
                                                       entry.get("resize_mode"), entry.get("interpolation"))


def register_pretrained(model: str, tag: str, url: str, sha256: str | None = None, quick_gelu: bool = False,
                        fallback_url: str | None = None) -> None:
    """Add (or replace) a pretrained tag, e.g. for weights on a private server."""
    if not _REGISTRY:
        _load_builtin()
    _REGISTRY[(model, tag)] = PretrainedSource(url, sha256, quick_gelu, fallback_url)


def list_pretrained(model: str | None = None) -> list[tuple[str, str]]:
    if not _REGISTRY:
        _load_builtin()
    base = None if model is None else base_model_name(model)
    return sorted(key for key in _REGISTRY if base is None or key[0] == base)


def base_model_name(name: str) -> str:
    """open_clip's ``NAME-quickgelu`` is the architecture NAME with QuickGELU: its tags are NAME's."""
    return name[:-len(QUICKGELU_SUFFIX)] if name.lower().endswith(QUICKGELU_SUFFIX) else name


def get_pretrained(model: str, tag: str) -> PretrainedSource:
    if not _REGISTRY:
        _load_builtin()
    key = (base_model_name(model.replace("/", "-")), tag)
    if key not in _REGISTRY:
        tags = [t for m, t in list_pretrained(key[0])]
        raise ValueError(f"no pretrained tag {tag!r} for model {model!r}; known tags: {', '.join(tags) or 'none'}")
    return _REGISTRY[key]


_CACHE_OVERRIDE: ContextVar[Path | None] = ContextVar("clipforge_cache_override", default=None)


def cache_dir() -> Path:
    return _CACHE_OVERRIDE.get() or Path(os.environ.get("CLIPFORGE_CACHE", Path.home() / ".cache" / "clipforge"))


@contextmanager
def cache_at(directory: str | os.PathLike | None):
    """Within the block, downloads (weights, hub configs, tokenizer files) are kept in and read from ``directory``
    (open_clip's ``cache_dir=``); None keeps the usual cache."""
    token = _CACHE_OVERRIDE.set(Path(directory).expanduser() if directory is not None else _CACHE_OVERRIDE.get())
    try:
        yield
    finally:
        _CACHE_OVERRIDE.reset(token)


_TOKEN_OVERRIDE: ContextVar[str | None] = ContextVar("clipforge_hub_token", default=None)


def hub_token() -> str | None:
    """The Hugging Face token sent to the hub (``hub_endpoint()``) and nowhere else, as huggingface_hub finds it:
    ``token=`` for a block (``token_at``), ``$HF_TOKEN`` (or the older ``$HUGGING_FACE_HUB_TOKEN``), else the one
    ``hf auth login`` saved in ``$HF_TOKEN_PATH`` (default ``$HF_HOME/token``, ``~/.cache/huggingface/token``).
    None: anonymous, enough for public repos; gated and private ones need one."""
    for token in (_TOKEN_OVERRIDE.get(), os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if token and token.strip():
            return token.strip()
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    saved = Path(os.environ.get("HF_TOKEN_PATH", home / "token")).expanduser()
    try:
        return saved.read_text().strip() or None
    except OSError:
        return None


@contextmanager
def token_at(token: str | None):
    """Within the block, ``token`` is sent to the hub (transformers' and open_clip's ``token=``); None changes
    nothing."""
    reset = _TOKEN_OVERRIDE.set(token) if token else None
    try:
        yield
    finally:
        if reset is not None:
            _TOKEN_OVERRIDE.reset(reset)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE"))


def cached_path(url: str, directory: Path | None = None) -> Path:
    directory = directory or cache_dir()
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").split("/")[-1]) or "weights"
    return directory / f"{digest}-{name}"


# seconds before each retry after a transfer dropped or stalled, or a server error (5xx, 429), each resuming
# where the last stopped
_RETRY_WAITS = (1.0, 4.0, 10.0)


def download(url: str, sha256: str | None = None, directory: Path | None = None, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Fetch ``url`` into the cache (or return the cached copy) and verify it. The bytes received so far are kept
    beside the target (``NAME.part``): a dropped connection is retried from there (``_RETRY_WAITS``), and a later call
    after a crash or Ctrl-C resumes it (an HTTP range request; a server that ignores ranges sends it all again). The
    file is cached only whole and verified; another process fetching the same file is waited for."""
    target = cached_path(url, directory)
    if target.exists():
        return target
    if _offline():
        raise DownloadError(f"offline mode and {url} is not in the cache ({target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with _exclusive(partial):
        if target.exists():  # another process fetched it while this one waited
            return target
        for wait in (*_RETRY_WAITS, None):
            try:
                reported = _fetch_into(partial, url, timeout, progress)
                break
            except _Transient as exc:
                if wait is None:
                    raise DownloadError(f"{url}: download failed ({exc}); the {_size(partial)} bytes received are kept "
                                        f"in {partial.name} and the next try resumes there") from None
                time.sleep(wait)
        sha256 = sha256 or reported
        if sha256 is not None:
            got = _sha256_of(partial)
            if got != sha256:
                partial.unlink()
                raise DownloadError(f"{url}: checksum mismatch (expected sha256 {sha256}, got {got}); the file was "
                                    "not cached (the next try fetches it whole)")
        partial.replace(target)
    return target


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            hasher.update(chunk)
    return hasher.hexdigest()


class _Transient(Exception):
    """A failure worth retrying: the connection dropped or stalled mid-transfer, or the server answered 5xx / 429
    (one that cannot connect at all is not retried: offline, that would only delay the error)."""


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fetch_into(partial: Path, url: str, timeout: float, progress: bool) -> str | None:
    """Append what ``partial`` lacks of ``url`` to it; the SHA-256 the server reports (Hugging Face gives an LFS
    file's as its ETag), or None."""
    have = _size(partial)
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    token = hub_token() if url.startswith(hub_endpoint() + "/") else None
    if token:  # to the hub only: not to another host, nor past a redirect (its CDN's presigned URLs need none)
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = have > 0 and response.status == 206 and \
                (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-")
            if not resumed:
                have = 0  # a server without ranges sends the whole file: start over
            total = have + int(response.headers.get("Content-Length") or 0)
            etag = (response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or "").strip('"')
            bar = _progress(total, partial.name.removesuffix(".part"), have) if progress else None
            try:
                with open(partial, "ab" if resumed else "wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the kept bytes are not a prefix the server knows: start over
            partial.write_bytes(b"")  # emptied in place: the locked file stays the one at that name
            raise _Transient(f"HTTP 416 for the kept {have} bytes") from None
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        if exc.code in (401, 403) and url.startswith(hub_endpoint() + "/"):
            advice = ("the token sent may not read it (accept the repo's terms on its page, or use a token with "
                      "access)" if token else "set HF_TOKEN to a token that may read it (or log in with `hf auth "
                      "login`), after accepting the repo's terms on its page")
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}: a gated or private repo, or none by that "
                                f"name; {advice}; nothing was cached") from None
        error = NotFoundError if exc.code == 404 else DownloadError
        raise error(f"{url}: download failed (HTTP {exc.code} {exc.reason}); nothing was cached") from None
    except (urllib.error.URLError, ValueError) as exc:  # no connection (offline, no such host) or not a URL
        raise DownloadError(f"{url}: download failed ({getattr(exc, 'reason', exc)}); nothing was cached") from None
    except (http.client.HTTPException, OSError) as exc:  # the connection dropped or stalled mid-transfer
        raise _Transient(str(exc) or type(exc).__name__) from None
    if total > have and _size(partial) != total:
        raise _Transient(f"transfer interrupted after {_size(partial)} of {total} bytes")
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


@contextmanager
def _exclusive(partial: Path):
    """Hold an exclusive lock on ``partial`` (created empty where absent), so that one process at a time appends to
    it (where the platform has ``fcntl``); left empty, it is removed on the way out."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        fcntl = None
    while True:
        handle = open(partial, "ab")
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:  # still the file at that name (not one a process before this had renamed or removed)?
            current = os.stat(partial).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()
    try:
        yield
    finally:
        if partial.exists() and partial.stat().st_size == 0:
            partial.unlink()  # nothing received: nothing left behind
        handle.close()  # releases the lock


def fetch(source: PretrainedSource, directory: Path | None = None, progress: bool = True) -> Path:
    """A pretrained tag's weights file, downloaded and verified or from the cache. Where ``source.url`` does not
    exist, the next of ``source.urls`` that does (a transformers repo's sharded checkpoint: its index, whose shards are
    fetched beside it, the local index returned; open_clip's ``open_clip_pytorch_model.bin`` in Hugging Face repos
    that predate safetensors), as open_clip and transformers do; a pickle is read with ``weights_only=True``."""
    for url in source.urls:  # what an earlier call took (offline: no 404 to see), asked for nothing again
        taken = cached_path(url, directory)
        taken = _local_index(taken) if url.endswith(".index.json") else taken
        if taken.exists():
            return taken
    for url in source.urls:
        try:
            if url.endswith(".index.json"):
                return _fetch_shards(url, directory, progress)
            return download(url, source.sha256 if url == source.url else None, directory, progress)
        except NotFoundError:
            if url == source.urls[-1]:
                if len(source.urls) == 1:
                    raise
                others = ", ".join(u.rsplit("/", 1)[-1] for u in source.urls[1:])
                raise NotFoundError(f"{source.url}: no such file (HTTP 404), nor {others} beside it") from None


def _local_index(index: Path) -> Path:
    """Where ``_fetch_shards`` keeps the index naming the cached shards, beside the fetched one."""
    return index.with_name(index.name.removesuffix(".index.json") + ".local.index.json")


def _fetch_shards(index_url: str, directory: Path | None, progress: bool) -> Path:
    """A sharded checkpoint: its index and every shard it lists, fetched beside each other once; returns a local
    index naming the cached shards, which ``checkpoint.read_checkpoint`` reads as one state."""
    index = download(index_url, None, directory, progress=False)
    local = _local_index(index)
    if local.exists():
        return local
    meta = json.loads(index.read_text())
    base = index_url.rsplit("/", 1)[0]
    cached = {name: download(f"{base}/{name}", None, directory, progress).name
              for name in sorted(set(meta["weight_map"].values()))}
    meta["weight_map"] = {key: cached[name] for key, name in meta["weight_map"].items()}
    tmp = local.with_name(local.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(local)  # whole or absent: a crash mid-way fetches what is missing again
    return local


# ------------------------------------------------------------------------------------------- Hugging Face Hub repos

# An open_clip model_cfg with keys clipforge does not build (other timm towers, a CoCa with a Hugging Face text tower
# ...: ``checkpoint.openai.config_from_open_clip``) is refused by name rather than loaded wrong.

@dataclass(frozen=True)
class HubCheckpoint:
    weights: Path  # the cached weights file
    config: dict  # clipforge model config
    preprocess: dict | None = None  # the repo's own ``Preprocess`` arguments (mean, std, resize_mode, interpolation)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def fetch_hub_file(repo: str, name: str, folder: Path, progress: bool = False) -> Path | None:
    """``name`` from a Hugging Face Hub repo, kept in ``folder`` (fetched once: a file already there is not asked
    for again), or None where the repo has no such file. Other failures raise ``DownloadError``."""
    target = folder / name
    if target.is_file():
        return target
    try:
        fetched = download(f"{hub_endpoint()}/{repo}/resolve/main/{name}", directory=folder / ".downloads",
                           progress=progress)
    except NotFoundError:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)  # a name may lie in a subfolder (diffusers' "text_encoder/")
    return fetched.replace(target)


def fetch_hub_files(repo: str, names, folder: Path, marker: str = ".complete") -> Path:
    """``names`` from a hub repo (those it has) into ``folder``, each asked for once: after a complete round (the
    ``marker`` file) nothing is requested again, online or offline."""
    if not (folder / marker).exists():
        for name in names:
            fetch_hub_file(repo, name, folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / marker).touch()
    return folder


def fetch_hub(repo: str, progress: bool = True) -> HubCheckpoint:
    """Weights and architecture of a Hugging Face Hub repo, as ``open_clip.create_model("hf-hub:REPO")`` reads it:
    ``open_clip_config.json`` with ``open_clip_model.safetensors`` (else ``open_clip_pytorch_model.bin``); or a
    transformers ``CLIPModel`` repo (``config.json`` with ``model.safetensors``, else ``pytorch_model.bin``).
    Cached like pretrained tags, so a repo fetched once also loads offline."""
    config, preprocess, weights = hub_config(repo)
    return HubCheckpoint(fetch(weights, progress=progress), config, preprocess)


def hub_config(repo: str) -> tuple[dict, dict, PretrainedSource]:
    """A Hub repo's ``(clipforge config, its preprocessing, where its weights are)``, fetching its small JSON files
    only (what ``get_tokenizer("hf-hub:REPO")`` needs). What clipforge cannot build is refused here, before any
    weights are fetched."""
    from .checkpoint import CheckpointError, hf, hf_config_to_clipforge
    from .checkpoint.io import weight_file_names

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ValueError(f"hf-hub:{repo}: expected hf-hub:OWNER/NAME")
    base = f"{hub_endpoint()}/{repo}/resolve/main"
    open_clip_config = f"{base}/open_clip_config.json"
    try:
        meta = json.loads(download(open_clip_config, progress=False).read_text())
    except NotFoundError:
        meta = None  # not an open_clip repo: try the transformers layout
    except DownloadError:
        if not (_offline() and cached_path(f"{base}/config.json").exists()):
            raise
        meta = None  # offline, a transformers repo fetched before (its 404 left nothing to cache)
    if meta is not None:
        config = _open_clip_config(meta.get("model_cfg", {}), repo)
        preprocess = _hub_preprocess(meta.get("preprocess_cfg") or {}, repo)
        return config, preprocess, PretrainedSource(f"{base}/open_clip_model.safetensors",
                                                    fallback_url=f"{base}/open_clip_pytorch_model.bin")
    try:
        hf_config = json.loads(download(f"{base}/config.json", progress=False).read_text())
    except NotFoundError:
        raise DownloadError(f"hf-hub:{repo}: neither open_clip_config.json nor config.json found at {base}") from None
    if not hf.is_clip_config(hf_config):
        raise CheckpointError(f"hf-hub:{repo}: config.json is a {hf_config.get('model_type')!r} model, not one of "
                              f"{', '.join(hf.MODEL_TYPES)}")
    processor_files = {}  # its image processor's settings, where the repo has them
    for name in hf.IMAGE_PROCESSOR_FILES:
        try:
            processor_files[name] = json.loads(download(f"{base}/{name}", progress=False).read_text())
            break
        except NotFoundError:
            continue
        except DownloadError:
            if not _offline():
                raise
            continue  # offline, one the repo lacks (its 404 left nothing to cache)
    processor = hf.image_processor_config(processor_files)
    config = hf_config_to_clipforge(hf_config)
    if "hf_tokenizer_name" in config["text_cfg"]:  # SigLIP's, MetaCLIP 2's: its tokenizer files are in the same repo
        config["text_cfg"]["hf_tokenizer_name"] = repo
    first, *others = weight_file_names()  # transformers' order: model.safetensors, its shards, the pickles
    return config, hf.processor_preprocess(processor), \
        PretrainedSource(f"{base}/{first}", alternative_urls=tuple(f"{base}/{name}" for name in others))


def _hub_preprocess(cfg: dict, repo: str) -> dict:
    """``Preprocess`` arguments from an open_clip repo's ``preprocess_cfg``; one this package cannot reproduce is an
    error (features would differ from open_clip's)."""
    from .checkpoint import CheckpointError
    from .preprocess import INTERPOLATIONS, RESIZE_MODES

    out = {k: tuple(cfg[k]) for k in ("mean", "std") if cfg.get(k)}
    for key, known in (("resize_mode", RESIZE_MODES), ("interpolation", INTERPOLATIONS)):
        if cfg.get(key):
            if cfg[key] not in known:
                raise CheckpointError(f"hf-hub:{repo}: preprocess_cfg {key} {cfg[key]!r} is not built here "
                                      f"({', '.join(known)} are); its images would not match open_clip's")
            out[key] = cfg[key]
    return out


def _open_clip_config(model_cfg: dict, repo: str) -> dict:
    from .checkpoint import CheckpointError
    from .checkpoint.openai import config_from_open_clip

    if not model_cfg:
        raise CheckpointError(f"hf-hub:{repo}: open_clip_config.json has no model_cfg")
    return config_from_open_clip(model_cfg, f"hf-hub:{repo}")


def _progress(total: int, name: str, done: int = 0):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total or None, initial=done, unit="B", unit_scale=True, desc=f"downloading {name}", leave=False)
