"""Labelled evaluation datasets: CLIP_benchmark WebDataset layout, image folders, CSV files.

``<root>/classnames.txt`` (one name per line, label order), optional ``<root>/zeroshot_classification_templates.txt``
(one prompt per line with ``{}`` or ``{c}``), and the split as ``<root>/<split>/*.tar`` (samples: image + ``.cls``),
``<root>/<split>/<class name>/*.jpg`` or ``<root>/<split>.csv`` (columns ``filepath`` and ``label``).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..data.sources import IMAGE_EXTENSIONS, IndexedSource, ShardSource, read_classnames


@lru_cache(maxsize=1)
def _shipped() -> dict:
    return json.loads((resources.files("clipforge") / "zeroshot_prompts.json").read_text())


def shipped_classnames(dataset: str) -> list[str] | None:
    """The paper's class names for a standard dataset (imagenet1k, cifar10, cifar100, food101, ...), if shipped."""
    return _shipped()["classnames"].get(dataset)


def shipped_templates(dataset: str) -> list[str] | None:
    """The paper's prompt templates for a standard dataset (80 for imagenet1k, 18 for cifar10 ...), if shipped."""
    return _shipped()["templates"].get(dataset)


def list_template_sets() -> list[str]:
    return sorted(_shipped()["templates"])


def load_templates(path: str | Path) -> list[str]:
    """A templates file: one prompt per line with ``{}`` (or ``{c}``) where the class name goes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"templates file not found: {path}")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not templates:
        raise ValueError(f"{path}: no templates")
    for line_number, template in enumerate(templates, 1):
        if "{}" not in template and "{c}" not in template:
            raise ValueError(f"{path}: template {template!r} has no '{{}}' placeholder for the class name")
    return [t.replace("{c}", "{}") for t in templates]


class _ListSource(IndexedSource):
    def __init__(self, items: list[tuple[str, int]]):
        self.labelled = items

    def __len__(self) -> int:
        return len(self.labelled)

    def samples(self, part, parts, epoch, seed, errors):
        for path, label in self.labelled[part::parts]:  # evaluation order is the listed order
            try:
                data = Path(path).read_bytes()
            except OSError:
                errors["missing_file"] += 1
                continue
            yield {"__key__": path, "image_bytes": data, "cls": str(label).encode()}


@dataclass
class LabelledDataset:
    name: str
    source: object
    classnames: list[str]
    templates: list[str] | None


def open_labelled(root: str | Path, split: str = "test", dataset: str | None = None) -> LabelledDataset:
    """Open ``root``'s ``split`` in any supported layout; ``dataset`` names a shipped class/template set to use
    when the folder has no classnames.txt / templates file (e.g. ``cifar10``)."""
    root = Path(root)
    name = dataset or root.name
    if not root.exists():
        raise FileNotFoundError(f"dataset root not found: {root}")
    classnames_file = root / "classnames.txt"
    templates_file = root / "zeroshot_classification_templates.txt"
    templates = load_templates(templates_file) if templates_file.exists() else shipped_templates(name)
    split_dir, split_csv = root / split, root / f"{split}.csv"
    if split_dir.is_dir() and sorted(split_dir.glob("*.tar")):
        source = ShardSource("::".join(str(p) for p in sorted(split_dir.glob("*.tar"))), shuffle_buffer=0)
        classnames = read_classnames(classnames_file) if classnames_file.exists() else shipped_classnames(name)
        if classnames is None:
            raise FileNotFoundError(f"missing classnames file {classnames_file} (CLIP_benchmark layout), and no "
                                    f"shipped class names for a dataset named {name!r}; pass --dataset NAME")
    elif split_dir.is_dir():
        folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"{split_dir}: neither .tar shards nor class folders")
        classnames = read_classnames(classnames_file) if classnames_file.exists() else [p.name for p in folders]
        items = []
        for label, folder in enumerate(folders):
            items += [(str(p), label) for p in sorted(folder.iterdir())
                      if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
        source = _ListSource(items)
    elif split_csv.exists():
        classnames = read_classnames(classnames_file) if classnames_file.exists() else shipped_classnames(name)
        items = []
        with open(split_csv, newline="") as handle:
            for row in csv.DictReader(handle):
                label = row.get("label", "")
                if not label.lstrip("-").isdigit():
                    if classnames is None or label not in classnames:
                        raise ValueError(f"{split_csv}: label {label!r} is not among the class names")
                    label = classnames.index(label)
                items.append((str(split_csv.parent / row["filepath"]), int(label)))
        if classnames is None:
            raise FileNotFoundError(f"missing classnames file {classnames_file}")
        source = _ListSource(items)
    else:
        raise FileNotFoundError(f"no split {split!r} under {root}: expected {split_dir}/*.tar, class folders in "
                                f"{split_dir}, or {split_csv}")
    return LabelledDataset(name, source, classnames, templates)
