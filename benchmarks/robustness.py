"""Effective robustness at our scale: zero-shot CLIP vs fine-tuned vs WiSE-FT vs a supervised model, CIFAR-10 -> CIFAR-10-C.

    python benchmarks/robustness.py --zeroshot runs/flickr8k-study/clipforge-seed0/checkpoints/step-XXXXXXXX \\
        --json runs/bench/robustness.json --plot docs/img/effective-robustness.png

1. Z: the Flickr8k-trained CLIP (benchmarks/flickr8k.py's seed 0), zero-shot on CIFAR-10 with the template ensemble.
2. F: Z fine-tuned on cifar10/train (`clipforge finetune`: image tower and zero-shot-initialised head, cross-entropy).
3. WiSE-FT: (1 - alpha) Z + alpha F for alpha in 0, 0.1, ..., 1.
4. S: the same architecture trained on cifar10/train only, from scratch, with captions made from the labels
   (`--label-captions default`), classified by its own prompts: a supervised model; checkpoints along its training
   give the line that models of its kind draw (the paper's "standard models" line).
Each is measured on cifar10/test: clean top-1, and the mean top-1 over 14 corruptions x 5 severities
(`clipforge eval robustness`'s sets, the first --max-images test images; clean accuracy is also taken on those).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import clipforge
from clipforge.evaluate.corruptions import resolve
from clipforge.evaluate.datasets import open_labelled
from clipforge.evaluate.robustness import ShiftedSets, effective_robustness_png, robustness
from clipforge.finetune import CLIPClassifier, load_classifier, wise_ft
from clipforge.pretrained import cache_dir
from clipforge.train import TrainConfig, train
from clipforge.train.cli import read_config
from clipforge.train.checkpoints import checkpoint_dirs

REPO = Path(__file__).resolve().parents[1]
ALPHAS = [round(0.1 * i, 1) for i in range(11)]


def measure(model: CLIPClassifier, sets: ShiftedSets, corruptions) -> dict:
    head = model.classifier.detach().float()
    result = robustness(model, sets, clipforge.Preprocess(model.image_size), lambda f: f @ head.T, corruptions,
                        [1, 2, 3, 4, 5])
    return {"clean": result["clean"], "shifted": result["mean_corrupted"],
            "per_corruption": result["mean_per_corruption"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zeroshot", required=True, help="the Flickr8k-trained CLIP checkpoint")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "flickr8k.yaml",
                        help="its recipe: the supervised baseline gets the same architecture and budget")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "robustness-study")
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--supervised-steps", type=int, help="[the recipe's steps]")
    parser.add_argument("--max-images", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cifar = args.data / "cifar10"
    dataset = open_labelled(cifar, "test")
    corruptions = resolve("all")
    sets = ShiftedSets(dataset, args.max_images, seed=0, cache_dir=cache_dir() / "corruptions")
    recipe = read_config(args.recipe)
    rows, start = [], time.time()

    def record(label: str, group: str, model: CLIPClassifier, **extra):
        rows.append({"label": label, "group": group, **measure(model.eval(), sets, corruptions), **extra})
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"rows": rows, "minutes": (time.time() - start) / 60}, indent=1))

    # 2. fine-tune the zero-shot model on CIFAR-10
    finetuned_dir = args.output / "finetuned"
    if not checkpoint_dirs(finetuned_dir):
        train(TrainConfig(objective="classify", pretrained=args.zeroshot, train_data=str(cifar / "train"),
                          templates=dataset.templates, steps=args.finetune_steps, lr=args.finetune_lr, wd=0.1,
                          batch_size=recipe.get("batch_size", 128), crop_scale=tuple(recipe.get("crop_scale", (0.9, 1))),
                          workers=recipe.get("workers", 2), output=str(finetuned_dir), save_every=0, progress=False))
    finetuned = load_classifier(checkpoint_dirs(finetuned_dir)[-1])
    zeroshot = load_classifier(args.zeroshot, finetuned.classnames, finetuned.templates)
    # 1 and 3: the WiSE-FT line from the zero-shot model (alpha 0) to the fine-tuned one (alpha 1)
    for alpha in ALPHAS:
        record(f"{alpha:.1f}", "WiSE-FT: zero-shot (0.0) to fine-tuned (1.0)", wise_ft(zeroshot, finetuned, alpha),
               alpha=alpha, annotate=alpha in (0.0, 0.5, 1.0))
    # 4. the supervised baseline: same architecture, CIFAR-10 labels only, checkpoints along the way
    supervised_dir = args.output / "supervised"
    steps = args.supervised_steps or recipe["steps"]
    if not checkpoint_dirs(supervised_dir):
        settings = {k: v for k, v in recipe.items() if k not in ("train_data", "val_data", "text_cache")}
        train(TrainConfig(**{**settings, "train_data": str(cifar / "train"), "label_captions": "default",
                             "steps": steps, "save_every": max(1, steps // 4), "keep": 4,
                             "output": str(supervised_dir), "progress": False}))
    for folder in checkpoint_dirs(supervised_dir):
        step = int(folder.name.split("-")[1])
        record(f"{step} steps", "supervised on CIFAR-10 labels (same architecture)",
               load_classifier(folder, finetuned.classnames, finetuned.templates), step=step)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        effective_robustness_png(rows, args.plot, f"CIFAR-10 -> CIFAR-10-C ({args.max_images} test images)")
    for row in rows:
        print(f"{row['group'][:40]:40s} {row['label']:>10s}  clean {row['clean']:.1%}  corrupted {row['shifted']:.1%}")


if __name__ == "__main__":
    main()
