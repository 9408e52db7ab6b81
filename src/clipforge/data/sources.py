"""Where (image, text or label) samples come from: WebDataset shards, CSV files, image folders, generated shapes.

``open_source(spec)`` is the one place that decides what a path or URL names, for training, evaluation, embedding and
captioning alike. A source yields *raw* samples (undecoded bytes plus text or label) for one part of the data: part
``p`` of ``P`` (one part per rank x DataLoader worker), in an order fixed by ``(seed, epoch)`` (or the listed order,
for evaluation). Decoding happens later, so a resumed run can skip samples it already trained on without decoding
them. ``source.catalogue()`` lists the items themselves (a file, or a key in a shard) for embedding collections.
"""
from __future__ import annotations

import csv
import io
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from ..files import read_user_text

# the image types read from folders and shards: clip-retrieval's five, then what else photos come as and Pillow
# reads as it is installed (an animated GIF gives its first frame)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif", "avif")
# an iPhone's photos: read from folders where pillow-heif is installed (clipforge[heif]), named as passed over if not
HEIF_EXTENSIONS = ("heic", "heif")
SIDECAR_EXTENSIONS = ("txt", "json")  # a folder image's captions and metadata, beside it
# One rule for tables, by preference: the first of these columns present is used.
IMAGE_COLUMNS = ("filepath", "image", "path", "image_path", "file")
CAPTION_COLUMNS = ("title", "caption", "text")  # open_clip's --csv-caption-key default first
LABEL_COLUMN = "label"
CLASSNAMES_FILE = "classnames.txt"


def expand_shards(spec: str) -> list[str]:
    """``'a/{000..009}.tar::b/x.tar'`` -> list of URLs (brace expansion as webdataset does; ``::`` joins lists)."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def upsampling_factors(spec: str, factors) -> list[tuple[list[str], float]]:
    """open_clip's ``--train-data-upsampling-factors``: ``spec``'s ``::``-separated shard lists, each with its factor
    (``"1::2"`` or a list of numbers), every shard of a list drawn that many times as often as with factor 1."""
    groups = spec.split("::")
    values = factors.split("::") if isinstance(factors, str) else list(factors)
    try:
        values = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"upsampling factors {factors!r}: expected numbers separated by '::', e.g. 1::2") from None
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} upsampling factors for {len(groups)} '::'-separated shard lists in {spec!r}: "
                         "give one factor per list")
    if min(values) < 0 or not sum(values) > 0:
        raise ValueError(f"upsampling factors {factors!r}: each 0 or more, and not all 0")
    return [(expand_shards(group), value) for group, value in zip(groups, values)]


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def find_classnames(shard: str) -> Path | None:
    """CLIP_benchmark layout: ``<dataset>/classnames.txt`` beside the ``<dataset>/<split>/`` shard folder."""
    if _is_remote(shard):
        return None
    folder = Path(shard).parent
    for candidate in (folder / CLASSNAMES_FILE, folder.parent / CLASSNAMES_FILE):
        if candidate.exists():
            return candidate
    return None


def class_dirs(folder: Path) -> list[Path]:
    """A labelled folder's class folders in label order: its subfolders by name, hidden ones (.git, .ipynb_checkpoints)
    aside."""
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))


def holds_class_folders(folder: Path) -> bool:
    """Whether any of ``folder``'s class folders (``class_dirs``) holds an image of its own."""
    extensions = _folder_extensions()
    return any(f.suffix.lower().lstrip(".") in extensions for sub in class_dirs(folder) for f in sub.iterdir())


