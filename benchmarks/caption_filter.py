"""CLIP-score filtering at our scale: does a model trained here tell a photo's own caption from another photo's, and
how clean is what ``clipforge filter`` keeps from a collection where some captions belong to other photos?

    python benchmarks/caption_filter.py runs/flickr8k/checkpoints/step-00002400 --json runs/bench/caption-filter.json

On Flickr8k test (1,000 photos, each with its first caption, as ``embed --captions`` stores it):
- matched pairs' scores against mismatched ones (each photo with the next photo's caption): medians, and the AUC
  (how often a matched pair outscores a mismatched one);
- a noisy collection: a fraction r of the photos given another photo's caption (r = 0.1, 0.3, 0.5; five draws each),
  filtered as ``clipforge filter --keep-fraction 1-r`` filters (the top scores kept): the fraction of kept pairs that
  are matched (precision) beside keeping the same number at random (the peer: no filter);
- the commands themselves, timed once: ``clipforge embed`` over the test shards without and with ``--captions``, and
  ``clipforge filter --keep-fraction 0.7`` (wall seconds, model loading included).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import clipforge
from clipforge.data import evaluation_set, open_source
from clipforge.evaluate.retrieval import embed_pairs

REPO = Path(__file__).resolve().parents[1]


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive outscores a negative), ties counted half (the Mann-Whitney statistic)."""
    order = np.argsort(np.concatenate([positive, negative]), kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    return float((ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2)
                 / (len(positive) * len(negative)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "test"))
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    model, preprocess, tokenizer = clipforge.load(args.checkpoint)
    pairs = evaluation_set(open_source(args.data, shuffle_buffer=0), preprocess, compact=True)
    owners = pairs.caption_images.tolist()
    first = [owners.index(i) for i in range(len(pairs.images))]  # each photo's first caption
    captions = [pairs.captions[j] for j in first]
    images, texts = (x.numpy() for x in embed_pairs(model, tokenizer, pairs.images, captions))
    n = len(images)
    matched = (images * texts).sum(1)
    mismatched = (images * np.roll(texts, 1, axis=0)).sum(1)
    result = {"checkpoint": args.checkpoint, "photos": n,
              "matched_median": round(float(np.median(matched)), 4),
              "mismatched_median": round(float(np.median(mismatched)), 4),
              "auc": round(auc(matched, mismatched), 4), "noisy": {}}
    print(json.dumps(result), flush=True)
    for rate in (0.1, 0.3, 0.5):
        precision, chance = [], []
        for draw in range(5):
            rng = np.random.default_rng(draw)
            noisy = rng.choice(n, size=int(rate * n), replace=False)
            owner = np.arange(n)
            owner[noisy] = np.roll(noisy, 1)  # those photos get each other's captions: none keeps its own
            scores = (images * texts[owner]).sum(1)
            keep = int(round((1 - rate) * n))
            kept = np.argsort(-scores, kind="stable")[:keep]
            precision.append(float((owner[kept] == kept).mean()))
            at_random = rng.choice(n, size=keep, replace=False)
            chance.append(float((owner[at_random] == at_random).mean()))
        result["noisy"][str(rate)] = {"kept_matched_fraction": round(statistics.median(precision), 4),
                                      "at_random": round(statistics.median(chance), 4),
                                      "draws": [round(x, 4) for x in precision]}
        print(rate, result["noisy"][str(rate)], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cli = [sys.executable, "-m", "clipforge.cli"]
        start = time.perf_counter()
        subprocess.run([*cli, "embed", args.data, f"{tmp}/plain", "--pretrained", args.checkpoint, "--no-progress"],
                       check=True)
        plain_s = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([*cli, "embed", args.data, f"{tmp}/emb", "--pretrained", args.checkpoint, "--captions",
                        "--no-progress"], check=True)
        embed_s = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([*cli, "filter", f"{tmp}/emb", f"{tmp}/kept", "--keep-fraction", "0.7", "--no-progress"],
                       check=True)
        result["commands"] = {"embed_s": round(plain_s, 1), "embed_captions_s": round(embed_s, 1),
                              "filter_s": round(time.perf_counter() - start, 1),
                              "kept": json.loads(Path(f"{tmp}/kept/filter_info.json").read_text())["kept"]}
    result["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads"
    print(json.dumps(result["commands"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
