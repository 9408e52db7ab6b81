"""What the ONNX Runtime backends cost in accuracy, on a model trained here (issue 17): the same evaluation as the
Flickr8k recipe's figures (benchmarks/flickr8k.py, without the probes) run on eager PyTorch, the fp32 ONNX graphs and
the int8 image tower, with the change from PyTorch in points.

    python benchmarks/onnx_accuracy.py runs/flickr8k/step_002400 --json runs/bench/onnx-accuracy.json

Speed is ``clipforge bench`` (rows onnx and onnx-int8 beside open_clip); this is only the accuracy side.
"""
from __future__ import annotations

import argparse
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, _, tokenizer = clipforge.load(args.checkpoint)
    results = {"torch": flatten(evaluate(model, tokenizer, args.data, probe=False))}
    with tempfile.TemporaryDirectory() as folder:
        export_onnx(model, folder, int8=True)
        for name, int8 in (("onnx", False), ("onnx-int8", True)):
            results[name] = flatten(evaluate(OnnxCLIP(folder, int8=int8), tokenizer, args.data, probe=False))
    print(f"{'metric':42s} {'torch':>7s} {'onnx':>7s} {'delta':>7s} {'int8':>7s} {'delta':>7s}")
    for key, value in results["torch"].items():
        onnx, int8 = results["onnx"][key], results["onnx-int8"][key]
        print(f"{key:42s} {100 * value:7.2f} {100 * onnx:7.2f} {100 * (onnx - value):+7.2f} {100 * int8:7.2f} "
              f"{100 * (int8 - value):+7.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": args.checkpoint, **results}, indent=1))


if __name__ == "__main__":
    main()