def folder_classnames(spec: str | None, wanted: bool) -> list[str] | None:
    """The class names of ``spec`` where it is a folder of class folders (torchvision's ImageFolder): its
    ``classnames.txt`` (CLIP_benchmark's, beside or above it) or else the folders' names; None for anything else (a
    file, shards, a folder with images of its own). A folder of class folders whose images have sidecar captions is
    read as captioned unless labels are ``wanted`` (--label-captions, fine-tuning, --objective labels)."""
    folder = Path(spec) if spec and not _is_remote(spec) else None
    if folder is None or not folder.is_dir() or any(folder.glob("*.tar")):
        return None
    extensions = _folder_extensions()
    if not holds_class_folders(folder) or any(p.suffix.lower().lstrip(".") in extensions for p in folder.iterdir()):
        return None
    classes = class_dirs(folder)
    if not wanted and any(p.is_file() for c in classes for p in c.rglob("*.txt")):
        return None
    listed = find_classnames(str(folder / "-"))
    if listed is None:
        return [p.name for p in classes]
    names = read_classnames(listed)
    if len(names) != len(classes):
        raise ValueError(f"{listed} names {len(names)} classes, {folder} has {len(classes)} class folders")
    return names


def read_classnames(path: str | Path) -> list[str]:
    names = [line.strip() for line in read_user_text(path, "class names").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def source_classnames(source, needed_for: str | None = None) -> list[str] | None:
    """The class names of a labelled source: its own list, or ``classnames.txt`` beside it (CLIP_benchmark layout).
    ``needed_for`` (e.g. ``"--label-captions"``) turns a missing file into an error that says what needs it."""
    names = getattr(source, "classnames", None)
    if names is None:
        anchor = getattr(source, "anchor", None)
        path = find_classnames(anchor) if anchor else None
        names = read_classnames(path) if path else None
    if names is None and needed_for:
        raise ValueError(f"{needed_for} needs {CLASSNAMES_FILE} beside the shard folder (CLIP_benchmark layout: "
                         f"<dataset>/{CLASSNAMES_FILE} next to <dataset>/<split>/)")
    return names


@dataclass(frozen=True)
class ShardIndex:
    """What a tar shard's headers say: ``members`` maps key -> {extension: (byte offset, size)} for every member
    whose data the file holds in full; ``problem`` says why the rest could not be read (None for a whole shard)."""

    members: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    problem: str | None = None


def _count(members: dict) -> int:
    return sum(map(len, members.values()))


@lru_cache(maxsize=64)
def shard_index(url: str) -> ShardIndex:
    """Read a local shard's tar headers once (no member data). Never raises for a corrupt or truncated file: its
    readable part is indexed and ``problem`` names the damage, for the caller to count or report."""
    import tarfile

    members: dict[str, dict[str, tuple[int, int]]] = {}
    problem = None
    try:
        size = os.path.getsize(url)
        with tarfile.open(url) as tar:
            for member in tar:
                if not (member.isfile() and "." in member.name):
                    continue
                if member.offset_data + member.size > size:
                    problem = f"truncated inside {member.name}"
                    break
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
            else:  # tarfile ends quietly at a cut or garbled header: a whole archive ends with a zero block there
                with open(url, "rb") as handle:
                    handle.seek(tar.offset)
                    end = handle.read(512)
                if len(end) < 512 or any(end):
                    problem = (f"cut short or damaged after {_count(members)} members "
                               f"(no end-of-archive block at byte {tar.offset})")
    except (tarfile.TarError, OSError, EOFError) as error:
        detail = str(error).splitlines()[0].rstrip(":")
        problem = (f"truncated after {_count(members)} members ({detail})" if members
                   else f"not a readable tar file ({detail})")
    return ShardIndex(members, problem)


class ShardSource:
    """WebDataset tar shards (img2dataset layout: image + txt [+ json]; or CLIP_benchmark: image + cls).

    ``upsampling``: one factor per ``::``-separated shard list (``upsampling_factors``). An epoch then reads each shard
    its factor's whole part times, and once more with the probability of its fraction (drawn per epoch and seed, so
    every rank, worker and resumed run reads the same list): open_clip's weights for its resampled shards, as
    epochs."""

    classnames = None
    bad_shards = 0  # unreadable or truncated shards met by the last count or catalogue

    def __init__(self, spec: str, shuffle_buffer: int = 1000, upsampling=None):
        self.spec = spec
        if upsampling is None:
            self.urls, self.weights = expand_shards(spec), None
        else:
            groups = upsampling_factors(spec, upsampling)
            self.urls = [url for urls, _ in groups for url in urls]
            self.weights = [factor for urls, factor in groups for _ in urls]
        self.shuffle_buffer = shuffle_buffer
        self._reported: set[str] = set()  # bad shards already named on stderr
        missing = [u for u in self.urls if not _is_remote(u) and not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                         if len(missing) > 1 else ""))

    @property
    def anchor(self) -> str:
        """Where ``classnames.txt`` is looked for."""
        return self.urls[0]

    def _local_urls(self, what: str) -> list[str]:
        remote = [u for u in self.urls if _is_remote(u)]
        if remote:
            raise ValueError(f"cannot {what} of remote shards ({remote[0]}); pass local files")
        return self.urls

    def _indexes(self, what: str) -> list[tuple[str, ShardIndex]]:
        """Every local shard's header index; a shard that is not a tar file, or is cut short, is reported once on
        stderr (what it still holds in full is kept), so one bad shard does not stop a long job."""
        indexes = [(url, shard_index(url)) for url in self._local_urls(what)]
        bad = [(url, index) for url, index in indexes if index.problem]
        unreported = [(url, index) for url, index in bad if url not in self._reported]
        for url, index in unreported[:3]:  # once per source: a job that counts, then lists, says it once
            print(f"warning: {url}: {index.problem}", file=sys.stderr)
        if len(unreported) > 3:
            print(f"warning: {len(unreported) - 3} more unreadable or truncated shards", file=sys.stderr)
        self._reported.update(url for url, _ in unreported)
        self.bad_shards = len(bad)
        return indexes

    def __len__(self) -> int:
        """Number of samples (an epoch's expected number under upsampling), counted from the tar headers of local
        shards (no decoding)."""
        counts = [len(index.members) for _, index in self._indexes("count the samples")]
        return sum(counts) if self.weights is None else round(sum(w * n for w, n in zip(self.weights, counts)))

    def distinct(self) -> "ShardSource":
        """The shards any epoch can read, each once (what a text cache must hold, whatever an epoch draws)."""
        if self.weights is None:
            return self
        return ShardSource("::".join(url for url, w in zip(self.urls, self.weights) if w > 0), self.shuffle_buffer)

    def epoch_urls(self, epoch: int, seed: int) -> list[str]:
        """The shards an epoch reads, in order: each once, or under upsampling as often as its factor draws."""
        urls = list(self.urls)
        if self.weights is not None:
            draw = random.Random(f"upsample-{seed}-{epoch}")
            urls = [url for url, w in zip(self.urls, self.weights)
                    for _ in range(int(w) + (draw.random() < w - int(w)))]
        random.Random(f"shards-{seed}-{epoch}").shuffle(urls)  # the same order on every part
        return urls

    def catalogue(self) -> list[dict]:
        """``{"shard", "key"}`` of every sample that holds an image, in shard order, read from the tar headers."""
        items = [{"shard": url, "key": key}
                 for url, index in self._indexes("list the images")
                 for key, members in index.members.items() if members.keys() & set(IMAGE_EXTENSIONS)]
        if not items:
            raise ValueError(f"{self.spec}: no images in the shards"
                             + (f" ({self.bad_shards} unreadable)" if self.bad_shards else ""))
        return items

    def samples(self, part: int, parts: int, epoch: int, seed: int, errors: Counter) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        urls = self.epoch_urls(epoch, seed)
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


