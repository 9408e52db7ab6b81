"""Gradient checkpointing on CPU: one training step's peak memory and time with ``set_grad_checkpointing`` off and
on, for zoo models.

    python benchmarks/grad_checkpointing.py [--models EVA02-B-16 ViTamin-S] [--batch 8] [--json out.json]

Each measurement runs in a process of its own (memory freed by one run would otherwise stay with the allocator and
hide the next run's peak): a randomly initialised model, one warm-up step (forward, a contrastive-style loss,
backward), then one timed step with ``bench.timing.rss_peak_growth`` around it: the peak resident memory above the
start of the step. fp32, the threads torch is given.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(name: str, enabled: bool, batch: int) -> dict:
    import torch

    import clipforge
    from clipforge.bench.timing import rss_peak_growth

    torch.manual_seed(0)
    model = clipforge.create_model(name)
    model.set_grad_checkpointing(enabled)
    size = model.image_size
    images = torch.randn(batch, 3, size, size)
    tokens = clipforge.get_tokenizer(name)(["a photo of a dog"] * batch)

    def step():
        out = model(images, tokens)
        (out.image_features @ out.text_features.T).sum().backward()

    step()
    model.zero_grad(set_to_none=False)
    peak = rss_peak_growth()
    start = time.perf_counter()
    step()
    return {"model": name, "checkpointing": enabled, "step_s": time.perf_counter() - start, "peak_mb": peak()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["EVA02-B-16", "ViTamin-S"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "ON"), help=argparse.SUPPRESS)  # a child process's run
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1] == "on", args.batch)))
        return
    rows = []
    for name in args.models:
        for enabled in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--one", name, enabled, "--batch", str(args.batch)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{name:12s} checkpointing {enabled:3s}: step {rows[-1]['step_s']:.2f} s, "
                  f"peak {rows[-1]['peak_mb']:.0f} MB above the step's start")
    if args.json:
        from clipforge.files import write_json

        write_json(args.json, {"batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
