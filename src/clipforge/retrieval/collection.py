"""An embedded collection on disk, as clip-retrieval lays it out; this module is the one that knows the layout.

    img_emb/img_emb_00000.npy        float16 [n, d], L2-normalised
    metadata/metadata_00000.parquet  path (a file, or "SHARD:KEY" for a sample in a tar shard), caption, width, height
    text_emb/text_emb_00000.npy      (with --texts) and metadata/text_metadata_00000.parquet
    embed_info.json                  model config, the --model/--pretrained that embedded it, counts, dimension
    index.faiss, index.json          (clipforge index build)
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..data.sources import IMAGE_EXTENSIONS
from ..files import read_json, write_json
from ..preprocess import open_image

INFO = "embed_info.json"
TEXT_EMBEDDINGS = Path("text_emb") / "text_emb_00000.npy"
TEXT_METADATA = Path("metadata") / "text_metadata_00000.parquet"
METADATA_SCHEMA = (("path", "string"), ("caption", "string"), ("width", "int32"), ("height", "int32"))


def image_shard(folder: str | Path, shard: int) -> tuple[Path, Path]:
    """(embeddings file, metadata file) of output shard ``shard``."""
    folder = Path(folder)
    return folder / "img_emb" / f"img_emb_{shard:05d}.npy", folder / "metadata" / f"metadata_{shard:05d}.parquet"


def _image_shard_files(folder: Path) -> list[Path]:
    return sorted((folder / "img_emb").glob("img_emb_*.npy"))


def check_collection(folder: str | Path) -> Path:
    """``folder`` if it holds embeddings; else an error that says what to run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected one written by `clipforge embed`)")
    if not _image_shard_files(folder):
        raise FileNotFoundError(f"{folder}: no img_emb/*.npy here; run `clipforge embed IMAGES {folder}` first")
    return folder


# -------------------------------------------------------------------------------------------------- item addresses

def item_path(item: dict) -> str:
    """The metadata ``path`` of a catalogued item: its file, or ``SHARD:KEY`` for a sample in a tar shard."""
    return item["path"] if "path" in item else f"{item['shard']}:{item['key']}"


def item_from_path(path: str) -> dict:
    """The inverse of ``item_path``."""
    if ".tar:" in path:
        shard, key = path.rsplit(":", 1)
        return {"shard": shard, "key": key}
    return {"path": path}


@lru_cache(maxsize=64)
def _shard_index(url: str) -> dict[str, dict[str, tuple[int, int]]]:
    """{key: {extension: (byte offset, size)}} of a tar shard, read once from its headers."""
    import tarfile

    index: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(url) as tar:
        for member in tar:
            if member.isfile() and "." in member.name:
                key, ext = member.name.split(".", 1)
                index.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    return index


def _shard_member(item: dict, extensions) -> bytes | None:
    """The bytes of the item's first member with one of ``extensions``, read by offset (no other member is read)."""
    members = _shard_index(item["shard"])[item["key"]]
    ext = next((e for e in extensions if e in members), None)
    if ext is None:
        return None
    offset, size = members[ext]
    with open(item["shard"], "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def item_captions(item: dict) -> list[str]:
    """Every caption line an item has: its sample's text in a shard, or the sidecar ``.txt`` beside its file."""
    if "path" in item:
        sidecar = Path(item["path"]).with_suffix(".txt")
        text = sidecar.read_text(errors="replace") if sidecar.is_file() else ""
    else:
        text = (_shard_member(item, ("txt",)) or b"").decode("utf-8", "replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_item(item: dict):
    """(image, first caption) of one catalogued item: a file path, or a key in a shard."""
    if "path" in item:
        return open_image(item["path"]), item.get("caption", "")
    data = _shard_member(item, IMAGE_EXTENSIONS)
    if data is None:
        raise KeyError(f"{item_path(item)}: no image member")
    captions = item_captions(item)
    return open_image(data, name=item_path(item)), captions[0] if captions else ""


# ------------------------------------------------------------------------------------------------------ reading

def read_info(folder: str | Path) -> dict:
    path = Path(folder) / INFO
    return read_json(path) if path.exists() else {}


def write_info(folder: str | Path, info: dict) -> None:
    write_json(Path(folder) / INFO, info)


def model_spec(folder: str | Path) -> dict:
    """The --model/--pretrained that embedded this collection."""
    return read_info(folder).get("model_spec", {})


def load_metadata(folder: str | Path) -> list[dict]:
    """The metadata rows of every image shard, in shard order (without reading the vectors)."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    rows = []
    for emb_path in _image_shard_files(folder):
        rows.extend(pq.read_table(image_shard(folder, int(emb_path.stem.split("_")[-1]))[1]).to_pylist())
    return rows


def load_embeddings(folder: str | Path) -> tuple[np.ndarray, list[dict]]:
    """All image embeddings (float32) and their metadata rows, in shard order."""
    folder = Path(folder)
    arrays = [np.load(path).astype(np.float32) for path in _image_shard_files(folder)]
    if not arrays:
        raise FileNotFoundError(f"{folder}: no img_emb/*.npy; run `clipforge embed` first")
    return np.concatenate(arrays), load_metadata(folder)


def load_text_embeddings(folder: str | Path) -> np.ndarray | None:
    """The texts embedded with ``--texts`` (float32), or None when there are none."""
    path = Path(folder) / TEXT_EMBEDDINGS
    return np.load(path).astype(np.float32) if path.exists() else None


class StoredVectors:
    """The collection's own embeddings, memory-mapped from ``img_emb/*.npy``: read by id, never all loaded."""

    def __init__(self, folder: str | Path):
        self.shards = [np.load(path, mmap_mode="r") for path in _image_shard_files(Path(folder))]
        self.starts = np.cumsum([0] + [len(shard) for shard in self.shards])

    def get(self, ids) -> np.ndarray:
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        rows = np.stack([self.shards[s][i - self.starts[s]] for s, i in zip(shard_of, ids)]).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)  # stored as float16: renormalise
