"""CIFAR-10 zero-shot after label-caption training: clipforge vs the same recipe with open_clip's model and loss.

    python benchmarks/cifar_zeroshot.py --steps 400 --seeds 0 1 2 --json runs/bench/cifar.json
    python benchmarks/cifar_zeroshot.py --transfer --steps 400 --json runs/bench/transfer.json

Recipe: ViT-Tiny-64, batch 96, AdamW lr 5e-4 wd 0.2, 5% warmup + cosine, fp32, captions from class names with
clipforge's caption grammar (``--label-captions default``), on ../shared/data/cifar10/train (20k images).
Both implementations run through the same loop and data stream, with the same seeds; only the model and loss code
differ (clipforge's vs open_clip's ``CLIP`` and ``ClipLoss`` built from the same config). Zero-shot top-1 on all
10,000 cifar10/test images with the prompt "a photo of a {}.", plus coco-mini retrieval R@1/5/10 (5 captions each).

``--transfer``: cat and truck are left out of training entirely; the text tower is the pretrained, locked
all-MiniLM-L6-v2; report zero-shot accuracy on the unseen classes' test images against chance.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import clipforge
from clipforge.bench import peers
from clipforge.bench.peers import OpenClipForTraining, OpenClipLoss
from clipforge.data import ShardSource, find_classnames, read_classnames
from clipforge.data import evaluation_set
from clipforge.evaluate import embed_labelled, embed_pairs, retrieval_metrics
from clipforge.preprocess import Preprocess
from clipforge.train import TrainConfig, train
from clipforge.zeroshot import zero_shot_classifier

REPO = Path(__file__).resolve().parents[1]


def evaluate(model, tokenizer, data: Path, classes: list[int] | None = None) -> dict:
    model.eval()
    test = ShardSource(str(data / "cifar10" / "test" / "test-{000000..000004}.tar"), shuffle_buffer=0)
    classnames = read_classnames(find_classnames(test.urls[0]))
    features, labels = embed_labelled(model, test, Preprocess(model.image_size), progress=False)
    weights = zero_shot_classifier(model, tokenizer, classnames, ["a photo of a {}."])
    predictions = (features @ weights).argmax(dim=1)
    result = {"zeroshot_top1": (predictions == labels).float().mean().item()}
    if classes:
        mask = torch.isin(labels, torch.tensor(classes))
        result["unseen_top1_of_10"] = (predictions[mask] == labels[mask]).float().mean().item()
        sub = (features[mask] @ weights[:, classes]).argmax(dim=1)
        result[f"unseen_top1_of_{len(classes)}"] = (torch.tensor(classes)[sub] == labels[mask]).float().mean().item()
    pairs = evaluation_set(ShardSource(str(data / "coco-mini" / "test" / "test-000000.tar"), 0),
                           Preprocess(model.image_size))
    with torch.no_grad():
        image_features, text_features = embed_pairs(model, tokenizer, pairs.images, pairs.captions)
    result["coco_mini"] = retrieval_metrics(image_features, text_features, pairs.caption_images)
    return result


def run_one(impl: str, seed: int, args, transfer: bool = False) -> dict:
    cfg = TrainConfig(model="ViT-Tiny-64", train_data=str(args.data / "cifar10" / "train"), label_captions="default",
                      batch_size=args.batch_size, steps=args.steps, lr=5e-4, wd=0.2, seed=seed, workers=1,
                      output=str(args.output / f"{'transfer' if transfer else impl}-seed{seed}"), save_every=0,
                      log_every=25, progress=False, precision="fp32", overwrite=True)  # a rerun measures anew
    if transfer:
        cfg.text_model, cfg.lock_text, cfg.exclude_classes = "all-minilm-l6-v2", True, ["cat", "truck"]
    model = loss = None
    torch.manual_seed(seed)
    if impl == "open_clip":
        model, loss = OpenClipForTraining(peers.build("ViT-Tiny-64")), OpenClipLoss()
    start = time.perf_counter()
    summary = train(cfg, model=model, loss_fn=loss)
    seconds = time.perf_counter() - start
    tokenizer = clipforge.get_tokenizer(clipforge.train.loop.model_config_for(cfg))
    result = evaluate(summary["model"], tokenizer, args.data, classes=[3, 9] if transfer else None)
    result.update(impl=impl, seed=seed, steps=summary["steps"], final_loss=summary["loss"], train_seconds=seconds)
    print(json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--impls", nargs="+", default=["clipforge", "open_clip"])
    parser.add_argument("--transfer", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = []
    for seed in args.seeds:
        for impl in (["clipforge"] if args.transfer else args.impls):
            runs.append(run_one(impl, seed, args, transfer=args.transfer))
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                 "runs": runs}, indent=1))
    for impl in sorted({r["impl"] for r in runs}):
        accs = [r["zeroshot_top1"] for r in runs if r["impl"] == impl]
        print(f"{impl:10s} zero-shot top-1: median {statistics.median(accs):.4f}  runs {accs}")


if __name__ == "__main__":
    main()
