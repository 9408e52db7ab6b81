"""What faster inference costs in accuracy, on a model trained here (issue 17): the same evaluation as the
Flickr8k recipe's figures (benchmarks/flickr8k.py, without the probes) run on eager PyTorch in fp32 and on each other
backend (ONNX Runtime's fp32 graphs, its int8 image tower; the PyTorch weights cast to bf16 or fp16, as
``--precision`` casts them), with the change from fp32 PyTorch in points.

    python benchmarks/onnx_accuracy.py runs/flickr8k/step_002400 --json runs/bench/onnx-accuracy.json
    python benchmarks/onnx_accuracy.py CHECKPOINT --backends bf16 --json runs/bench/bf16-accuracy.json

Speed is ``clipforge bench`` (rows onnx and onnx-int8 beside open_clip); this is only the accuracy side.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

import clipforge
from clipforge.onnx_backend import OnnxCLIP, export_onnx

sys.path.insert(0, str(Path(__file__).parent))
from flickr8k import evaluate  # noqa: E402  (the recipe's evaluation, shared so the figures compare)

REPO = Path(__file__).resolve().parents[1]


def flatten(result: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, float):
            out[f"{prefix}{key}"] = value
    return out


BACKENDS = ("onnx", "onnx-int8", "bf16", "fp16")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["onnx", "onnx-int8"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, _, tokenizer = clipforge.load(args.checkpoint)
    results = {"torch": flatten(evaluate(model, tokenizer, args.data, probe=False))}
    with tempfile.TemporaryDirectory() as folder:
        if any(b.startswith("onnx") for b in args.backends):
            export_onnx(model, folder, int8=True)
        for name in args.backends:
            if name.startswith("onnx"):
                other = OnnxCLIP(folder, int8=name == "onnx-int8")
            else:
                other = copy.deepcopy(model).to({"bf16": torch.bfloat16, "fp16": torch.float16}[name])
            results[name] = flatten(evaluate(other, tokenizer, args.data, probe=False))
    print(f"{'metric':42s} {'torch':>7s}" + "".join(f" {name:>9s} {'delta':>7s}" for name in args.backends))
    for key, value in results["torch"].items():
        print(f"{key:42s} {100 * value:7.2f}" + "".join(
            f" {100 * results[name][key]:9.2f} {100 * (results[name][key] - value):+7.2f}" for name in args.backends))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": args.checkpoint, **results}, indent=1))


if __name__ == "__main__":
    main()
