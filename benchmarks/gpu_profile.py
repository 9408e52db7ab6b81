"""Where a GPU training step's time goes: clipforge's bench step (forward, loss, backward, AdamW; bf16 autocast)
under torch.profiler, as kernel-time totals by kind and the GPU's busy share of the wall clock (well below 1 means
the step waits on Python and kernel launches, which torch.compile or CUDA graphs would cut).

    python benchmarks/gpu_profile.py --model ViT-B-32 --batch 256 [--compile]
"""
from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from clipforge.bench.peers import build
from clipforge.bench.tasks import _train_inputs, train_step_fn

KINDS = [("matmul", r"gemm|cutlass|sm90|sm80|xmma|cublas|matmul"), ("attention", r"flash|fmha|attention|sdpa"),
         ("layer norm", r"layer_norm|layernorm"), ("optimizer", r"adam|foreach|multi_tensor"),
         ("softmax / loss", r"softmax|log_softmax|nll|cross_entropy"), ("copy / cast", r"copy|cast|convert|to_copy"),
         ("elementwise", r"elementwise|vectorized|unrolled|reduce|gelu|add|mul")]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks that the script runs (no kernels to count)")
    args = p.parse_args()
    torch.manual_seed(0)
    task = {"model": args.model, "batch": args.batch, "steps": args.steps + 3, "device": args.device,
            "compile": args.compile}
    model = build(args.model).to(args.device)
    tokens, images = _train_inputs(task, model)
    step = train_step_fn("clipforge", model, tokens, images, task)
    for i in range(3):
        step(i)
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(3, 3 + args.steps):
            step(i)
        sync()
        wall = time.perf_counter() - start
    kernel_us, by_kind, count = defaultdict(float), defaultdict(float), 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us[event.name] += event.device_time
            by_kind[kind_of(event.name)] += event.device_time
            count += 1
    busy = max(sum(kernel_us.values()) / 1e6, 1e-9)
    print(f"{args.model} batch {args.batch}{' compiled' if args.compile else ''}: {wall / args.steps * 1e3:.1f} ms "
          f"per step, GPU busy {busy / wall:.0%} of the wall clock, {count / args.steps:.0f} kernels per step")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:16s} {us / 1e3 / args.steps:8.2f} ms per step  {us / 1e6 / busy:5.1%}")
    print("top kernels (ms per step):")
    for name, us in sorted(kernel_us.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {us / 1e3 / args.steps:8.3f}  {name[:150]}")


if __name__ == "__main__":
    main()
