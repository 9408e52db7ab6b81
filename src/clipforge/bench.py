"""``clipforge bench``: clipforge side by side with open_clip and transformers, in one run, same configs and weights.

Each measurement that needs a clean peak-memory reading runs in its own subprocess. A peer that is not installed
is skipped with a note. Ratios are clipforge / peer (higher is better for speed, lower for memory).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--quick", action="store_true", help="a run under five minutes on 2 CPU cores")
    p.add_argument("--json", help="write raw results (with a top-level 'ratios' object) here")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="../shared/data (real captions)")
    p.add_argument("--train-model", default="ViT-Small-64", help="[ViT-Small-64: 6 layers, width 256, 64 px]")
    p.add_argument("--embed-model", default="ViT-B-32")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ captions, peers

def real_captions(data: Path, n: int) -> list[str]:
    """coco-mini's human captions, then CIFAR-10 label captions from the caption grammar, up to ``n``."""
    import random
    import tarfile

    from .data.captions import label_caption

    captions = []
    shard = Path(data) / "coco-mini" / "test" / "test-000000.tar"
    if shard.exists():
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    captions += [l.strip() for l in tar.extractfile(member).read().decode().splitlines() if l.strip()]
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    rng = random.Random(0)
    while len(captions) < n:
        captions.append(label_caption(rng.choice(names), rng))
    return captions[:n]


def _peer(impl: str, ours):
    """The same architecture and weights in open_clip or transformers, or None when not installed."""
    from .checkpoint import clipforge_config_to_hf, clipforge_to_hf, clipforge_to_openai

    if impl == "open_clip":
        try:
            from open_clip.model import CLIP
        except ImportError:
            return None
        cfg = ours.config
        model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                     quick_gelu=cfg.get("quick_gelu", False))
        model.load_state_dict(clipforge_to_openai(ours.state_dict()))
        return model
    if impl == "transformers":
        try:
            import transformers
        except ImportError:
            return None
        hf_cfg = clipforge_config_to_hf(ours.config, float(ours.logit_scale))
        config = transformers.CLIPConfig(text_config=hf_cfg["text_config"], vision_config=hf_cfg["vision_config"],
                                         projection_dim=hf_cfg["projection_dim"])
        model = transformers.CLIPModel(config)
        model.load_state_dict(clipforge_to_hf(ours.state_dict()), strict=False)
        return model
    return ours


def _build(name: str):
    from .models import create_model, get_model_config

    model = create_model(name)
    model.config = get_model_config(name)
    return model


# ------------------------------------------------------------------------------------------------ measurements

