"""``clipforge bench``: clipforge side by side with open_clip and transformers, in one run, same configs and weights.

Each measurement that needs a clean peak-memory reading runs in its own subprocess. A peer that is not installed
is skipped with a note. Ratios are clipforge / peer (higher is better for speed, lower for memory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from .corpora import distinct_captions
from .tasks import loss_memory, tokenizer_speed
from .timing import matmul_peak_gflops
from .worker import run_in_subprocess
from ..argtypes import positive_int
from ..environment import cpu_has_bf16

PEERS = ("open_clip", "transformers")
PARTS = ("tokenizer", "embed", "train", "loss")
ONNX_BACKENDS = {"onnx": "image_embed_onnx_vs_open_clip", "onnx-int8": "image_embed_int8_vs_open_clip"}
BF16_BACKEND = {"bf16": "image_embed_bf16_vs_open_clip"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--quick", action="store_true", help="fewer and shorter measurements")
    p.add_argument("--json", help="write raw results (with a top-level 'ratios' object) here")
    p.add_argument("--data", default=os.environ.get("CLIPFORGE_DATA"),
                   help="a data folder with coco-mini/ for human captions, e.g. ../shared/data [$CLIPFORGE_DATA; "
                        "without it, captions are generated from CIFAR-10 class names]")
    p.add_argument("--device", default=None, help="cpu or cuda [cuda when available]; GPU runs use bf16 autocast")
    p.add_argument("--train-model", default=None,
                   help="[CPU: ViT-Small-64 (6 layers, width 256, 64 px), batch 64; GPU: ViT-B-32 at 224 px, batch 256]")
    p.add_argument("--train-batch", type=positive_int, default=None)
    p.add_argument("--train-compile", action="store_true",
                   help="time training with every implementation's model under torch.compile (as `clipforge train "
                        "--torchcompile` runs it); the first steps, which compile, are not timed")
    p.add_argument("--embed-models", nargs="+", default=["ViT-B-32", "RN50"])
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="measure only these [all: " + " ".join(PARTS) + "]")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, also time the first model's image tower in ONNX Runtime, fp32 and int8 (needs "
                        "clipforge[onnx]; the export takes a minute)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the first model's image tower with bf16 weights (`--precision bf16`, the GPU "
                        "default) [on a GPU, and on CPUs with bf16 instructions]")
    p.set_defaults(func=run)


def bench_tokenizer(args, ratios: dict) -> dict | None:
    """Cold tokenizer speed on three corpora, each after checking that the ids equal open_clip's: the bench's own
    recombined captions, Flickr8k's 30,000 human training captions (with --data), and generated web-style noise."""
    from ..tokenizer import Tokenizer
    from .corpora import flickr8k_captions, noisy_captions

    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:
        print("tokenizer: open_clip not installed, skipped")
        return None
    corpora = {"own": (distinct_captions(args.data, 10_000), "tokenizer_vs_open_clip"),
               "natural": (flickr8k_captions(args.data), "tokenizer_natural_vs_open_clip"),
               "noisy": (noisy_captions(args.data, 2_000 if args.quick else 5_000), "tokenizer_noisy_vs_open_clip")}
    results = {}
    for name, (captions, key) in corpora.items():
        if not captions:
            print(f"tokenizer, {name}: no data (--data with flickr8k/), skipped")
            continue
        check = captions[:2000]
        assert torch.equal(Tokenizer()(check), SimpleTokenizer()(check)), f"token ids differ on the {name} corpus"
        result = results[name] = tokenizer_speed({"clipforge": Tokenizer, "open_clip": SimpleTokenizer}, captions,
                                                 args.repeats)
        ratios[key] = result["open_clip"]["clipforge_ratio"]
        print(f"tokenizer, {name} ({len(captions)} strings, cold): clipforge {result['clipforge']['captions_per_s']:.0f}/s, "
              f"open_clip {result['open_clip']['captions_per_s']:.0f}/s, ratio {ratios[key]:.1f}x")
    return results


def bench_embedding(args, device: str, ratios: dict) -> dict:
    """Image and text embedding: every implementation in one process, runs interleaved."""
    on_gpu = device != "cpu"
    # on GPU enough images that a run lasts tens of milliseconds, well above launch and timer jitter
    n_images = (16 if args.quick else 64) * (32 if on_gpu else 1)
    n_texts = 2048 if on_gpu else 64 if args.quick else 128  # real captions, padded to 77 tokens for the peers
    results = {}
    for model_name in args.embed_models:
        jobs = [("image", n_images, 256 if on_gpu else 16), ("text", n_texts, 256 if on_gpu else 64)]
        if model_name != args.embed_models[0]:
            jobs = jobs[:1]  # the zoo's text towers are alike: time text once
        for what, n, batch in jobs:
            # clipforge's other backends for the first model's images: ONNX Runtime fp32 and int8 on CPU; bf16
            # weights (what `--precision auto` runs on a GPU) on a GPU and on CPUs with bf16 instructions
            backends = {}
            if what == "image" and model_name == args.embed_models[0]:
                bf16 = (on_gpu or cpu_has_bf16()) if args.bf16 is None else args.bf16
                backends = {**(ONNX_BACKENDS if args.onnx and not on_gpu else {}), **(BF16_BACKEND if bf16 else {})}
            row = run_in_subprocess({"kind": "embed", "what": what, "impls": ["clipforge", *PEERS, *backends],
                                     "model": model_name, "n": n, "batch": batch, "repeats": args.repeats + 2,
                                     "device": device, "data": args.data})
            results[f"{model_name} {what}"] = row
            for peer in PEERS:
                if "clipforge_ratio" in row.get(peer, {}):
                    suffix = "" if model_name == args.embed_models[0] else f"_{model_name}"
                    ratios[f"{what}_embed_vs_{peer}{suffix}"] = row[peer]["clipforge_ratio"]
            for backend, key in backends.items():
                if "open_clip_ratio" in row.get(backend, {}):
                    ratios[key] = row[backend]["open_clip_ratio"]
            unit = f"{what}s_per_s"
            print(f"{what} embedding {model_name} ({n} {what}s, batch {batch}): " + ", ".join(
                f"{k} {v[unit]:.1f}/s" if unit in v else f"{k}: {v}" for k, v in row.items()))
    return results


