"""A/B of clipforge's GPU training step against the choices it replaced, in one process, steps interleaved: each
variant's median step time and peak memory over the same batches and weights (bench's step: forward, loss, backward,
fused AdamW; bf16 autocast).

Variants, each adding one change to the one before:
- ``before``: q, k, v taken from the fused projection by indexing, patches embedded by the strided conv1;
- ``unbind``: q, k, v by ``unbind`` (one stacked gradient in backward instead of three zero-filled ones summed);
- ``gemm-patches``: patches embedded by one matrix product (clipforge's GPU path);
- ``no-lean``: as gemm-patches, with the lean blocks' recomputation off (keeps LayerNorm/GELU/head outputs).

    python benchmarks/gpu_train_variants.py --model ViT-B-32 --batch 256
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from clipforge.bench.peers import build
from clipforge.bench.tasks import _train_inputs, train_step_fn
from clipforge.models import layers
from clipforge.models.vision_transformer import VisionTransformer

NEW_ATTEND, NEW_PATCHES = layers.Attention.attend, VisionTransformer._embed_patches


def attend_by_index(self, x, causal=False, attn_mask=None):
    batch, length, width = x.shape
    qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
    qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask, is_causal=causal)


def patches_by_conv(self, images):
    return self.conv1(images).flatten(2).transpose(1, 2)


VARIANTS = {"before": (attend_by_index, patches_by_conv, True), "unbind": (NEW_ATTEND, patches_by_conv, True),
            "gemm-patches": (NEW_ATTEND, NEW_PATCHES, True), "no-lean": (NEW_ATTEND, NEW_PATCHES, False)}


def use(model, variant: str) -> None:
    attend, patches, lean = VARIANTS[variant]
    layers.Attention.attend, VisionTransformer._embed_patches = attend, patches
    for module in model.modules():
        if isinstance(module, layers.Transformer):
            module.lean = lean


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    task = {"model": args.model, "batch": args.batch, "steps": args.rounds * len(VARIANTS) + 8,
            "device": args.device}
    model = build(args.model).to(args.device)
    tokens, images = _train_inputs(task, model)
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)

    # the same features from every variant, before any step changes the weights
    features = {}
    for variant in VARIANTS:
        use(model, variant)
        with torch.no_grad(), torch.autocast(torch.device(args.device).type, torch.bfloat16,
                                             enabled=args.device != "cpu"):
            features[variant] = model.encode_image(images[:32]).float()
    drift = {v: (f - features["before"]).abs().max().item() for v, f in features.items()}

    step = train_step_fn("clipforge", model, tokens, images, task)
    batch = iter(range(task["steps"]))
    for variant in VARIANTS:  # warm-up: kernel selection for each variant's shapes
        use(model, variant)
        step(next(batch))
    peak = {}
    for variant in VARIANTS:
        use(model, variant)
        if args.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        step(next(batch))
        if args.device != "cpu":
            peak[variant] = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):
        for variant in names[r % len(names):] + names[:r % len(names)]:
            use(model, variant)
            sync()
            start = time.perf_counter()
            step(next(batch))
            sync()
            times[variant].append(time.perf_counter() - start)
    rows = {v: {"ms_per_step": statistics.median(t) * 1e3, "samples_per_s": args.batch / statistics.median(t),
                "vs_before": statistics.median(b / x for b, x in zip(times["before"], t)),
                "peak_memory_mb": peak.get(v), "max_feature_diff_vs_before": drift[v]} for v, t in times.items()}
    for v, row in rows.items():
        peak = "n/a on CPU" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:6.0f} MB"
        print(f"{v:14s} {row['ms_per_step']:7.1f} ms/step  {row['samples_per_s']:7.0f} samples/s  "
              f"x{row['vs_before']:.3f} vs before  peak {peak}  feature diff {row['max_feature_diff_vs_before']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "device": args.device, "torch": torch.__version__,
                       "variants": rows}, f, indent=1)
    use(model, "gemm-patches")


if __name__ == "__main__":
    main()
