"""Labelled evaluation datasets: CLIP_benchmark WebDataset layout, image folders, CSV files.

``<root>/classnames.txt`` (one name per line, label order), optional ``<root>/zeroshot_classification_templates.txt``
(one prompt per line with ``{}`` or ``{c}``), and the split as ``<root>/<split>/*.tar`` (samples: image + ``.cls``),
``<root>/<split>/<class name>/*.jpg`` or ``<root>/<split>.csv`` (columns ``filepath`` and ``label``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.sources import CLASSNAMES_FILE, open_source, read_classnames
from ..prompts import load_templates, shipped_classnames, shipped_templates


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
    classnames_file = root / CLASSNAMES_FILE
    templates_file = root / "zeroshot_classification_templates.txt"
    templates = load_templates(templates_file) if templates_file.exists() else shipped_templates(name)
    classnames = read_classnames(classnames_file) if classnames_file.exists() else None
    split_dir, split_csv = root / split, root / f"{split}.csv"
    if split_dir.is_dir() and not any(split_dir.glob("*.tar")):  # one subfolder per class, named for it
        classnames = classnames or sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        spec = str(split_dir)
    elif split_dir.is_dir() or split_csv.exists():
        classnames = classnames or shipped_classnames(name)
        if classnames is None:
            raise FileNotFoundError(f"missing classnames file {classnames_file} (CLIP_benchmark layout), and no "
                                    f"shipped class names for a dataset named {name!r}; pass --dataset NAME")
        spec = str(split_dir if split_dir.is_dir() else split_csv)
    else:
        raise FileNotFoundError(f"no split {split!r} under {root}: expected {split_dir}/*.tar, class folders in "
                                f"{split_dir}, or {split_csv}")
    return LabelledDataset(name, open_source(spec, shuffle_buffer=0, classnames=classnames), classnames, templates)
