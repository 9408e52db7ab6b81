"""Embed image collections (folder, CSV, WebDataset shards) and texts into sharded float16 ``.npy`` + parquet.

Layout of the output folder (as clip-retrieval's):

    img_emb/img_emb_00000.npy        float16 [n, d], L2-normalised
    metadata/metadata_00000.parquet  path (or shard key), caption, width, height
    text_emb/text_emb_00000.npy      (with --texts) and metadata/text_metadata_00000.parquet
    embed_info.json                  model, count, dimension

Each output shard is written atomically once its images are embedded, so a killed run continues at the first
missing shard. Under ``torchrun`` output shard ``i`` belongs to rank ``i % world_size``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_path, write_json
from ..data.sources import IMAGE_EXTENSIONS, expand_shards
from ..preprocess import BadImageError, open_image

TEXT_EMBEDDINGS = Path("text_emb") / "text_emb_00000.npy"


def list_items(input_spec: str) -> list[dict]:
    """Every item of the collection as {"path"| "shard"+"key", "caption"} without decoding images.

    Folders: images (recursively) with optional sidecar .txt; CSV: ``filepath`` (or image/path) + optional caption
    column; shards: members grouped by key.
    """
    path = Path(input_spec)
    if input_spec.endswith((".csv", ".tsv")):
        import csv

        with open(path, newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if input_spec.endswith(".tsv") else ",")
            fields = reader.fieldnames or []
            image_key = next((f for f in ("filepath", "image", "path", "image_path", "file") if f in fields), None)
            caption_key = next((f for f in ("caption", "title", "text") if f in fields), None)
            if image_key is None:
                raise ValueError(f"{path}: no image path column (filepath/image/path) among {fields}")
            return [{"path": str((path.parent / row[image_key]).resolve()),
                     "caption": row.get(caption_key, "") if caption_key else ""} for row in reader]
    if path.is_dir() and not list(path.glob("*.tar")):
        items = []
        for image in sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
            sidecar = image.with_suffix(".txt")
            caption = sidecar.read_text().strip().splitlines()[0] if sidecar.exists() else ""
            items.append({"path": str(image.resolve()), "caption": caption})
        if not items:
            raise ValueError(f"{path}: no images found")
        return items
    spec = "::".join(str(p) for p in sorted(path.glob("*.tar"))) if path.is_dir() else input_spec
    items = []
    import tarfile

    for url in expand_shards(spec):
        if not Path(url).is_file():
            raise FileNotFoundError(f"{input_spec}: {url} not found (expected an image folder, a CSV/TSV, or "
                                    "WebDataset shards)")
        with tarfile.open(url) as tar:
            keys = {}
            for member in tar:
                if member.isfile() and "." in member.name:
                    key, ext = member.name.split(".", 1)
                    keys.setdefault(key, set()).add(ext.lower())
        for key, exts in keys.items():
            if exts & set(IMAGE_EXTENSIONS):
                items.append({"shard": url, "key": key})
    if not items:
        raise ValueError(f"{input_spec}: no images in the shards")
    return items


def _read_shard_members(url: str) -> dict[str, dict[str, bytes]]:
    import tarfile

    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(url) as tar:
        for member in tar:
            if member.isfile() and "." in member.name:
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    return members


def load_item(item: dict, shard_cache: dict):
    """(image, caption) of one listed item: a file path, or a key in a shard (the last shard read stays open)."""
    if "path" in item:
        return open_image(item["path"]), item.get("caption", "")
    if item["shard"] not in shard_cache:
        shard_cache.clear()
        shard_cache[item["shard"]] = _read_shard_members(item["shard"])
    sample = shard_cache[item["shard"]][item["key"]]
    data = next(sample[e] for e in IMAGE_EXTENSIONS if e in sample)
    caption = sample.get("txt", b"").decode("utf-8", "replace").strip().splitlines()
    return open_image(data, name=f"{item['shard']}:{item['key']}"), caption[0] if caption else ""


class _DecodedItems(torch.utils.data.Dataset):
    """Item i -> (preprocessed image, metadata row), or None when it cannot be read (counted, then skipped)."""

    def __init__(self, items: list[dict], preprocess):
        self.items, self.preprocess, self.shard_cache = items, preprocess, {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            image, caption = load_item(item, self.shard_cache)
        except (BadImageError, KeyError, StopIteration, OSError):
            return None
        row = {"path": item.get("path") or f"{item['shard']}:{item['key']}", "caption": caption,
               "width": image.width, "height": image.height}
        return self.preprocess(image), row


def _decoded_batches(items: list[dict], preprocess, batch_size: int, workers: int):
    """Batches (lists, in order) of decoded items; worker processes decode ahead of the model."""
    loader = torch.utils.data.DataLoader(_DecodedItems(items, preprocess), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list, pin_memory=False,
                                         prefetch_factor=2 if workers else None)
    return iter(loader)


@torch.no_grad()
def embed_collection(model, preprocess, input_spec: str, output: str | Path, shard_size: int = 10_000,
                     batch_size: int = 256, texts: list[str] | None = None, tokenizer=None, rank: int = 0,
                     world_size: int = 1, progress: bool = True, device=None, workers: int = 0) -> dict:
    """Embed every image of ``input_spec`` into ``output``; returns counts (embedded, skipped, shards reused).

    ``workers`` > 0 decodes and preprocesses in that many processes while the model runs (what keeps a GPU fed).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = Path(output)
    (output / "img_emb").mkdir(parents=True, exist_ok=True)
    (output / "metadata").mkdir(parents=True, exist_ok=True)
    device = device or next(model.parameters()).device
    items = list_items(input_spec)
    n_shards = (len(items) + shard_size - 1) // shard_size
    stats = {"images": len(items), "embedded": 0, "skipped": 0, "reused_shards": 0, "shards": n_shards}
    bar = tqdm(total=len(items), desc="embedding", unit="img", disable=not progress)
    for shard in range(rank, n_shards, world_size):
        emb_path = output / "img_emb" / f"img_emb_{shard:05d}.npy"
        meta_path = output / "metadata" / f"metadata_{shard:05d}.parquet"
        chunk = items[shard * shard_size:(shard + 1) * shard_size]
        if emb_path.exists() and meta_path.exists():  # finished before a restart
            stats["reused_shards"] += 1
            bar.update(len(chunk))
            continue
        features, rows = [], []
        for batch in _decoded_batches(chunk, preprocess, batch_size, workers):
            good = [sample for sample in batch if sample is not None]
            stats["skipped"] += len(batch) - len(good)
            if good:
                out = model.encode_image(torch.stack([t for t, _ in good]).to(device, non_blocking=True),
                                         normalize=True)
                features.append(out.float().cpu().numpy().astype(np.float16))
                rows.extend(row for _, row in good)
            bar.update(len(batch))
        array = np.concatenate(features) if features else np.zeros((0, model.embed_dim), np.float16)
        with atomic_path(meta_path) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
                [("path", pa.string()), ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32())])),
                tmp)
        with atomic_path(emb_path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array)
        stats["embedded"] += len(rows)
    bar.close()
    if texts and rank == 0:
        embed_texts(model, tokenizer, texts, output, batch_size, device)
        stats["texts"] = len(texts)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank's counts, and rank 0 writes the summary only once all shards are on disk
        counts = ["embedded", "skipped", "reused_shards"]
        totals = torch.tensor([stats[k] for k in counts], dtype=torch.long)
        torch.distributed.all_reduce(totals)
        stats.update(zip(counts, totals.tolist()))
    if rank == 0:
        write_json(output / "embed_info.json", {"input": input_spec, "dim": model.embed_dim,
                                                "model": getattr(model, "config", None), **stats})
    return stats


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], output: Path, batch_size: int = 256, device=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (output / "text_emb").mkdir(parents=True, exist_ok=True)
    device = device or next(model.parameters()).device
    parts = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float().cpu().numpy()
             for i in range(0, len(texts), batch_size)]
    with atomic_path(output / TEXT_EMBEDDINGS) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.concatenate(parts).astype(np.float16))
    with atomic_path(output / "metadata" / "text_metadata_00000.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist([{"caption": t} for t in texts]), tmp)


def load_text_embeddings(folder: str | Path) -> np.ndarray | None:
    """The texts embedded with ``--texts`` (float32), or None when there are none."""
    path = Path(folder) / TEXT_EMBEDDINGS
    return np.load(path).astype(np.float32) if path.exists() else None


def load_metadata(folder: str | Path) -> list[dict]:
    """The metadata rows of every image shard, in shard order (without reading the vectors)."""
    import pyarrow.parquet as pq

    rows = []
    for emb_path in sorted((Path(folder) / "img_emb").glob("img_emb_*.npy")):
        shard = emb_path.stem.split("_")[-1]
        rows.extend(pq.read_table(Path(folder) / "metadata" / f"metadata_{shard}.parquet").to_pylist())
    return rows


def load_embeddings(folder: str | Path) -> tuple[np.ndarray, list[dict]]:
    """All image embeddings (float32) and their metadata rows, in shard order."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    arrays, rows = [], []
    for emb_path in sorted((folder / "img_emb").glob("img_emb_*.npy")):
        shard = emb_path.stem.split("_")[-1]
        arrays.append(np.load(emb_path).astype(np.float32))
        rows.extend(pq.read_table(folder / "metadata" / f"metadata_{shard}.parquet").to_pylist())
    if not arrays:
        raise FileNotFoundError(f"{folder}: no img_emb/*.npy; run `clipforge embed` first")
    return np.concatenate(arrays), rows