def bench_training(args, device: str, ratios: dict) -> tuple[dict, str]:
    """Training speed interleaved in one process; peak memory one implementation per process."""
    on_gpu = device != "cpu"
    model = args.train_model or ("ViT-B-32" if on_gpu else "ViT-Small-64")
    batch = args.train_batch or (256 if on_gpu else 64)
    impls = ["clipforge", *PEERS]
    task = {"kind": "train_speed", "impls": impls, "model": model, "batch": batch,
            "steps": 6 if args.quick else 16, "data": args.data, "device": device, "compile": args.train_compile}
    train = run_in_subprocess(task)
    memory_key = "peak_memory_mb" if on_gpu else "peak_rss_growth_mb"
    # a process's resident-set peak moves from run to run (allocator and page reuse; one peer's read 935-1,131 MB
    # across runs of the same command): on CPU the median of three processes per implementation, taken in turns
    peaks: dict[str, list[float]] = {impl: [] for impl in impls}
    unmeasured: dict[str, dict] = {}  # what the worker said where it gave no peak (a skipped peer, an error)
    for _ in range(1 if on_gpu else 3):
        for impl in impls:
            memory = run_in_subprocess({**task, "kind": "train_memory", "impls": [impl], "steps": 3})
            if memory_key in memory.get(impl, {}):
                peaks[impl].append(memory[impl][memory_key])
            else:
                unmeasured[impl] = memory.get(impl, memory)
    for impl, runs in peaks.items():
        train.setdefault(impl, {}).update({memory_key: statistics.median(runs), f"{memory_key}_runs": runs} if runs
                                          else unmeasured[impl])
    ours = train.get("clipforge", {})
    for peer in PEERS:
        theirs = train.get(peer, {})
        if "clipforge_ratio" in theirs:
            ratios[f"train_vs_{peer}"] = theirs["clipforge_ratio"]
            if abs(ours["first_loss"] - theirs["first_loss"]) > (1e-2 if on_gpu else 1e-4):
                print(f"warning: first-step losses differ: {ours['first_loss']} vs {peer} {theirs['first_loss']}")
        if memory_key in ours and memory_key in theirs:
            ratios[f"train_memory_vs_{peer}"] = ours[memory_key] / max(1e-9, theirs[memory_key])
    how = "".join(("real captions", ", bf16" if on_gpu else "", ", torch.compile" if args.train_compile else ""))
    print(f"training {model} batch {batch} ({how}): " + ", ".join(
        f"{k} {v['samples_per_s']:.1f} samples/s, {v.get(memory_key, 0):.0f} MB peak"
        if "samples_per_s" in v else f"{k}: {v}" for k, v in train.items()))
    return train, memory_key


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device != "cpu"
    machine = (torch.cuda.get_device_name() if on_gpu else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    results, ratios = {"machine": machine, "device": device, "torch": torch.__version__}, {}
    print(f"clipforge bench on {machine} ({'quick' if args.quick else 'full'})"
          + ("" if args.data else "; no --data: generated captions only"))
    if "tokenizer" in args.parts:
        results["tokenizer"] = bench_tokenizer(args, ratios)
    if "embed" in args.parts:
        results["embed"] = bench_embedding(args, device, ratios)
    if "train" in args.parts:
        results["train"], _ = bench_training(args, device, ratios)
        peak = results["matmul_peak_gflops"] = matmul_peak_gflops(device=device)
        achieved = results["train"].get("clipforge", {}).get("achieved_gflops")
        if achieved:
            results["mfu"] = achieved / peak
            print(f"model FLOPs utilisation: {achieved:.1f} GFLOP/s of a {peak:.1f} GFLOP/s "
                  f"{'bf16' if on_gpu else 'fp32'} matmul peak = {results['mfu']:.0%}")
    if "loss" in args.parts:
        results["loss_memory_mb"] = loss_memory((512, 1024) if args.quick else (512, 1024, 2048, 4096), device)
        print("loss memory (MB held for backward) " + ", ".join(
            f"N={n}: dense {r['dense']:.1f} / chunked {r['chunked']:.1f}"
            for n, r in results["loss_memory_mb"].items()))
    results["ratios"] = ratios
    print("ratios (clipforge / peer; speed ratios are medians of adjacent interleaved runs): "
          + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0
