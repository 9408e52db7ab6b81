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
    p.add_argument("--device", default=None, help="cpu or cuda [cuda when available]; GPU runs use bf16 autocast")
    p.add_argument("--train-model", default=None,
                   help="[CPU: ViT-Small-64 (6 layers, width 256, 64 px), batch 64; GPU: ViT-B-32 at 224 px, batch 256]")
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--embed-models", nargs="+", default=["ViT-B-32", "RN50"])
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ captions, peers

def _coco_captions(data: Path) -> list[str]:
    """coco-mini's 395 human captions, or [] when the shared data is absent."""
    import tarfile

    shard = Path(data) / "coco-mini" / "test" / "test-000000.tar"
    if not shard.exists():
        return []
    captions = []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".txt"):
                captions += [l.strip() for l in tar.extractfile(member).read().decode().splitlines() if l.strip()]
    return captions


def real_captions(data: Path, n: int) -> list[str]:
    """Training captions: coco-mini's human captions, then CIFAR-10 label captions from the caption grammar."""
    import random

    from .data.captions import label_caption

    captions = _coco_captions(data)
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    rng = random.Random(0)
    while len(captions) < n:
        captions.append(label_caption(rng.choice(names), rng))
    return captions[:n]


def distinct_captions(data: Path, n: int = 10_000, seed: int = 0) -> list[str]:
    """Tokenizer captions: the human captions plus recombinations of their halves (first half of one, second half of
    another) up to ``n`` distinct strings, so the vocabulary is natural and no word cache gets a free ride."""
    import random

    human = _coco_captions(data) or real_captions(data, 400)
    rng = random.Random(seed)
    captions, seen = list(dict.fromkeys(human)), set(human)
    while len(captions) < n:
        a, b = rng.choice(human).split(), rng.choice(human).split()
        text = " ".join(a[: len(a) // 2] + b[len(b) // 2:])
        if text not in seen:
            seen.add(text)
            captions.append(text)
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
        if isinstance(ours.config["vision_cfg"]["layers"], (list, tuple)):
            return None  # transformers' CLIPModel has no ResNet image tower
        try:
            import transformers
        except ImportError:
            return None
        hf_cfg = clipforge_config_to_hf(ours.config, ours.logit_scale.item())
        config = transformers.CLIPConfig(text_config=hf_cfg["text_config"], vision_config=hf_cfg["vision_config"],
                                         projection_dim=hf_cfg["projection_dim"])
        model = transformers.CLIPModel(config)
        model.load_state_dict(clipforge_to_hf(ours.state_dict()), strict=False)
        return model
    if impl == "clipforge":
        return ours
    raise ValueError(f"unknown implementation {impl!r}: expected clipforge, open_clip or transformers")


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
    device = torch.device(task.get("device", "cpu"))
    ours = _build(task["model"])
    models = {impl: _peer(impl, ours) for impl in task["impls"]}
    result = {impl: {"skipped": f"{impl} is not installed or has no such architecture"}
              for impl, m in models.items() if m is None}
    models = {impl: m.to(device) for impl, m in models.items() if m is not None}
    measure = {"embed": _embed_speed, "train_speed": _train_speed, "train_memory": _train_memory}[task["kind"]]
    result.update(measure(task, ours, models))
    return result


def _autocast(task: dict):
    """bf16 autocast on GPU (as the issue's GPU rows ask); fp32 on CPU, where bf16 matmul is slow."""
    device = task.get("device", "cpu")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=device != "cpu" and task.get("bf16", True))


def _sync(task: dict) -> None:
    if task.get("device", "cpu") != "cpu":
        torch.cuda.synchronize()


def _interleaved(runs: dict, repeats: int) -> dict:
    """Time each implementation's ``run()`` in turn, rotating the order every repeat, so that the machine's drifting
    speed (shared cores, thermal state) hits every implementation alike; per-repeat ratios come from adjacent runs."""
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _summary(times: dict, items: int, unit: str) -> dict:
    out = {}
    for name, ts in times.items():
        rates = [items / t for t in ts]
        out[name] = {unit: statistics.median(rates), "min": min(rates), "max": max(rates)}
        if name != "clipforge" and "clipforge" in times:  # ratio of adjacent runs, then the median
            out[name]["clipforge_ratio"] = statistics.median(p / c for c, p in zip(times["clipforge"], ts))
    return out


def _embed_speed(task: dict, ours, models: dict) -> dict:
    """Images (or texts, ``task["what"] == "text"``) per second through each implementation's encoder."""
    device = task.get("device", "cpu")
    if task.get("what", "image") == "text":
        from .tokenizer import get_tokenizer

        inputs = get_tokenizer(task["model"])(distinct_captions(Path(task["data"]), task["n"])).to(device)
    else:
        inputs = torch.randn(task["n"], 3, ours.image_size, ours.image_size, device=device)
    runs = {}
    for impl, model in models.items():
        model.eval()
        if impl == "transformers":
            encode = ((lambda x, m=model: m.get_text_features(input_ids=x)) if task.get("what") == "text"
                      else (lambda x, m=model: m.get_image_features(pixel_values=x)))
        else:
            encode = model.encode_text if task.get("what") == "text" else model.encode_image

        def run(encode=encode):
            with torch.no_grad(), _autocast(task):
                for i in range(0, len(inputs), task["batch"]):
                    encode(inputs[i:i + task["batch"]])
            _sync(task)

        run()  # warm-up (and cuDNN / kernel selection on GPU)
        runs[impl] = run
    unit = "texts_per_s" if task.get("what") == "text" else "images_per_s"
    return _summary(_interleaved(runs, task["repeats"]), len(inputs), unit)


def _train_step_fn(impl: str, model, tokens: torch.Tensor, images: torch.Tensor, task: dict):
    """forward, contrastive loss, backward, AdamW step: clipforge with its own optimiser (fused AdamW where the
    kernel exists), the peer with the same parameter groups on torch's default AdamW, as open_clip's training uses."""
    from .loss import ClipLoss
    from .models.vision_transformer import VisionTransformer
    from .train.optim import build_optimizer

    optimizer = build_optimizer(model, 1e-4, 0.2, fused=None if impl == "clipforge" else False)
    loss_fn, batch = ClipLoss(), len(images)
    model.train()
    if task.get("device", "cpu") != "cpu" and impl == "clipforge" and not isinstance(model.visual, VisionTransformer):
        model.to(memory_format=torch.channels_last)  # as clipforge train does for ResNets on GPU

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(task):
            image_features, text_features, scale = model(images, tokens[i * batch:(i + 1) * batch])[:3]
            loss = loss_fn(image_features.float(), text_features.float(), scale)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _train_inputs(task: dict, ours):
    from .tokenizer import get_tokenizer

    device = task.get("device", "cpu")
    captions = real_captions(Path(task["data"]), task["batch"] * (task["steps"] + 2))
    images = torch.randn(task["batch"], 3, ours.image_size, ours.image_size, device=device)
    return get_tokenizer(task["model"])(captions).to(device), images


def _train_speed(task: dict, ours, models: dict) -> dict:
    tokens, images = _train_inputs(task, ours)
    steps = {impl: _train_step_fn(impl, m, tokens, images, task) for impl, m in models.items()}
    first_loss = {impl: step(0) for impl, step in steps.items()}  # same weights and data: same loss
    extra = {}
    if "clipforge" in steps:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            steps["clipforge"](1)
        extra["flops_per_step"] = counter.get_total_flops()
    for impl, step in steps.items():
        if impl != "clipforge":
            step(1)
    positions = {impl: iter(range(2, task["steps"] + 2)) for impl in steps}  # every implementation sees each batch
    times = _interleaved({impl: (lambda s=step, pos=positions[impl]: s(next(pos))) for impl, step in steps.items()},
                         task["steps"])
    out = _summary(times, task["batch"], "samples_per_s")
    for impl in steps:
        out[impl]["first_loss"] = first_loss[impl]
    if "flops_per_step" in extra:
        out["clipforge"]["flops_per_step"] = extra["flops_per_step"]
        out["clipforge"]["achieved_gflops"] = extra["flops_per_step"] / statistics.median(times["clipforge"]) / 1e9
    return out


def _train_memory(task: dict, ours, models: dict) -> dict:
    """Peak memory over a few steps, one implementation per process so peaks do not mix: resident-set growth on
    CPU, ``torch.cuda.max_memory_allocated`` on GPU."""
    (impl, model), = models.items()
    tokens, images = _train_inputs(task, ours)
    on_gpu = task.get("device", "cpu") != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # the optimiser is built before the baseline: constructing the first one imports torch._dynamo (~140 MB of
    # modules), a one-off cost a process pays wherever it first touches torch.optim, not training memory
    step = _train_step_fn(impl, model, tokens, images, task)
    rss_growth = _rss_peak_growth()
    for i in range(task["steps"]):
        step(i)
    if on_gpu:
        return {impl: {"peak_memory_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}}
    return {impl: {"peak_rss_growth_mb": rss_growth()}}


def _rss_peak_growth():
    """Start measuring: returns a function giving the peak resident memory since now, above the current RSS, in MB.

    On Linux the kernel's high-water mark is reset first (``/proc/self/clear_refs``), so transient set-up memory
    (tokenizer tables, weight conversion) freed before the steps neither hides nor inflates their peak; elsewhere
    it falls back to the growth of ``ru_maxrss``.
    """
    import re

    status = Path("/proc/self/status")

    def read(key: str) -> int:
        return int(re.search(rf"^{key}:\s+(\d+) kB", status.read_text(), re.MULTILINE).group(1))

    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = read("VmRSS")
        return lambda: (read("VmHWM") - base) / 1024
    except (OSError, AttributeError):
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return lambda: (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def _subprocess(task: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "clipforge.bench", json.dumps(task)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def tokenizer_speed(makers: dict, captions: list[str], repeats: int, warm: bool = False) -> dict:
    """Captions/s of each tokenizer class, taking turns with the order alternating. Cold (default): a fresh
    tokenizer per repeat, its construction not timed; warm: one tokenizer that has seen the captions."""
    tokenizers = {name: make() for name, make in makers.items()} if warm else {}
    for tokenizer in tokenizers.values():
        tokenizer(captions)
    times = {name: [] for name in makers}
    for r in range(repeats):
        for name in (list(makers) if r % 2 == 0 else list(makers)[::-1]):
            tokenizer = tokenizers[name] if warm else makers[name]()
            start = time.perf_counter()
            tokenizer(captions)
            times[name].append(time.perf_counter() - start)
    return _summary(times, len(captions), "captions_per_s")


def matmul_peak_gflops(threads: int = 2, n: int = 2048, device: str = "cpu") -> float:
    """The best of 5 square matmuls: fp32 on CPU, bf16 (n = 8192) on GPU, the precision training runs in."""
    torch.set_num_threads(threads)
    on_gpu = device != "cpu"
    n, dtype = (8192, torch.bfloat16) if on_gpu else (n, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(5):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def loss_memory(sizes=(512, 1024, 2048, 4096), device: str = "cpu") -> dict:
    """Bytes autograd keeps between forward and backward, dense vs chunked ClipLoss."""
    import torch.nn.functional as F

    from .loss import ClipLoss

    rows = {}
    for n in sizes:
        row = {}
        for name, loss_fn in (("dense", ClipLoss()), ("chunked", ClipLoss(chunk_size=256))):
            a = F.normalize(torch.randn(n, 128, device=device), dim=-1).requires_grad_()
            b = F.normalize(torch.randn(n, 128, device=device), dim=-1).requires_grad_()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                          lambda t: t):
                loss = loss_fn(a, b, torch.tensor(10.0, device=device))
            loss.backward()
            row[name] = sum(saved) / 2**20
        rows[n] = row
    return rows


def run(args) -> int:
    from .tokenizer import Tokenizer

    quick = args.quick
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device != "cpu"
    train_model = args.train_model or ("ViT-B-32" if on_gpu else "ViT-Small-64")
    train_batch = args.train_batch or (256 if on_gpu else 64)
    machine = (torch.cuda.get_device_name() if on_gpu else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    results = {"machine": machine, "device": device, "torch": torch.__version__}
    ratios = {}
    print(f"clipforge bench on {results['machine']} ({'quick' if quick else 'full'})")

    # tokenizer
    captions = distinct_captions(Path(args.data), 10_000)
    try:
        from open_clip.tokenizer import SimpleTokenizer

        assert torch.equal(Tokenizer()(captions[:2000]), SimpleTokenizer()(captions[:2000])), "ids differ"
        makers = {"clipforge": Tokenizer, "open_clip": SimpleTokenizer}
        summary = tokenizer_speed(makers, captions, args.repeats)
        rates = {name: summary[name]["captions_per_s"] for name in makers}
        results["tokenizer"] = summary
        ratios["tokenizer_vs_open_clip"] = summary["open_clip"]["clipforge_ratio"]
        print(f"tokenizer (10k distinct captions, cold): clipforge {rates['clipforge']:.0f}/s, open_clip "
              f"{rates['open_clip']:.0f}/s, ratio {ratios['tokenizer_vs_open_clip']:.1f}x")
    except ImportError:
        print("tokenizer: open_clip not installed, skipped")

    # image and text embedding: every implementation in one process, runs interleaved
    n_images = (16 if quick else 64) * (8 if on_gpu else 1)
    results["embed"] = {}
    for model_name in args.embed_models:
        n_texts = 2048 if on_gpu else 64 if quick else 128  # real captions, padded to 77 tokens for the peers
        jobs = [("image", n_images, 256 if on_gpu else 16), ("text", n_texts, 256 if on_gpu else 64)]
        if model_name != args.embed_models[0]:
            jobs = jobs[:1]  # the zoo's text towers are alike: time text once
        for what, n, batch in jobs:
            key = f"{model_name} {what}"
            row = _subprocess({"kind": "embed", "what": what, "impls": ["clipforge", "open_clip", "transformers"],
                               "model": model_name, "n": n, "batch": batch, "repeats": args.repeats + 2,
                               "device": device, "data": args.data})
            results["embed"][key] = row
            unit = f"{what}s_per_s"
            for peer in ("open_clip", "transformers"):
                if "clipforge_ratio" in row.get(peer, {}):
                    name = f"{what}_embed_vs_{peer}" + ("" if model_name == args.embed_models[0] else f"_{model_name}")
                    ratios[name] = row[peer]["clipforge_ratio"]
            print(f"{what} embedding {model_name} ({n} {what}s, batch {batch}): " + ", ".join(
                f"{k} {v[unit]:.1f}/s" if unit in v else f"{k}: {v}" for k, v in row.items()))

    # training: speed interleaved in one process, peak memory one implementation per process
    steps = 6 if quick else 16
    train_task = {"kind": "train_speed", "impls": ["clipforge", "open_clip"], "model": train_model,
                  "batch": train_batch, "steps": steps, "data": args.data, "device": device}
    train = _subprocess(train_task)
    for impl in ("clipforge", "open_clip"):
        memory = _subprocess({**train_task, "kind": "train_memory", "impls": [impl], "steps": 3})
        train.setdefault(impl, {}).update(memory.get(impl, memory))
    results["train"] = train
    ours, theirs = train.get("clipforge", {}), train.get("open_clip", {})
    if "clipforge_ratio" in theirs:
        ratios["train_vs_open_clip"] = theirs["clipforge_ratio"]
        if abs(ours["first_loss"] - theirs["first_loss"]) > (1e-2 if on_gpu else 1e-4):
            print(f"warning: first-step losses differ: {ours['first_loss']} vs {theirs['first_loss']}")
    memory_key = "peak_memory_mb" if on_gpu else "peak_rss_growth_mb"
    if memory_key in ours and memory_key in theirs:
        ratios["train_memory_vs_open_clip"] = ours[memory_key] / max(1e-9, theirs[memory_key])
    print(f"training {train_model} batch {train_batch} (real captions{', bf16' if on_gpu else ''}): " + ", ".join(
        f"{k} {v['samples_per_s']:.1f} samples/s, {v.get(memory_key, 0):.0f} MB peak"
        if "samples_per_s" in v else f"{k}: {v}" for k, v in train.items()))

    # MFU and loss memory
    peak = matmul_peak_gflops(device=device)
    results["matmul_peak_gflops"] = peak
    if "achieved_gflops" in ours:
        results["mfu"] = ours["achieved_gflops"] / peak
        print(f"model FLOPs utilisation: {ours['achieved_gflops']:.1f} GFLOP/s of a {peak:.1f} GFLOP/s "
              f"{'bf16' if on_gpu else 'fp32'} matmul "
              f"peak = {results['mfu']:.0%}")
    results["loss_memory_mb"] = loss_memory((512, 1024) if quick else (512, 1024, 2048, 4096), device)
    print("loss memory (MB held for backward) " + ", ".join(
        f"N={n}: dense {r['dense']:.1f} / chunked {r['chunked']:.1f}" for n, r in results["loss_memory_mb"].items()))
    results["ratios"] = ratios
    print("ratios (clipforge / peer; speed ratios are medians of adjacent interleaved runs): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
