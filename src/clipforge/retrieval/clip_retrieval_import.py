"""Adopt a collection embedded by clip-retrieval (``clip-retrieval inference``), so that ``index build``, ``search``,
``serve`` and ``filter`` work on it without embedding it again.

clip-retrieval writes ``img_emb/img_emb_{N}.npy``, ``metadata/metadata_{N}.parquet`` (``image_path``, ``caption``
and, with ``--enable_metadata``, the samples' own fields) and, with ``--enable_text``, ``text_emb/text_emb_{N}.npy``:
each image's caption, row for row, which is what ``embed --captions`` keeps in ``caption_emb/``. The vectors are
copied partition by partition, in chunks (any size fits in memory), renormalised, as float16; the metadata is mapped
onto clipforge's columns, each image's path found from here (a file as clip-retrieval read it, or with ``images`` the
folder or shards it read: a sample's key, which is all clip-retrieval keeps of a shard's sample, or a file's name);
an image not found here keeps its ``url`` (``--enable_metadata``'s web address), which the server shows instead.
The vectors are checked against the model named (its features of a few of the collection's images), since queries
must come from the model that made them.

The indexes ``clip-retrieval index`` built with autofaiss (``image.index``, ``text.index``) are adopted too where
given (``adopt_indexes``): their ids are the rows in partition order, which the copy keeps.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from ..files import atomic_path
from .collection import (CLIPFORGE_FIELDS, METADATA_SCHEMA, RESERVED_FIELDS, PathRecorder, caption_shard,
                         check_collection, image_shard, item_from_path, item_path, load_item, npy_layout, read_info,
                         write_info)

CHUNK_ROWS = 65_536
SAME_MODEL_COSINE = 0.95  # median cosine of stored and recomputed image vectors that the same model reaches


def clip_retrieval_parts(folder: str | Path) -> list[tuple[Path, Path, Path | None]]:
    """(image vectors, metadata, caption vectors or None) of each partition of a clip-retrieval embeddings folder,
    in partition order; an error naming what is missing."""
    folder = Path(folder)
    numbered = re.compile(r"_(\d+)$")

    def by_number(directory: str, prefix: str, suffix: str) -> dict[int, Path]:
        found = {}
        for path in (folder / directory).glob(f"{prefix}_*{suffix}"):
            match = numbered.search(path.name[:-len(suffix)])
            if match:
                found[int(match.group(1))] = path
        return found

    images = by_number("img_emb", "img_emb", ".npy")
    if not images:
        raise FileNotFoundError(f"{folder}: no img_emb/img_emb_*.npy (expected the output folder of clip-retrieval "
                                "inference, with image embeddings)")
    metadata = by_number("metadata", "metadata", ".parquet")
    texts = by_number("text_emb", "text_emb", ".npy")
    missing = sorted(set(images) - set(metadata))
    if missing:
        raise FileNotFoundError(f"{folder}: metadata/metadata_{missing[0]}.parquet missing beside img_emb_"
                                f"{missing[0]}.npy")
    if texts and set(texts) != set(images):
        raise FileNotFoundError(f"{folder}: text_emb/ holds other partitions than img_emb/ "
                                f"({sorted(set(texts) ^ set(images))[:3]} ...)")
    return [(images[n], metadata[n], texts.get(n)) for n in sorted(images)]


def _write_unit_vectors(source: Path, target: Path, rows: int) -> None:
    """``source`` (a [rows, d] .npy of any float dtype) as unit float16 vectors at ``target``, atomically, chunk by
    chunk with plain reads and writes (memory-mapping would count the whole file as resident memory); an all-zero
    row (no caption) stays zero."""
    shape, dtype, offset = npy_layout(source)
    if len(shape) != 2 or shape[0] != rows or dtype.kind != "f":
        raise ValueError(f"{source}: expected [{rows}, d] float vectors, got {list(shape)} {dtype}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(source, "rb") as reader, open(tmp, "wb") as writer:
        np.lib.format.write_array_header_1_0(writer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                      "fortran_order": False, "shape": tuple(shape)})
        reader.seek(offset)
        for first in range(0, rows, CHUNK_ROWS):
            count = min(CHUNK_ROWS, rows - first)
            chunk = np.fromfile(reader, dtype=dtype, count=count * shape[1]).reshape(count, shape[1])
            chunk = chunk.astype(np.float32)
            norms = np.linalg.norm(chunk, axis=1, keepdims=True)
            (chunk / np.where(norms > 0, norms, 1)).astype(np.float16).tofile(writer)


class _Locator:
    """clip-retrieval's ``image_path`` -> a clipforge item path: the file itself where it exists from here, else
    (with ``images``) a sample of those shards by key, or a file of that folder by name."""

    def __init__(self, images: str | None):
        self.by_name: dict[str, str] = {}
        if images:
            from ..data.sources import open_source

            for item in open_source(images, shuffle_buffer=0).catalogue():
                name = item["key"] if "key" in item else Path(item["path"]).name
                self.by_name.setdefault(name, item_path(item))

    def __call__(self, image_path: str) -> str | None:
        if image_path and os.path.isfile(image_path):
            return image_path
        if not self.by_name:
            return None
        return self.by_name.get(image_path) or self.by_name.get(os.path.basename(image_path))


def _rows(parquet: Path, locate: _Locator, record):
    """The partition's metadata as a table: clipforge's columns, ``url`` where an image is not found here, then
    clip-retrieval's other fields of strings, numbers or booleans (``--enable_metadata``'s, e.g. ``status``,
    ``exif.Make``, ``similarity``); returns (table, how many images were not found, {field left out: why})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    n = table.num_rows
    column = (lambda name, default: table.column(name).to_pylist() if name in table.column_names else [default] * n)
    paths, urls, unfound = [], [], 0
    for given, url in zip(column("image_path", ""), column("url", "")):
        found = locate(str(given or ""))
        unfound += found is None
        paths.append(record(found or str(given or "")))  # one not found: as clip-retrieval read it, from here
        urls.append("" if found else str(url or ""))  # where an image not here can still be seen
    sizes = {key: [int(v or 0) for v in column(key, 0)] for key in ("width", "height")}
    columns = {"path": paths, "caption": [str(c or "") for c in column("caption", "")], **sizes}
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in METADATA_SCHEMA])
    if any(urls):
        columns["url"], schema = urls, schema.append(pa.field("url", pa.string()))
    adopted, left_out = pa.table(columns, schema=schema), {}
    for field in table.schema:
        if field.name in MAPPED_FIELDS:
            continue
        if field.name in CLIPFORGE_FIELDS | RESERVED_FIELDS:
            left_out[field.name] = "a name clipforge uses"
        elif _one_value(field.type):
            adopted = adopted.append_column(field, table.column(field.name))
        else:
            left_out[field.name] = f"{field.type}, not a string, number or boolean"
    return adopted, unfound, left_out