@dataclass(frozen=True)
class Item:
    """One image file of a table or folder, with its caption text and/or integer label where it has them."""

    path: str
    caption: str | None = None
    label: int | None = None


class IndexedSource:
    """Sources with random access (CSV rows, image folders): split by index; shuffled per ``(seed, epoch)`` when
    ``shuffle``, else in the listed order (evaluation)."""

    items: list[Item]
    anchor: str  # where classnames.txt is looked for
    classnames: list[str] | None = None
    shuffle: bool = True

    def __len__(self) -> int:
        return len(self.items)

    def catalogue(self) -> list[dict]:
        """``{"path", "caption"}`` of every item (the caption's first line, or ""); paths as listed (relative ones
        from the working directory), so that whoever records them knows how they were given."""
        return [{"path": item.path,
                 "caption": (item.caption or "").strip().split("\n")[0].strip()} for item in self.items]

    def samples(self, part: int, parts: int, epoch: int, seed: int, errors: Counter) -> Iterator[dict]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(f"order-{seed}-{epoch}").shuffle(order)
        for index in order[part::parts]:
            item = self.items[index]
            try:
                data = Path(item.path).read_bytes()
            except OSError:
                errors["missing_file"] += 1
                continue
            sample = {"__key__": item.path, "image_bytes": data}
            if item.caption is not None:
                sample["txt"] = item.caption.encode()
            if item.label is not None:
                sample["cls"] = str(item.label).encode()
            yield sample


