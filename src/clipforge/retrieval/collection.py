"""An embedded collection on disk, as clip-retrieval lays it out; this module is the one that knows the layout.

    img_emb/img_emb_00000.npy        float16 [n, d], L2-normalised
    metadata/metadata_00000.parquet  path (a file, or "SHARD:KEY" for a sample in a tar shard), caption, width, height
    text_emb/text_emb_00000.npy      (with --texts) and metadata/text_metadata_00000.parquet
    caption_emb/caption_emb_00000.npy  (with --captions) float16 [n, d]: each image's caption, row for row (zeros
                                     for an image without one; --all-captions: the mean of its captions' vectors,
                                     renormalised); its dot product with the image's is the CLIP score
    embed_info.json                  model config, the --model/--pretrained that embedded it, counts, dimension
    catalogue.parquet                every input image's recorded path in row order, unreadable ones too: what a
                                     later embed of a changed input compares with (embed_collection)
    probe_emb.npz                    its features of fixed probe images and texts: which weights (retrieval.probe)
    index.faiss, index.json          (clipforge index build)
    caption_index.faiss, caption_index.json, caption_index.rows.npy
                                     (index build, with --captions) the captions' index; it holds the captioned
                                     images only, and .rows.npy maps its positions to collection row ids

Paths (metadata ``path``, the --model/--pretrained recorded) are stored as ``files.PathReferences`` records them,
relative to the collection's folder, so that search and serve find images and model from any working directory
and after the project moves. Collections embedded before that (``embed_info.json`` without ``RELATIVE_PATHS``)
stored them as typed, relative to the working directory of the time, and are read so.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..files import PathReferences, atomic_path, read_json, write_json

INFO = "embed_info.json"
CATALOGUE = "catalogue.parquet"
RELATIVE_PATHS = "paths_relative_to_collection"  # embed_info.json's mark of the layout above
TEXT_EMBEDDINGS = Path("text_emb") / "text_emb_00000.npy"
TEXT_METADATA = Path("metadata") / "text_metadata_00000.parquet"
METADATA_SCHEMA = (("path", "string"), ("caption", "string"), ("width", "int32"), ("height", "int32"))
CLIPFORGE_FIELDS = {name for name, _ in METADATA_SCHEMA} | {"url"}  # url: an adopted image kept as its web address
RESERVED_FIELDS = {"id", "score"}  # what a search result adds to its row: no metadata field may be named so


def other_fields(row: dict) -> dict:
    """A metadata row's fields beyond clipforge's own (adopted from clip-retrieval)."""
    return {name: value for name, value in row.items() if name not in CLIPFORGE_FIELDS}


def image_shard(folder: str | Path, shard: int) -> tuple[Path, Path]:
    """(embeddings file, metadata file) of output shard ``shard``."""
    folder = Path(folder)
    return folder / "img_emb" / f"img_emb_{shard:05d}.npy", folder / "metadata" / f"metadata_{shard:05d}.parquet"


def caption_shard(folder: str | Path, shard: int) -> Path:
    """The caption embeddings of output shard ``shard`` (``embed --captions``)."""
    return Path(folder) / "caption_emb" / f"caption_emb_{shard:05d}.npy"


def save_vectors(path: Path, vectors: np.ndarray) -> None:
    """``vectors`` as a float16 ``.npy`` file at ``path``, written atomically (the collection's vector format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(vectors, dtype=np.float16))


def write_image_shard(folder: str | Path, shard: int, vectors: np.ndarray, metadata,
                      captions: np.ndarray | None = None) -> None:
    """Output shard ``shard``, each file atomically: ``vectors`` [n, d] (stored float16), ``metadata`` a list of
    rows or a dict of columns with METADATA_SCHEMA's fields, ``captions`` the rows' caption vectors (``--captions``).
    Metadata and captions first: a shard counts as done when all exist, and the vectors file is the one looked for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb_path, meta_path = image_shard(folder, shard)
    emb_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in METADATA_SCHEMA])
    table = pa.Table.from_pylist(metadata, schema=schema) if isinstance(metadata, list) else \
        pa.table(metadata, schema=schema)
    if table.num_rows != len(vectors) or (captions is not None and len(captions) != len(vectors)):
        raise ValueError(f"shard {shard}: {len(vectors)} vectors but {table.num_rows} metadata rows"
                         + (f" and {len(captions)} caption vectors" if captions is not None else ""))
    with atomic_path(meta_path) as tmp:
        pq.write_table(table, tmp)
    if captions is not None:
        save_vectors(caption_shard(folder, shard), captions)
    save_vectors(emb_path, vectors)


def _image_shard_files(folder: Path) -> list[Path]:
    return sorted((folder / "img_emb").glob("img_emb_*.npy"))


def embedded_shards(folder: str | Path) -> list[tuple[int, Path]]:
    """(shard number, vectors file) of every image shard written so far, in order."""
    return [(int(path.stem.rsplit("_", 1)[1]), path) for path in _image_shard_files(Path(folder))]


def check_collection(folder: str | Path) -> Path:
    """``folder`` if it holds embeddings; else an error that says what to run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected one written by `clipforge embed`)")
    if not _image_shard_files(folder):
        raise FileNotFoundError(f"{folder}: no img_emb/*.npy here; run `clipforge embed IMAGES {folder}` first")
    return folder


