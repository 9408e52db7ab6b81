"""Accuracy under distribution shift: a classifier (zero-shot or a linear probe) on a labelled test set with each
common corruption at each severity (``evaluate.corruptions``), and the plots that show it."""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..data.pipeline import SkipSample, decode_sample
from ..files import atomic_path
from .corruptions import corrupt
from .features import embed_images
from .metrics import pyplot, topk_accuracy


def parse_severities(spec: str) -> list[int]:
    """``"1..5"``, ``"3"`` or ``"1,3,5"`` -> severities, each checked to be in 1..5."""
    from .corruptions import check_severity

    if ".." in spec:
        low, high = (int(v) for v in spec.split(".."))
        values = list(range(low, high + 1))
    else:
        values = [int(v) for v in spec.split(",") if v.strip()]
    if not values:
        raise ValueError(f"--severities {spec!r}: no severity")
    return [check_severity(v) for v in values]


class ShiftedSets:
    """A labelled test set decoded once, and each (corruption, severity) version of it, made once: kept on disk under
    ``cache_dir`` (keyed by the data, the image count and the seed), so that evaluating many models (a WiSE-FT sweep)
    pays for the corruptions only the first time."""

    def __init__(self, dataset, max_images: int | None = None, seed: int = 0, cache_dir: str | Path | None = None,
                 progress: bool = True):
        self.images, labels, skipped = [], [], Counter()
        for raw in dataset.source.samples(0, 1, 0, 0, skipped):
            if max_images and len(self.images) >= max_images:
                break
            if "cls" not in raw:
                continue
            try:
                image, _ = decode_sample(dict(raw, txt=b"-"), rng=random.Random(0))
            except SkipSample:
                continue
            self.images.append(image)
            labels.append(int(raw["cls"]))
        if not self.images:
            raise ValueError(f"no usable labelled samples (skipped: {dict(skipped) or 'none'})")
        self.labels, self.seed, self.progress = torch.tensor(labels), seed, progress
        self.folder = None
        if cache_dir is not None:
            digest = hashlib.sha256(f"{getattr(dataset.source, 'anchor', '')}|{dataset.name}|{len(self.images)}|"
                                    f"{seed}|{labels[:50]}".encode()).hexdigest()[:16]
            self.folder = Path(cache_dir) / f"{dataset.name}-{digest}"

    def shifted(self, name: str, severity: int) -> list[Image.Image]:
        path = self.folder / f"{name}-{severity}.npz" if self.folder else None
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as stored:
                return [Image.fromarray(stored[f"arr_{i}"]) for i in range(len(self.images))]
        bar = tqdm(self.images, desc=f"{name} {severity}", unit="img", disable=not self.progress, leave=False)
        images = [corrupt(image, name, severity, self.seed, i) for i, image in enumerate(bar)]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, *[np.asarray(image) for image in images])
        return images


def robustness(model, shifted_sets: ShiftedSets, preprocess, classify, corruptions: list[str],
               severities: list[int], batch_size: int = 256) -> dict:
    """Top-1 of ``classify(features) -> logits`` on the clean images and on every (corruption, severity); the mean
    over all shifted sets, and per corruption."""
    labels = shifted_sets.labels

    def accuracy(images) -> float:
        features = embed_images(model, images, preprocess, batch_size, normalize=True)
        return topk_accuracy(classify(features), labels)[1]

    result = {"clean": accuracy(shifted_sets.images), "images": len(labels), "corruptions": {}}
    for name in corruptions:
        result["corruptions"][name] = {str(severity): accuracy(shifted_sets.shifted(name, severity))
                                       for severity in severities}
    per_corruption = {name: sum(v.values()) / len(v) for name, v in result["corruptions"].items()}
    result["mean_per_corruption"] = per_corruption
    result["mean_corrupted"] = sum(per_corruption.values()) / len(per_corruption)
    return result


def severity_png(result: dict, path: str | Path, title: str = "") -> Path:
    """Accuracy against severity, one line per corruption, the clean accuracy at severity 0."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_severity in result["corruptions"].items():
        severities = sorted(int(s) for s in by_severity)
        ax.plot([0] + severities, [result["clean"]] + [by_severity[str(s)] for s in severities], marker=".",
                label=name)
    ax.set_xlabel("severity (0: clean)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title or f"clean {result['clean']:.1%}, mean corrupted {result['mean_corrupted']:.1%}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def effective_robustness_png(points: list[dict], path: str | Path, title: str = "") -> Path:
    """The paper's Figure 13 at our scale: each model's clean accuracy (x) against its accuracy under shift (y),
    with y = x; ``points``: [{"label", "clean", "shifted", "group"?}], groups drawn as lines in order."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    groups: dict[str, list[dict]] = {}
    for point in points:
        groups.setdefault(point.get("group", point["label"]), []).append(point)
    for group, members in groups.items():
        ax.plot([p["clean"] for p in members], [p["shifted"] for p in members], marker="o",
                linestyle="-" if len(members) > 1 else "none", label=group)
        for p in members:
            if p.get("annotate", True):
                ax.annotate(p["label"], (p["clean"], p["shifted"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    top = max(max(p["clean"], p["shifted"]) for p in points) * 1.05
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="y = x (no loss under shift)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("accuracy, clean test set")
    ax.set_ylabel("mean accuracy, corrupted test sets")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
