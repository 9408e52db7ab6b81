"""The score the Flickr8k recipe was chosen by, on development data only (never a test split):
- flickr8k/dev retrieval (1,000 images, 5,000 captions; the standard protocol), R@1/5/10 both ways;
- zero-shot top-1 on every 10th image of cifar10/train (2,000 images; CIFAR-10's test split stays unseen) with bare
  class names, "a photo of a {}." and the paper's CIFAR-10 template ensemble.

    clipforge train --config recipes/flickr8k-search/s1-crop05-flip.yaml --output runs/s1
    python benchmarks/flickr8k_dev.py runs/s1/checkpoints/step-00001500 --name s1 --jsonl runs/bench/flickr8k-dev.jsonl

``--image-size N`` scores a model at another image size than it was trained at (its position grid resized as
``force_image_size`` resizes it). Text->image recall is also given over the dev captions that name a colour (red,
black, white ...; about 40% of them) and over the rest, apart: what colour augmentation can change.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import clipforge
from clipforge.data import evaluation_set, open_source
from clipforge.evaluate.datasets import open_labelled
from clipforge.evaluate.features import embed_labelled
from clipforge.evaluate.metrics import topk_accuracy
from clipforge.evaluate.retrieval import embed_pairs, retrieval_metrics
from clipforge.zeroshot import zero_shot_classifier

REPO = Path(__file__).resolve().parents[1]
COLOUR_WORDS = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey"}


class EveryNth:
    """A source's every n-th raw sample, taken before decoding: the subset costs what it holds, not the split."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def samples(self, *args, **kwargs):
        return itertools.islice(self.source.samples(*args, **kwargs), 0, None, self.n)


@torch.no_grad()
def dev_scores(model, preprocess, tokenizer, data: Path, every: int = 10) -> dict:
    pairs = evaluation_set(open_source(str(data / "flickr8k" / "dev"), shuffle_buffer=0), preprocess, compact=True)
    images, texts = embed_pairs(model, tokenizer, pairs.images, pairs.captions)
    out = {k: round(v, 4) for k, v in retrieval_metrics(images, texts, pairs.caption_images).items()}
    # text->image over the captions that name a colour and over the rest: what colour augmentation can change
    coloured = torch.tensor([bool(COLOUR_WORDS & set(c.lower().replace(".", " ").replace(",", " ").split()))
                             for c in pairs.captions])
    for name, rows in (("colour", coloured), ("no_colour", ~coloured)):
        found = retrieval_metrics(images, texts[rows], torch.as_tensor(pairs.caption_images)[rows])
        out.update({f"{name}_captions_t2i_R@{k}": round(found[f"text_to_image_R@{k}"], 4) for k in (1, 5, 10)})
        out[f"{name}_captions"] = int(rows.sum())
    cifar = open_labelled(data / "cifar10", "train")
    features, labels = embed_labelled(model, EveryNth(cifar.source, every), preprocess, progress=False)
    for name, templates in (("bare", ["{}"]), ("photo", ["a photo of a {}."]), ("ensemble", cifar.templates)):
        weights = zero_shot_classifier(model, tokenizer, cifar.classnames, templates)
        out[f"cifar10_train_subset_{name}"] = round(topk_accuracy(features @ weights.cpu(), labels)[1], 4)
    out["cifar10_train_subset_images"] = len(labels)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--name", help="the row's name [the checkpoint path]")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--jsonl", type=Path, help="append the row to this file")
    parser.add_argument("--image-size", type=int, help="score the model at this image size [its own]")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, preprocess, tokenizer = clipforge.load(args.checkpoint, force_image_size=args.image_size)
    row = {"name": args.name or args.checkpoint, "checkpoint": args.checkpoint, "image_size": model.image_size,
           **dev_scores(model, preprocess, tokenizer, args.data), "eval_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(row))
    if args.jsonl:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with args.jsonl.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
