"""Paired bootstrap over images: how far each report's per-image CIDEr is from a baseline's, with a 95% interval.

    python benchmarks/paired_cider.py BASELINE.json OTHER.json [...] [--resamples 2000] [--seed 0]

The reports are ``clipforge caption eval --json`` files over the same images in the same order (their references are
checked equal). CIDEr's document frequencies come from the references alone, so per-image scores are comparable across
reports; the interval is over images, not over training runs.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from clipforge.captioning.metrics import tokenize_for_scoring


def per_image_cider(report: dict) -> tuple[float, np.ndarray]:
    from pycocoevalcap.cider.cider import Cider

    captions = report["captions"]
    truth = {i: [tokenize_for_scoring(r) for r in c["references"]] for i, c in enumerate(captions)}
    candidates = {i: [tokenize_for_scoring(c["caption"])] for i, c in enumerate(captions)}
    mean, scores = Cider().compute_score(truth, candidates)
    return float(mean), np.asarray(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline")
    p.add_argument("others", nargs="+")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    baseline = json.load(open(args.baseline))
    base_mean, base = per_image_cider(baseline)
    for path in args.others:
        rng = np.random.default_rng(args.seed)  # the same resamples for every report: order does not matter
        report = json.load(open(path))
        if [c["references"] for c in report["captions"]] != [c["references"] for c in baseline["captions"]]:
            raise SystemExit(f"{path}: not the baseline's images (references differ)")
        mean, scores = per_image_cider(report)
        difference = scores - base
        resampled = [difference[rng.integers(0, len(difference), len(difference))].mean()
                     for _ in range(args.resamples)]
        low, high = np.percentile(resampled, [2.5, 97.5])
        print(f"{path}: CIDEr {mean * 100:.1f} against {base_mean * 100:.1f}: {difference.mean() * 100:+.1f} "
              f"(95% interval {low * 100:+.1f} to {high * 100:+.1f})")


if __name__ == "__main__":
    main()