class CsvSource(IndexedSource):
    """A CSV (or TSV) file: an image path column (``image_key``, else the first of ``IMAGE_COLUMNS``) and a caption
    column (``caption_key``, else ``CAPTION_COLUMNS``) and/or a ``label`` column (an integer, or one of
    ``classnames``). Relative paths are from the file's folder. ``separator``: else a tab for ``.tsv``/``.tab`` files
    and for a header with tabs and no commas (open_clip's ``--csv-separator`` default is a tab), else a comma."""

    def __init__(self, path: str | Path, image_key: str | None = None, caption_key: str | None = None,
                 classnames: list[str] | None = None, shuffle: bool = True, separator: str | None = None):
        path = Path(path)
        self.anchor, self.classnames, self.shuffle = str(path), classnames, shuffle
        with io.StringIO(read_user_text(path, "CSV"), newline="") as handle:
            header = handle.readline()
            handle.seek(0)
            if separator is None:
                tabbed = path.suffix in (".tsv", ".tab") or ("\t" in header and "," not in header)
                separator = "\t" if tabbed else ","
            reader = csv.DictReader(handle, delimiter=separator)
            fields = reader.fieldnames or []
            for given, what in ((image_key, "image path"), (caption_key, "caption")):
                if given is not None and given not in fields:
                    raise ValueError(f"{path}: no {what} column {given!r}; its columns (separated by "
                                     f"{separator!r}): {fields}")
            image_key = image_key or next((f for f in IMAGE_COLUMNS if f in fields), None)
            caption_key = caption_key or next((f for f in CAPTION_COLUMNS if f in fields), None)
            label_key = LABEL_COLUMN if LABEL_COLUMN in fields else None
            if image_key is None or (caption_key is None and label_key is None):
                raise ValueError(f"{path}: need an image path column ({'/'.join(IMAGE_COLUMNS)}) and a caption column "
                                 f"({'/'.join(CAPTION_COLUMNS)}) or a {LABEL_COLUMN!r} column; found columns {fields}")
            self.items = [Item(str(path.parent / row[image_key]), row[caption_key] if caption_key else None,
                               self._label(row[label_key], path) if label_key else None) for row in reader]
        if not self.items:
            raise ValueError(f"{path}: no rows")

    def _label(self, value: str, path: Path) -> int:
        value = value.strip()
        if value.lstrip("-").isdigit():
            return int(value)
        if self.classnames is None or value not in self.classnames:
            raise ValueError(f"{path}: label {value!r} is not among the class names")
        return self.classnames.index(value)


