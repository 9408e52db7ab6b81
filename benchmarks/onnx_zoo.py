"""`clipforge export onnx` across the zoo: one architecture of each kind of tower (the smallest of those sharing a
tower class and every non-size setting), random weights, exported and run in ONNX Runtime beside eager PyTorch. The
figure is the largest difference of L2-normalised features (2 images, 2 token rows). Architectures whose text tower
is a Hugging Face encoder fetched from the hub are left out (nothing is fetched here); the MiniLM one is tested in
tests/test_onnx.py.

    python benchmarks/onnx_zoo.py --max-params 460e6 --json runs/bench/onnx-zoo.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import clipforge
from clipforge.models import get_model_config
from clipforge.onnx_backend import OnnxCLIP, export_onnx

SIZE_KEYS = {"width", "layers", "heads", "image_size", "patch_size", "mlp_ratio", "head_width", "embed_dim",
             "context_length", "vocab_size", "timm_model_name", "hf_model_name", "depths", "dims"}


def families(max_params: float) -> list[tuple[int, str]]:
    """(parameters, name) of the smallest architecture of each kind, under ``max_params``."""
    smallest = {}
    for name in clipforge.list_models():
        config = get_model_config(name)
        if "hf_model_name" in config.get("text_cfg", {}):
            continue
        with torch.device("meta"):
            model = clipforge.create_model(name)
        kind = json.dumps([type(model).__name__, type(model.visual).__name__, type(model.text).__name__,
                           {k: v for k, v in sorted(config["vision_cfg"].items()) if k not in SIZE_KEYS},
                           {k: v for k, v in sorted(config["text_cfg"].items()) if k not in SIZE_KEYS}])
        params = sum(p.numel() for p in model.parameters())
        if params <= max_params and (kind not in smallest or params < smallest[kind][0]):
            smallest[kind] = (params, name)
    return sorted(smallest.values())


@torch.no_grad()
def check(name: str) -> dict:
    torch.manual_seed(0)
    model = clipforge.create_model(name).eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, model.image_size, model.image_size, generator=generator)
    tokens = torch.randint(1, model.text.vocab_size - 1, (2, model.context_length), generator=generator)
    tokens[:, -5:] = 0  # padding at the end, as real rows have
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        export_onnx(model, folder)
        exported = OnnxCLIP(folder)
        return {"image": (model.encode_image(images, normalize=True)
                          - exported.encode_image(images, normalize=True)).abs().max().item(),
                "text": (model.encode_text(tokens, normalize=True)
                         - exported.encode_text(tokens, normalize=True)).abs().max().item(),
                "export_s": round(time.perf_counter() - started, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-params", type=float, default=160e6, help="leave out larger architectures [160e6]")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for params, name in families(args.max_params):
        try:
            results[name] = {"params_m": round(params / 1e6, 1), **check(name)}
        except Exception as exc:  # recorded, and the others still run
            results[name] = {"params_m": round(params / 1e6, 1), "error": f"{type(exc).__name__}: {exc}"}
        print(name, results[name], flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    failed = [name for name, result in results.items() if "error" in result]
    worst = max((max(r["image"], r["text"]) for r in results.values() if "error" not in r), default=float("nan"))
    print(f"{len(results)} architectures, {len(failed)} failed {failed}; largest difference {worst:.1e}")


if __name__ == "__main__":
    main()
