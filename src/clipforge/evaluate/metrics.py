"""Classification metrics as CLIP_benchmark reports them, a per-class table, and the confusion matrix as a PNG."""
from __future__ import annotations

from pathlib import Path

import torch


def check_labels(labels: torch.Tensor, n_classes: int, where: str = "") -> None:
    """A clear error for a label outside ``0 .. n_classes - 1``."""
    if labels.numel() and (int(labels.max()) >= n_classes or int(labels.min()) < 0):
        bad = int(labels[(labels >= n_classes) | (labels < 0)][0])
        raise ValueError(f"{where}label {bad} is outside the class list ({n_classes} classes)")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1,)) -> dict[int, float]:
    """{k: fraction of rows whose label is among their k highest logits}; k is capped at the number of classes."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    return {k: (top[:, :k] == labels[:, None]).any(dim=1).float().mean().item() for k in ks}


def top1_top5(logits: torch.Tensor, labels: torch.Tensor, prefix: str = "acc") -> dict[str, float]:
    """``{prefix}1`` and, when there are at least 5 classes, ``{prefix}5`` (with fewer, every label is among the top
    5: a figure of 1.0 that says nothing), as CLIP_benchmark reports them."""
    ks = (1, 5) if logits.shape[1] >= 5 else (1,)
    return {f"{prefix}{k}": value for k, value in topk_accuracy(logits, labels, ks).items()}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classnames: list[str]) -> dict:
    """``acc1``, ``acc5`` (when there are at least 5 classes), ``mean_per_class_recall``, ``per_class`` and
    ``confusion_matrix`` (rows: true class, columns: predicted)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    n_classes = logits.shape[1]
    if labels.numel() == 0:
        raise ValueError("no samples to evaluate")
    check_labels(labels, n_classes)
    predictions = logits.argmax(dim=1)
    metrics = top1_top5(logits, labels)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(dim=1)
    recall = confusion.diag().float() / support.clamp(min=1)
    present = support > 0  # as sklearn's balanced accuracy: classes absent from the labels do not count
    metrics["mean_per_class_recall"] = recall[present].mean().item()
    metrics["per_class"] = {classnames[i]: {"recall": recall[i].item(), "support": int(support[i])}
                            for i in range(n_classes)}
    metrics["confusion_matrix"] = confusion.tolist()
    return metrics


def per_class_table(metrics: dict) -> str:
    rows = [f"{'class':24s} {'recall':>7s} {'n':>6s}"]
    for name, row in metrics["per_class"].items():
        rows.append(f"{name[:24]:24s} {row['recall']:7.1%} {row['support']:6d}")
    return "\n".join(rows)


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("PNG plots need matplotlib: pip install 'clipforge[eval]'") from None
    return plt


def confusion_png(confusion, classnames: list[str], path: str | Path, title: str = "") -> Path:
    plt = pyplot()
    matrix = torch.as_tensor(confusion, dtype=torch.float)
    matrix = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.35 * len(classnames) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(classnames) <= 60:
        ax.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classnames)), classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def fewshot_png(curve: dict, zeroshot_acc: float | None, path: str | Path, title: str = "") -> Path:
    """``curve``: {k: [accuracy per seed]}; drawn as mean with min-max band, zero-shot as a horizontal line."""
    plt = pyplot()
    ks = sorted(curve)
    means = [sum(curve[k]) / len(curve[k]) for k in ks]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, means, marker="o", label="linear probe (few-shot)")
    ax.fill_between(ks, [min(curve[k]) for k in ks], [max(curve[k]) for k in ks], alpha=0.2)
    if zeroshot_acc is not None:
        ax.axhline(zeroshot_acc, color="tab:red", linestyle="--", label="zero-shot")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