class FolderSource(IndexedSource):
    """A folder of images (searched recursively), each captioned by a sidecar ``.txt`` of the same stem (one caption
    per line) where there is one. With ``classnames``: one subfolder per class, labelled in sorted folder order (as
    torchvision's ImageFolder)."""

    def __init__(self, folder: str | Path, classnames: list[str] | None = None, shuffle: bool = True):
        folder = Path(folder)
        self.anchor, self.classnames, self.shuffle = str(folder / "-"), classnames, shuffle
        passed_over = Counter()
        if classnames is not None:
            classes = class_dirs(folder)
            if not classes:
                raise ValueError(f"{folder}: neither .tar shards nor class folders")
            self.items = [Item(str(p), None, label) for label, sub in enumerate(classes)
                          for p in _images(sub, passed_over)]
        else:
            self.items = [Item(str(p), read_user_text(p.with_suffix(".txt"), "caption")
                               if p.with_suffix(".txt").exists() else None)
                          for p in _images(folder, passed_over)]
        if passed_over:  # said, so that a folder of .heic photos or videos is not found "smaller" without a word
            most = sorted(passed_over.items(), key=lambda kind_n: (-kind_n[1], kind_n[0]))
            kinds = ", ".join(f"{n} {kind}" for kind, n in most[:5])
            more = f" and {len(passed_over) - 5} more kinds" if len(passed_over) > 5 else ""
            n = sum(passed_over.values())
            heif = any(kind.lstrip(".") in HEIF_EXTENSIONS for kind in passed_over)
            if heif:
                from ..preprocess import HEIF_HINT
            print(f"warning: {folder}: {n} file{'s' if n > 1 else ''} passed over as not images by their name "
                  f"({kinds}{more}); images are read from {', '.join('.' + e for e in _folder_extensions())}"
                  + (f"; {HEIF_HINT}" if heif else ""), file=sys.stderr)
        if not self.items:
            raise ValueError(f"{folder}: no images found")


def _images(folder: Path, passed_over: Counter) -> list[Path]:
    """The images in ``folder`` and below, sorted; counts the other files by suffix (not captions, metadata or what
    is hidden: .DS_Store, a .git folder)."""
    images, extensions = [], _folder_extensions()
    for path in folder.rglob("*"):
        suffix = path.suffix.lower().lstrip(".")
        if suffix in extensions:
            images.append(path)
        elif (suffix not in SIDECAR_EXTENSIONS and path.is_file()
              and not any(part.startswith(".") for part in path.relative_to(folder).parts)):
            passed_over["." + suffix if suffix else "without a suffix"] += 1
    return sorted(images)


def _folder_extensions() -> tuple[str, ...]:
    """The suffixes a folder's images are found by: HEIC/HEIF too where pillow-heif is installed (looked for, not
    imported: ``preprocess.open_image`` registers it when it meets one)."""
    import importlib.util

    try:
        heif = importlib.util.find_spec("pillow_heif") is not None
    except ValueError:  # None in sys.modules: made unimportable on purpose
        heif = False
    return IMAGE_EXTENSIONS + (HEIF_EXTENSIONS if heif else ())


def open_source(spec: str, shuffle_buffer: int = 1000, classnames: list[str] | None = None,
                csv_keys: dict | None = None, upsampling=None):
    """The source a spec names: ``*.csv``/``*.tsv``; a folder of ``.tar`` shards; a folder of images (with sidecar
    captions, or with ``classnames`` one subfolder per class); or shard URLs (brace notation, ``::`` lists,
    ``pipe:``). ``shuffle_buffer`` 0 reads in order (evaluation); ``classnames`` names a labelled collection's
    classes (a CSV's label column may use them); ``csv_keys``: a CSV's ``image_key``, ``caption_key`` and
    ``separator`` (``CsvSource``; other sources have no columns to name); ``upsampling``: shard lists' factors
    (``ShardSource``; other sources are refused)."""
    shuffle = shuffle_buffer > 0
    if upsampling is not None and (spec.endswith((".csv", ".tsv")) or Path(spec).is_dir()):
        raise ValueError(f"upsampling factors weigh '::'-separated lists of shards; {spec} is a "
                         f"{'CSV' if spec.endswith(('.csv', '.tsv')) else 'folder'}: name its shards instead "
                         "(e.g. 'a/{000000..000009}.tar::b/{000000..000003}.tar')")
    if spec.endswith((".csv", ".tsv")):
        return CsvSource(spec, classnames=classnames, shuffle=shuffle, **(csv_keys or {}))
    path = Path(spec)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        if tars:
            return ShardSource("::".join(str(t) for t in tars), shuffle_buffer)
        return FolderSource(path, classnames, shuffle)
    if not path.exists() and not _is_remote(spec) and not any(mark in spec for mark in ("{", "::", ".tar")):
        raise FileNotFoundError(f"{spec} not found (expected an image folder, a CSV/TSV, or WebDataset shards)")
    return ShardSource(spec, shuffle_buffer, upsampling)
