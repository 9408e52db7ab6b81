"""Accuracy under distribution shift: a classifier (zero-shot or a linear probe) on a labelled test set with each
common corruption at each severity (``evaluate.corruptions``), and the plots that show it."""
from __future__ import annotations

from pathlib import Path

from .corruptions import corrupt
from .features import embed_labelled
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


def robustness(model, dataset, preprocess, classify, corruptions: list[str], severities: list[int],
               max_images: int | None = None, seed: int = 0, batch_size: int = 256, progress: bool = True,
               clean=None) -> dict:
    """Top-1 of ``classify(features) -> logits`` on the clean images and on every (corruption, severity); the mean
    over all shifted sets, and per corruption. ``clean``: (features, labels) already embedded."""
    def accuracy(features, labels) -> float:
        return topk_accuracy(classify(features), labels)[1]

    features, labels = clean or embed_labelled(model, dataset.source, preprocess, batch_size, progress=progress,
                                               desc="clean", limit=max_images)
    result = {"clean": accuracy(features, labels), "images": len(labels), "corruptions": {}}
    for name in corruptions:
        result["corruptions"][name] = {}
        for severity in severities:
            shifted, shifted_labels = embed_labelled(
                model, dataset.source, preprocess, batch_size, progress=progress, desc=f"{name} {severity}",
                limit=max_images, image_transform=lambda image, i: corrupt(image, name, severity, seed, i))
            result["corruptions"][name][str(severity)] = accuracy(shifted, shifted_labels)
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