def _worker(task: dict) -> dict:
    """One measurement in this (fresh) process."""
    torch.set_num_threads(task.get("threads", 2))
    torch.manual_seed(0)
    ours = _build(task["model"])
    model = _peer(task["impl"], ours)
    if model is None:
        return {"skipped": f"{task['impl']} is not installed"}
    if task["kind"] == "embed":
        size = ours.image_size
        images = torch.randn(task["n"], 3, size, size)
        encode = model.get_image_features if task["impl"] == "transformers" else model.encode_image
        model.eval()
        rates = []
        with torch.no_grad():
            encode(images[:2])
            for _ in range(task["repeats"]):
                start = time.perf_counter()
                for i in range(0, len(images), task["batch"]):
                    if task["impl"] == "transformers":
                        encode(pixel_values=images[i:i + task["batch"]])
                    else:
                        encode(images[i:i + task["batch"]])
                rates.append(len(images) / (time.perf_counter() - start))
        return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}
    # training: forward, contrastive loss, backward, AdamW step on real captions
    from .loss import ClipLoss
    from .tokenizer import get_tokenizer

    captions = real_captions(Path(task["data"]), task["batch"] * (task["steps"] + 2))
    tokens = get_tokenizer(task["model"])(captions)
    size, batch = ours.image_size, task["batch"]
    images = torch.randn(batch, 3, size, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ClipLoss()
    model.train()

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        t = tokens[i * batch:(i + 1) * batch]
        if task["impl"] == "open_clip":
            image_features, text_features, scale = model(images, t)[:3]
        else:
            out = model(images, t)
            image_features, text_features, scale = out.image_features, out.text_features, out.logit_scale
        loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        optimizer.step()
        return loss.item()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(0)
    flops = None
    if task["impl"] == "clipforge":
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(1)
        flops = counter.get_total_flops()
    times = []
    for i in range(2, task["steps"] + 2):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    rates = [batch / t for t in times]
    result = {"samples_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
              "peak_rss_growth_mb": peak_mb}
    if flops:
        result["flops_per_step"] = flops
        result["achieved_gflops"] = flops / statistics.median(times) / 1e9
    return result


def _subprocess(task: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "clipforge.bench", json.dumps(task)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_peak_gflops(threads: int = 2, n: int = 2048) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def loss_memory(sizes=(512, 1024, 2048, 4096)) -> dict:
    """Bytes autograd keeps between forward and backward, dense vs chunked ClipLoss."""
    import torch.nn.functional as F

    from .loss import ClipLoss

    rows = {}
    for n in sizes:
        row = {}
        for name, loss_fn in (("dense", ClipLoss()), ("chunked", ClipLoss(chunk_size=256))):
            a = F.normalize(torch.randn(n, 128), dim=-1).requires_grad_()
            b = F.normalize(torch.randn(n, 128), dim=-1).requires_grad_()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                          lambda t: t):
                loss = loss_fn(a, b, torch.tensor(10.0))
            loss.backward()
            row[name] = sum(saved) / 2**20
        rows[n] = row
    return rows


def run(args) -> int:
    from .tokenizer import Tokenizer

    quick = args.quick
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "device": "cpu", "torch": torch.__version__}
    ratios = {}
    print(f"clipforge bench on {results['machine']} ({'quick' if quick else 'full'})")

    # tokenizer
    captions = real_captions(Path(args.data), 10_000)
    try:
        from open_clip.tokenizer import SimpleTokenizer

        rates = {}
        for name, make in (("clipforge", Tokenizer), ("open_clip", SimpleTokenizer)):
            runs = []
            for _ in range(args.repeats):
                tokenizer = make()
                start = time.perf_counter()
                tokenizer(captions)
                runs.append(len(captions) / (time.perf_counter() - start))
            rates[name] = statistics.median(runs)
        assert torch.equal(Tokenizer()(captions[:2000]), SimpleTokenizer()(captions[:2000]))
        results["tokenizer"] = rates
        ratios["tokenizer_vs_open_clip"] = rates["clipforge"] / rates["open_clip"]
        print(f"tokenizer (10k captions, cold): clipforge {rates['clipforge']:.0f}/s, open_clip "
              f"{rates['open_clip']:.0f}/s, ratio {ratios['tokenizer_vs_open_clip']:.1f}x")
    except ImportError:
        print("tokenizer: open_clip not installed, skipped")

    # image embedding
    n_images = 16 if quick else 64
    results["embed"] = {}
    for impl in ("clipforge", "open_clip", "transformers"):
        results["embed"][impl] = _subprocess({"kind": "embed", "impl": impl, "model": args.embed_model,
                                              "n": n_images, "batch": 16, "repeats": args.repeats})
    for peer in ("open_clip", "transformers"):
        if "images_per_s" in results["embed"][peer]:
            ratios[f"image_embed_vs_{peer}"] = (results["embed"]["clipforge"]["images_per_s"] /
                                                results["embed"][peer]["images_per_s"])
    print("image embedding " + args.embed_model + ": " + ", ".join(
        f"{k} {v.get('images_per_s', 0):.1f}/s" if "images_per_s" in v else f"{k} {v}" for k, v in
        results["embed"].items()))

    # training
    steps = 5 if quick else 15
    results["train"] = {}
    for impl in ("clipforge", "open_clip"):
        results["train"][impl] = _subprocess({"kind": "train", "impl": impl, "model": args.train_model,
                                              "batch": 64, "steps": steps, "data": args.data})
    ours, theirs = results["train"]["clipforge"], results["train"]["open_clip"]
    if "samples_per_s" in theirs and "samples_per_s" in ours:
        ratios["train_vs_open_clip"] = ours["samples_per_s"] / theirs["samples_per_s"]
        ratios["train_memory_vs_open_clip"] = ours["peak_rss_growth_mb"] / max(1e-9, theirs["peak_rss_growth_mb"])
    print(f"training {args.train_model} batch 64 (real captions): " + ", ".join(
        f"{k} {v.get('samples_per_s', 0):.1f} samples/s, +{v.get('peak_rss_growth_mb', 0):.0f} MB peak"
        for k, v in results["train"].items()))

    # MFU and loss memory
    peak = matmul_peak_gflops()
    results["matmul_peak_gflops"] = peak
    if "achieved_gflops" in ours:
        results["mfu"] = ours["achieved_gflops"] / peak
        print(f"model FLOPs utilisation: {ours['achieved_gflops']:.1f} GFLOP/s of a {peak:.1f} GFLOP/s matmul "
              f"peak = {results['mfu']:.0%}")
    results["loss_memory_mb"] = loss_memory((512, 1024) if quick else (512, 1024, 2048, 4096))
    print("loss memory (MB held for backward) " + ", ".join(
        f"N={n}: dense {r['dense']:.1f} / chunked {r['chunked']:.1f}" for n, r in results["loss_memory_mb"].items()))
    results["ratios"] = ratios
    print("ratios (clipforge / peer): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
