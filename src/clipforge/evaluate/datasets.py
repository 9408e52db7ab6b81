"""Labelled evaluation datasets: CLIP_benchmark WebDataset layout, image folders, CSV files.

``<root>/classnames.txt`` (one name per line, label order), optional ``<root>/zeroshot_classification_templates.txt``
(one prompt per line with ``{}`` or ``{c}``), and the split as ``<root>/<split>/*.tar`` (samples: image + ``.cls``),
``<root>/<split>/<class name>/*.jpg`` or ``<root>/<split>.csv`` (columns ``filepath`` and ``label``). A root with
no split that holds class folders itself (torchvision's ``ImageFolder``, what ``clipforge classify`` reads) is taken
as the split asked for: the same images for every split, so that a probe trained and tested on them is refused.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..data.sources import CLASSNAMES_FILE, class_dirs, holds_class_folders, open_source, read_classnames
from ..prompts import load_templates, shipped_classnames, shipped_templates


@dataclass
class LabelledDataset:
    name: str
    source: object
    classnames: list[str]
    templates: list[str] | None
    spec: str  # what the split was read from (a folder or CSV): two splits with one spec are the same images


def check_distinct_splits(train: LabelledDataset, test: LabelledDataset, train_split: str, test_split: str) -> None:
    """A probe fitted on the images it is scored on measures nothing: refused where two split names come to the same
    images (a plain image folder is every split), said where one split was named for both."""
    if train.spec == test.spec and train_split == test_split:
        print(f"warning: fitting and scoring on the same images ({train.spec}): the figure is a fit, not a test",
              file=sys.stderr)
    elif train.spec == test.spec:
        raise ValueError(f"splits {train_split!r} and {test_split!r} both read {train.spec}: fitting and scoring need "
                         f"separate images, e.g. <root>/{train_split}/<class>/ beside <root>/{test_split}/<class>/ "
                         f"(or <root>/{train_split}.csv, or CLIP_benchmark's shards)")


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
    if not (split_dir.is_dir() or split_csv.exists()) and root.is_dir() and not any(root.glob("*.tar")) \
            and holds_class_folders(root):
        split_dir = root  # a plain image folder: its class folders are the split
    if split_dir.is_dir() and not any(split_dir.glob("*.tar")):  # one subfolder per class, named for it
        classnames = classnames or [p.name for p in class_dirs(split_dir)]
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
    return LabelledDataset(name, open_source(spec, shuffle_buffer=0, classnames=classnames), classnames, templates,
                           spec)