def unfinished_embedding(folder: str | Path) -> str | None:
    """Why ``folder`` may hold only part of its images (embed records the shard count once every shard is written),
    or None when the embedding run finished."""
    present, expected = len(_image_shard_files(Path(folder))), read_info(folder).get("shards")
    if expected is not None and present >= expected:
        return None
    done = f"{present} of {expected}" if expected is not None else f"{present}"
    return (f"{folder}: the embedding run has not finished ({done} shards written); rerun the same "
            f"`clipforge embed` to complete it (done shards are kept)")


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


def _shard_member(item: dict, extensions) -> tuple[bytes, str] | tuple[None, None]:
    """(bytes, extension) of the item's first member with one of ``extensions``, read by offset (no other member is
    read); (None, None) if it has none."""
    from ..data.sources import shard_index

    members = shard_index(item["shard"]).members[item["key"]]
    ext = next((e for e in extensions if e in members), None)
    if ext is None:
        return None, None
    offset, size = members[ext]
    with open(item["shard"], "rb") as handle:
        handle.seek(offset)
        return handle.read(size), ext


def item_captions(item: dict) -> list[str]:
    """Every caption line an item has: its sample's text in a shard, or the sidecar ``.txt`` beside its file."""
    if "path" in item:
        sidecar = Path(item["path"]).with_suffix(".txt")
        text = sidecar.read_text(errors="replace") if sidecar.is_file() else ""
    else:
        text = (_shard_member(item, ("txt",))[0] or b"").decode("utf-8", "replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def item_image_bytes(item: dict) -> tuple[bytes, str]:
    """(the image file's bytes as stored, its extension) of one catalogued item: a file, or a member of a shard."""
    from ..data.sources import IMAGE_EXTENSIONS

    if "path" in item:
        return Path(item["path"]).read_bytes(), Path(item["path"]).suffix.lstrip(".").lower()
    data, ext = _shard_member(item, IMAGE_EXTENSIONS)
    if data is None:
        raise KeyError(f"{item_path(item)}: no image member")
    return data, ext


def load_item(item: dict, decoding=None):
    """(image, first caption) of one catalogued item: a file path, or a key in a shard; decoded as stored, or as
    ``decoding`` (``preprocess.Decoding``) says."""
    from ..preprocess import open_image

    if "path" in item:
        return open_image(item["path"], decoding=decoding), item.get("caption", "")
    data, _ = item_image_bytes(item)
    captions = item_captions(item)
    return open_image(data, name=item_path(item), decoding=decoding), captions[0] if captions else ""


# ------------------------------------------------------------------------------------------------------ reading

def unreadable_reason(item: dict) -> str:
    """What is wrong with an item that could not be decoded, naming it: the decoder's own message where it has one (a
    truncated file, a HEIC photo without pillow-heif). Read again for it: an error raised in a decoding worker does
    not travel with the batch."""
    from ..preprocess import BadImageError

    try:
        load_item(item)
    except BadImageError as error:
        return str(error)
    except (KeyError, OSError, StopIteration):
        pass
    return f"{item_path(item)}: not a readable image"


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / INFO
    return read_json(path) if path.exists() else {}


def write_info(folder: str | Path, info: dict) -> None:
    write_json(Path(folder) / INFO, info)


def write_catalogue(folder: str | Path, paths: list[str], stamps: list[tuple[int, int] | None] | None = None) -> None:
    """The recorded ``paths`` in row order, with each file's ``(size, mtime_ns)`` stamp where it is one (None for a
    shard's member), by which a later run tells an image changed since it was embedded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"path": pa.array(paths, pa.string())}
    if stamps is not None:
        columns["size"] = pa.array([s[0] if s else None for s in stamps], pa.int64())
        columns["mtime_ns"] = pa.array([s[1] if s else None for s in stamps], pa.int64())
    with atomic_path(Path(folder) / CATALOGUE) as tmp:
        pq.write_table(pa.table(columns), tmp)


def read_catalogue_stamps(folder: str | Path) -> dict[str, tuple[int, int]]:
    """``{recorded path: (size, mtime_ns)}`` of the files ``write_catalogue`` stamped (none for older catalogues)."""
    import pyarrow.parquet as pq

    path = Path(folder) / CATALOGUE
    if not path.exists() or "size" not in pq.read_schema(path).names:
        return {}
    table = pq.read_table(path, columns=["path", "size", "mtime_ns"]).to_pydict()
    return {p: (s, m) for p, s, m in zip(table["path"], table["size"], table["mtime_ns"]) if s is not None}


def read_catalogue(folder: str | Path) -> list[str] | None:
    """The recorded paths ``write_catalogue`` wrote; None for a collection embedded before they were kept."""
    import pyarrow.parquet as pq

    path = Path(folder) / CATALOGUE
    return pq.read_table(path, columns=["path"]).column(0).to_pylist() if path.exists() else None


def model_spec(folder: str | Path) -> dict:
    """The --model/--pretrained that embedded this collection, paths among them usable from here (and its
    --max-patches, for a SigLIP 2 NaFlex model, and --force-image-size, when it ran at another image size)."""
    info = read_info(folder)
    spec = dict(info.get("model_spec", {}))
    if info.get(RELATIVE_PATHS):
        references = PathReferences(folder)
        spec = {key: references.find(value) or value for key, value in spec.items()}
    for key in ("max_patches", "force_image_size"):
        if info.get(key):
            spec[key] = int(info[key])
    return spec


class PathRecorder:
    """How ``embed`` records paths into the collection in ``folder``: relative to it (the layout above), or as typed
    for a collection begun before that (shards but no ``RELATIVE_PATHS`` mark), so that its shards agree."""

    def __init__(self, folder: str | Path):
        self.legacy = any(Path(folder).glob("img_emb/*.npy")) and not read_info(folder).get(RELATIVE_PATHS)
        self.references = PathReferences(folder)

    def item(self, path: str) -> str:
        """A metadata ``path``: a file, or "SHARD:KEY"."""
        return path if self.legacy else _map_location(path, self.references.record)

    def spec(self, value: str | None) -> str | None:
        """An input or --model/--pretrained spec: recorded when it names an existing path, else (a zoo name, a
        shard pattern) as given."""
        return value if self.legacy else self.references.record_if_path(value)

    def mark(self) -> dict:
        """What ``embed_info.json`` carries to say how its paths are recorded."""
        return {} if self.legacy else {RELATIVE_PATHS: True}


def item_path_reader(folder: str | Path):
    """``read(stored)``: a stored metadata ``path`` as one usable from here (absolute); as stored for collections
    embedded before paths were relative to the collection."""
    if not read_info(folder).get(RELATIVE_PATHS):
        return lambda path: path
    references = PathReferences(folder)
    return lambda path: _map_location(path, references.resolve)


def _map_location(path: str, change) -> str:
    """``path`` with its file (or its shard's file) changed by ``change``."""
    item = item_from_path(path)
    where = "path" if "path" in item else "shard"
    item[where] = change(item[where])
    return item_path(item)


def paths_digest(paths) -> str:
    """sha256 of ``paths`` in order (which image is in which row, for embed's input record and an index's rows)."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


@contextlib.contextmanager
def _system_allocator():
    """Arrow's allocations from the system allocator meanwhile: its default (mimalloc) keeps about twice as much
    resident after reading a file batch by batch, which counts against an index build's memory budget."""
    import pyarrow as pa

    pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(pool)


def stored_paths_digest(folder: str | Path, rows: int) -> str | None:
    """``paths_digest`` of the metadata paths of the collection's first ``rows`` rows as stored, read a shard's
    path column at a time; None when it holds fewer rows."""
    import pyarrow.parquet as pq

    def paths():  # a batch at a time: an index build runs within a memory budget
        left = rows
        for parquet, _ in _metadata_files(Path(folder)):
            for batch in pq.ParquetFile(parquet).iter_batches(batch_size=8_192, columns=["path"]):
                if left <= 0:
                    return
                column = batch.column(0).to_pylist()[:left]
                left -= len(column)
                yield from column
        if left > 0:
            raise IndexError(rows)

    with _system_allocator():
        try:
            return paths_digest(paths())
        except IndexError:
            return None


def load_metadata(folder: str | Path) -> list[dict]:
    """The metadata rows of every image shard, in shard order (without reading the vectors)."""
    import pyarrow.parquet as pq

    read_path = item_path_reader(folder)
    rows = []
    for parquet, _ in _metadata_files(Path(folder)):
        rows.extend(pq.read_table(parquet).to_pylist())
    for row in rows:
        row["path"] = read_path(row["path"])
    return rows


def load_vectors(folder: str | Path) -> np.ndarray:
    """All image embeddings (float32), in shard order, without the metadata."""
    folder = Path(folder)
    arrays = [np.load(path).astype(np.float32) for path in _image_shard_files(folder)]
    if not arrays:
        raise FileNotFoundError(f"{folder}: no img_emb/*.npy; run `clipforge embed` first")
    return np.concatenate(arrays)


def load_embeddings(folder: str | Path) -> tuple[np.ndarray, list[dict]]:
    """All image embeddings (float32) and their metadata rows, in shard order."""
    return load_vectors(folder), load_metadata(folder)


def load_text_embeddings(folder: str | Path) -> np.ndarray | None:
    """The texts embedded with ``--texts`` (float32), or None when there are none."""
    path = Path(folder) / TEXT_EMBEDDINGS
    return np.load(path).astype(np.float32) if path.exists() else None


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-ordered ``.npy`` file, from its header alone."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order:
            raise ValueError(f"{path}: a Fortran-ordered array; expected C order as clipforge embed writes")
        return shape, dtype, handle.tell()


MODALITIES = ("image", "text")  # what an index holds: the images, or their captions (clip-retrieval's names)


class StoredVectors:
    """The collection's own embeddings in ``img_emb/*.npy`` (``modality`` "text": the caption vectors of
    ``caption_emb/*.npy``, row for row), read by id or in chunks with plain file reads: never all loaded, and never
    memory-mapped either (mapped pages count as the process's resident memory, so a full pass over a 10M-vector
    collection would show its whole size as RSS)."""

    def __init__(self, folder: str | Path, modality: str = "image"):
        folder = check_collection(folder)
        if modality == "image":
            self.files = _image_shard_files(folder)
        elif modality == "text":
            self.files = [caption_shard(folder, shard) for shard, _ in embedded_shards(folder)]
            missing = [path for path in self.files if not path.exists()]
            if missing:
                raise FileNotFoundError(f"{folder} holds no caption embeddings ({missing[0].relative_to(folder)} "
                                        f"missing): embed it with --captions (clipforge embed IMAGES {folder} "
                                        "--captions ...; done image shards are embedded again)")
        else:
            raise ValueError(f"modality {modality!r}: choose one of {', '.join(MODALITIES)}")
        layouts = [npy_layout(path) for path in self.files]
        shapes = {shape[1:] for shape, _, _ in layouts}
        if len(shapes) != 1 or any(len(shape) != 2 for shape, _, _ in layouts):
            raise ValueError(f"{folder}: img_emb shards must be [n, d] arrays of one dimension, got "
                             f"{sorted({shape for shape, _, _ in layouts})}")
        self.dim = shapes.pop()[0]
        self.dtypes = [dtype for _, dtype, _ in layouts]
        self.offsets = [offset for _, _, offset in layouts]
        self.starts = np.cumsum([0] + [shape[0] for shape, _, _ in layouts])
        self._handles: list | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def _files(self) -> list:
        if self._handles is None:
            self._handles = [open(path, "rb") for path in self.files]
        return self._handles

    def get(self, ids) -> np.ndarray:
        """Rows ``ids`` (any order) as unit float32 vectors, one positioned read each (thread-safe)."""
        import os

        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"ids out of range 0..{len(self) - 1}")
        handles = self._files()
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        for position in np.argsort(ids):  # ascending offsets: friendlier to the disk
            s = shard_of[position]
            dtype = self.dtypes[s]
            size = self.dim * dtype.itemsize
            offset = self.offsets[s] + int(ids[position] - self.starts[s]) * size
            out[position] = np.frombuffer(os.pread(handles[s].fileno(), size, offset), dtype=dtype)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)  # stored as float16: renormalise (a caption-less row stays 0)

    def slice(self, first: int, last: int) -> np.ndarray:
        """Rows ``first..last`` as float32, read shard by shard."""
        parts = []
        for s, handle in enumerate(self._files()):
            lo, hi = max(first, int(self.starts[s])), min(last, int(self.starts[s + 1]))
            if lo < hi:
                dtype = self.dtypes[s]
                handle.seek(self.offsets[s] + (lo - int(self.starts[s])) * self.dim * dtype.itemsize)
                rows = np.fromfile(handle, dtype=dtype, count=(hi - lo) * self.dim).reshape(hi - lo, self.dim)
                parts.append(rows.astype(np.float32))
        if not parts:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def chunks(self, rows: int, start: int = 0, stop: int | None = None):
        """``(first id, float32 [<= rows, d])`` over ids ``start..stop``, in order."""
        stop = len(self) if stop is None else stop
        for first in range(start, stop, rows):
            yield first, self.slice(first, min(first + rows, stop))


