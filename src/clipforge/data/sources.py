"""Where (image, text) samples come from: WebDataset shards, CSV files, image folders, generated shapes.

A source yields *raw* samples (undecoded bytes plus text or label) for one part of the data: part ``p`` of ``P``
(one part per rank x DataLoader worker), in an order fixed by ``(seed, epoch)``. Decoding happens later, so a
resumed run can skip samples it already trained on without decoding them.
"""
from __future__ import annotations

import csv
import os
import random
from collections import Counter
from pathlib import Path
from typing import Iterator

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


def expand_shards(spec: str) -> list[str]:
    """``'a/{000..009}.tar::b/x.tar'`` -> list of URLs (brace expansion as webdataset does; ``::`` joins lists)."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def find_classnames(shard: str) -> Path | None:
    """CLIP_benchmark layout: ``<dataset>/classnames.txt`` beside the ``<dataset>/<split>/`` shard folder."""
    if shard.startswith("pipe:") or "://" in shard:
        return None
    folder = Path(shard).parent
    for candidate in (folder / "classnames.txt", folder.parent / "classnames.txt"):
        if candidate.exists():
            return candidate
    return None


def read_classnames(path: str | Path) -> list[str]:
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


class ShardSource:
    """WebDataset tar shards (img2dataset layout: image + txt [+ json]; or CLIP_benchmark: image + cls)."""

    def __init__(self, spec: str, shuffle_buffer: int = 1000):
        self.spec = spec
        self.urls = expand_shards(spec)
        self.shuffle_buffer = shuffle_buffer
        missing = [u for u in self.urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                         if len(missing) > 1 else ""))

    def __len__(self) -> int:
        """Number of samples, counted from the tar headers of local shards (no decoding)."""
        import tarfile

        keys = set()
        for url in self.urls:
            if "://" in url or url.startswith("pipe:"):
                raise ValueError("cannot count samples of remote shards; pass the sample count explicitly")
            with tarfile.open(url) as tar:
                keys.update((url, m.name.split(".", 1)[0]) for m in tar if m.isfile())
        return len(keys)

    def samples(self, part: int, parts: int, epoch: int, seed: int, errors: Counter) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        urls = list(self.urls)
        random.Random(f"shards-{seed}-{epoch}").shuffle(urls)  # the same order on every part
        by_shard = len(urls) >= parts
        mine = urls[part::parts] if by_shard else urls

        def handler(exc: Exception) -> bool:
            errors["bad_shard_or_member"] += 1
            return True  # skip and go on

        stream = tarfile_samples(({"url": u} for u in mine), handler=handler)
        if not by_shard:  # fewer shards than parts: every part reads everything and keeps every parts-th sample
            stream = (s for i, s in enumerate(stream) if i % parts == part)
        yield from _shuffled(stream, self.shuffle_buffer, random.Random(f"buffer-{seed}-{epoch}-{part}"))


def _shuffled(stream, size: int, rng: random.Random):
    """A reservoir shuffle buffer, as webdataset's ``shuffle`` but with our seeded generator."""
    if size <= 1:
        yield from stream
        return
    buffer = []
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class IndexedSource:
    """Sources with random access (CSV rows, image folders): shuffled by index, split by index."""

    items: list[tuple[str, str | None]]  # (image path, caption or None)

    def __len__(self) -> int:
        return len(self.items)

    def samples(self, part: int, parts: int, epoch: int, seed: int, errors: Counter) -> Iterator[dict]:
        order = list(range(len(self.items)))
        random.Random(f"order-{seed}-{epoch}").shuffle(order)
        for index in order[part::parts]:
            path, caption = self.items[index]
            try:
                data = Path(path).read_bytes()
            except OSError:
                errors["missing_file"] += 1
                continue
            sample = {"__key__": path, "image_bytes": data}
            if caption is not None:
                sample["txt"] = caption.encode()
            yield sample


class CsvSource(IndexedSource):
    """A CSV (or TSV) file with an image path column and a caption column; relative paths are from the file."""

    def __init__(self, path: str | Path, image_key: str = "filepath", caption_key: str = "title"):
        path = Path(path)
        delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            fields = reader.fieldnames or []
            image_key = image_key if image_key in fields else next((f for f in fields if f in ("image", "path", "file", "filepath", "image_path")), None)
            caption_key = caption_key if caption_key in fields else next((f for f in fields if f in ("caption", "text", "title")), None)
            if image_key is None or caption_key is None:
                raise ValueError(f"{path}: need an image path column and a caption column; found columns {fields}")
            self.items = [(str(path.parent / row[image_key]), row[caption_key]) for row in reader]
        if not self.items:
            raise ValueError(f"{path}: no rows")


class FolderSource(IndexedSource):
    """A folder of images, each with a sidecar ``.txt`` caption file of the same stem (one caption per line)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        self.items = []
        for image in images:
            sidecar = image.with_suffix(".txt")
            if sidecar.exists():
                self.items.append((str(image), sidecar.read_text()))
        if not self.items:
            raise ValueError(f"{folder}: no images with a sidecar .txt caption")


def open_source(spec: str, shuffle_buffer: int = 1000):
    """Pick the source kind from the spec: ``*.csv``/``*.tsv``, a folder, or shard URLs."""
    if spec.endswith((".csv", ".tsv")):
        return CsvSource(spec)
    if os.path.isdir(spec):
        tars = sorted(Path(spec).glob("*.tar"))
        if tars:
            return ShardSource("::".join(str(t) for t in tars), shuffle_buffer)
        return FolderSource(spec)
    return ShardSource(spec, shuffle_buffer)
