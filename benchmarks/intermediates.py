"""``model.forward_intermediates`` (open_clip's call for the towers' block outputs) against open_clip's, on the same
random weights: every block's output of both towers beside the embeddings, and a probing script's call (one
block, the image tower run no further than it).

    python benchmarks/intermediates.py --json runs/bench/intermediates.json

ViT-B-32 and RN50 at 224 pixels, 16 images and 64 captions (77 tokens) per call, fp32, 2 threads; 5 interleaved
repeats after one warm-up each, medians; the largest difference between the two libraries' outputs beside them
(relative to the largest magnitude of each output).
"""
from __future__ import annotations

import argparse
import statistics
import time

from report import finish, machine

CALLS = {
    "all blocks, both towers": {},
    "one image block, stop early": {"image_indices": [-4], "stop_early": True, "intermediates_only": True},
}


def _largest_difference(theirs: dict, ours: dict) -> float:
    worst = 0.0
    for key, expected in theirs.items():
        pairs = zip(expected, ours[key]) if isinstance(expected, list) else [(expected, ours[key])]
        for a, b in pairs:
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp(min=1.0)))
    return worst


def compare(name: str, images: int, texts: int, repeats: int) -> dict:
    import open_clip
    import torch

    import clipforge
    from clipforge.checkpoint import clipforge_to_openai

    torch.manual_seed(0)
    ours = clipforge.create_model(name).eval()
    theirs = open_clip.create_model(name, pretrained=None).eval()
    theirs.load_state_dict(clipforge_to_openai(ours.state_dict()))
    pixels = torch.randn(images, 3, ours.image_size, ours.image_size)
    words = ["dog", "red", "two", "running", "beach", "child", "ball", "grass", "city", "street"]
    captions = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(4 + i % 12)) for i in range(texts)]
    tokens = clipforge.tokenize(captions)
    report = {}
    for call, kwargs in CALLS.items():
        arguments = (pixels, None if kwargs.get("intermediates_only") else tokens)
        seconds: dict = {"clipforge": [], "open_clip": []}
        outputs = {}
        with torch.no_grad():
            for library, model in (("clipforge", ours), ("open_clip", theirs)):
                outputs[library] = model.forward_intermediates(*arguments, **kwargs)  # warm-up
            for _ in range(repeats):
                for library, model in (("clipforge", ours), ("open_clip", theirs)):
                    started = time.perf_counter()
                    model.forward_intermediates(*arguments, **kwargs)
                    seconds[library].append(time.perf_counter() - started)
        medians = {library: statistics.median(times) for library, times in seconds.items()}
        report[call] = {"seconds (median)": {k: round(v, 3) for k, v in medians.items()},
                        "speed vs open_clip": round(medians["open_clip"] / medians["clipforge"], 2),
                        "largest relative difference": _largest_difference(outputs["open_clip"],
                                                                           outputs["clipforge"])}
    return report


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "RN50"])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report = {"machine": machine(args.threads), "images": args.images, "texts": args.texts,
              **{name: compare(name, args.images, args.texts, args.repeats) for name in args.models}}
    finish(report, args.json)


if __name__ == "__main__":
    main()