def captioned_rows(captions: StoredVectors, rows: int = 65_536, start: int = 0) -> np.ndarray:
    """Row ids (from ``start`` on) whose caption vector is not all zeros (``embed --captions`` stores zeros for an
    image without one), read chunk by chunk."""
    found = [first + np.flatnonzero(chunk.any(axis=1)) for first, chunk in captions.chunks(rows, start)]
    return np.concatenate(found).astype(np.int64) if found else np.empty(0, np.int64)


# ------------------------------------------------------------------------------------------------------ metadata

def _metadata_files(folder: Path) -> list[tuple[Path, Path]]:
    """(parquet, its Arrow IPC copy's path) of every image shard, in shard order."""
    parquets = [image_shard(folder, int(emb.stem.split("_")[-1]))[1] for emb in _image_shard_files(Path(folder))]
    return [(parquet, parquet.with_suffix(".arrow")) for parquet in parquets]


def _is_fresh(arrow: Path, parquet: Path) -> bool:
    """The Arrow copy exists and is not older than its parquet (a re-embedded shard invalidates it)."""
    return arrow.exists() and arrow.stat().st_mtime >= parquet.stat().st_mtime


def write_metadata_arrow(folder: str | Path) -> int:
    """An uncompressed Arrow IPC copy of each metadata shard beside its parquet (batch by batch, never a whole shard
    in memory), so that serving memory-maps the metadata instead of decoding it; returns how many were written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    written = 0
    with _system_allocator():
        for parquet, target in _metadata_files(folder):
            if _is_fresh(target, parquet):
                continue
            source = pq.ParquetFile(parquet)
            with atomic_path(target) as tmp:
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, source.schema_arrow) as writer:
                    for batch in source.iter_batches(batch_size=65_536, use_threads=False):
                        writer.write_batch(batch)
            written += 1
    return written


class Metadata:
    """The metadata rows, looked up by row id through Arrow: memory-mapped Arrow IPC files where ``index build``
    wrote them, else the parquet shards read as columns. Never a Python object per row: a 10M-row collection costs
    its columns' bytes (page cache, when memory-mapped), not gigabytes of dicts."""

    def __init__(self, folder: str | Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = Path(folder)
        self.tables = []
        self.memory_mapped = True
        for parquet, arrow in _metadata_files(folder):
            if _is_fresh(arrow, parquet):
                self.tables.append(pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all())
            else:
                self.tables.append(pq.read_table(parquet, memory_map=True))
                self.memory_mapped = False
        self.starts = np.cumsum([0] + [table.num_rows for table in self.tables])
        self.read_path = item_path_reader(folder)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, row: int) -> dict:
        """Row ``row``, its ``path`` usable from the working directory."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range 0..{len(self) - 1}")
        shard = int(np.searchsorted(self.starts, row, side="right") - 1)
        found = self.tables[shard].slice(row - int(self.starts[shard]), 1).to_pylist()[0]
        found["path"] = self.read_path(found["path"])
        return found