MAPPED_FIELDS = {"image_path", "caption", "url", "width", "height"}  # clip-retrieval's, mapped onto clipforge's


def _one_value(kind) -> bool:
    import pyarrow as pa

    return any(test(kind) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer,
                                       pa.types.is_floating, pa.types.is_boolean))


def _check_vectors(parts, locate: _Locator, model, preprocess, samples: int = 8) -> tuple[float | None, int]:
    """(median cosine of stored and recomputed image vectors over up to ``samples`` readable images spread over the
    source's partitions, or None when none is readable here; how many were compared). Run before anything is
    written, so that vectors of another model leave nothing behind."""
    import pyarrow.parquet as pq

    from ..evaluate.features import embed_images

    images, kept = [], []  # up to ``samples`` readable images and their stored vectors, embedded in one batch
    visited = parts[::max(1, len(parts) // samples)]
    per_partition = max(4, -(-4 * samples // len(visited)))  # up to 4x the samples looked at: some may be unreadable
    for vectors, parquet, _ in visited:
        names = pq.read_table(parquet, columns=["image_path"]).column("image_path").to_pylist() \
            if "image_path" in pq.read_schema(parquet).names else []
        stored = np.load(vectors, mmap_mode="r")
        for row in np.unique(np.linspace(0, len(names) - 1, min(len(names), per_partition)).astype(int)):
            found = locate(str(names[row] or ""))
            try:
                image, _ = load_item(item_from_path(found)) if found else (None, None)
            except Exception:  # unreadable here: try the next
                image = None
            if image is None:
                continue
            images.append(image.convert("RGB"))
            kept.append(np.asarray(stored[row], dtype=np.float32))
            if len(images) == samples:
                break
        if len(images) == samples:
            break
    if not images:
        return None, 0
    features = embed_images(model, images, preprocess, normalize=True).numpy()
    kept = np.stack(kept)
    cosines = (features * kept).sum(axis=1) / np.maximum(np.linalg.norm(kept, axis=1), 1e-12)
    return float(np.median(cosines)), len(images)


def adopt_clip_retrieval(source: str | Path, output: str | Path, model, preprocess, tokenizer,
                         model_spec: dict, images: str | None = None, check: bool = True,
                         progress: bool = True) -> dict:
    """Write the clipforge collection ``output`` from clip-retrieval's embeddings folder ``source``; returns counts
    (images, partitions, captions, images not found, the check's cosine)."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from .probe import probe_features, write_probe

    parts = clip_retrieval_parts(source)
    output = Path(output)
    paths = PathRecorder(output)
    started = {"input": paths.spec(str(source)), "adopted_from": "clip-retrieval",
               "model_spec": {key: paths.spec(value) for key, value in model_spec.items()}}
    previous = read_info(output)
    resuming = bool(previous) and all(previous.get(key) == value for key, value in started.items())
    if output.exists() and any(output.iterdir()) and not resuming:
        raise FileExistsError(f"{output} is not empty: adopt into a new folder (a run cut short resumes when given "
                              "the same source and model)")
    for path in [path for part in parts for path in (part[0], part[2]) if path is not None]:  # headers only
        shape, dtype, _ = npy_layout(path)
        if len(shape) != 2 or dtype.kind != "f":
            raise ValueError(f"{path}: expected [n, d] float vectors, got {list(shape)} {dtype}")
    dim = npy_layout(parts[0][0])[0][-1]
    if dim != model.embed_dim:
        raise ValueError(f"{source} holds {dim}-dimensional vectors and this model makes {model.embed_dim}: give "
                         "the model clip-retrieval embedded it with (its --clip_model)")
    locate = _Locator(images)
    cosine, compared = _check_vectors(parts, locate, model, preprocess) if check else (None, 0)
    if cosine is not None and cosine < SAME_MODEL_COSINE:
        raise ValueError(f"the vectors in {source} were not made by this model: its features of {compared} of the "
                         f"collection's images agree with them to a median cosine of {cosine:.3f} (the same model "
                         f"gives {SAME_MODEL_COSINE} or more). Give the model clip-retrieval embedded it with (its "
                         "--clip_model)")
    if check and cosine is None:
        print(f"warning: none of the sampled images of {source} is readable from here, so the vectors were not "
              "checked against the model, and search results will have no thumbnails; give --images (the folder "
              "or shards clip-retrieval read)", file=sys.stderr)
    output.mkdir(parents=True, exist_ok=True)
    write_info(output, started)  # first: a run cut short resumes with the same source and model
    stats = {"images": 0, "partitions": len(parts), "captions": all(text for _, _, text in parts),
             "not_found": 0, "check_cosine": cosine, "checked_images": compared, "fields": {}, "left_out": {}}
    for shard, (vectors, parquet, texts) in enumerate(tqdm(parts, desc="adopting", unit="partition",
                                                            disable=not progress)):
        table, unfound, left_out = _rows(parquet, locate, paths.item)
        rows = table.num_rows
        stats["images"] += rows
        stats["not_found"] += unfound
        stats["fields"].update(dict.fromkeys(name for name in table.column_names if name not in CLIPFORGE_FIELDS))
        stats["left_out"].update(left_out)
        emb_path, meta_path = image_shard(output, shard)
        if emb_path.exists():  # adopted before the run was cut short
            continue
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(meta_path) as tmp:  # metadata and captions first, the vectors last: as embed writes a shard
            pq.write_table(table, tmp)
        if stats["captions"]:
            _write_unit_vectors(texts, caption_shard(output, shard), rows)
        _write_unit_vectors(vectors, emb_path, rows)
    check_collection(output)
    write_probe(output, probe_features(model, preprocess, tokenizer))
    write_info(output, {**started, "dim": dim, "model": getattr(model, "config", None), **paths.mark(),
                        "captions": stats["captions"], "embedded": stats["images"], "images": stats["images"],
                        "shards": len(parts), "skipped": 0, "reused_shards": 0})
    return stats


def autofaiss_indexes(index_folder: str | Path, source: str | Path) -> dict[str, Path]:
    """The indexes of ``clip-retrieval index``'s output folder to adopt, by modality: ``image.index``, and
    ``text.index`` where ``source`` holds caption vectors; an error naming what is missing, before anything is
    written."""
    folder = Path(index_folder)
    found = {"image": folder / "image.index", "text": folder / "text.index"}
    if found["image"].is_dir():
        raise ValueError(f"{found['image']} is a folder (an index merged on disk, populated.index): clipforge adopts "
                         "one index file; run clipforge index build")
    if not found["image"].is_file():
        raise FileNotFoundError(f"{folder}: no image.index (expected the output folder of clip-retrieval index)")
    if not found["text"].is_file() or not all(text for _, _, text in clip_retrieval_parts(source)):
        del found["text"]
    return found


def adopt_indexes(indexes: dict[str, Path], output: str | Path, target_recall: float = 0.95, queries=None,
                  log=None) -> dict[str, dict]:
    """Adopt autofaiss's indexes (``autofaiss_indexes``) as the collection ``output``'s own, each checked against
    its vectors and tuned (``index.adopt_index``) and recorded as ``index build`` records its own (so that images
    embedded later extend it); returns each one's info. Its caption index covers every row, as autofaiss's does."""
    import functools

    from .collection import StoredVectors, stored_paths_digest, write_metadata_arrow
    from .index import RowSubset, adopt_index, rows_record, save_index

    write_metadata_arrow(output)  # what serving memory-maps, as index build leaves it
    built_over = rows_record(output, functools.partial(stored_paths_digest, output))
    adopted = {}
    for modality, path in indexes.items():
        vectors, rows = StoredVectors(output, modality), None
        if modality == "text":
            rows = np.arange(len(vectors), dtype=np.int64)
            vectors = RowSubset(vectors, rows)
        index, info = adopt_index(path, vectors, target_recall, queries, log=log)
        infos = path.with_suffix(".json")  # autofaiss's record of its choice, kept beside clipforge's
        if infos.is_file():
            try:
                chosen = json.loads(infos.read_text())
                info["adopted"].update({key: chosen[key] for key in ("index_key", "index_param") if key in chosen})
            except (ValueError, AttributeError):  # not autofaiss's JSON: nothing to keep
                pass
        save_index(index, {**info, **built_over}, output, modality, rows, index_file=path)
        adopted[modality] = info
    return adopted
