"""Per-rank memory of DDP vs FSDP training (issue 18): what each rank holds for weights, gradients and AdamW state,
and its peak RSS, at 1, 2 and 4 ranks on CPU (gloo), for a model large enough to show the difference.

    python benchmarks/fsdp_memory.py --model ViT-B-32 --ranks 1 2 4 --json runs/bench/fsdp-memory.json

Each configuration is one `torchrun --nproc-per-node R` of 2 training steps (batch 2 per rank, generated shapes
resized to the model's 224 px); every rank reports (a) its training state in bytes: the local parameters (a shard
under FSDP), their gradients and AdamW's two moments, counted from the tensors themselves after the last step, and
(b) its peak RSS (VmHWM), which also holds torch itself (~650 MB), activations and communication buffers. From the
state bytes per parameter the script derives the largest model whose training state fits a budget (--budget-gb).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(args) -> None:
    """One rank: train 2 steps in-process, then print its state bytes and peak RSS as one JSON line."""
    import torch

    from clipforge.train import TrainConfig, train

    cfg = TrainConfig(model=args.model, train_data=args.data, batch_size=2, steps=2, workers=0, save_every=0,
                      output=args.output, progress=False, fsdp=args.mode == "fsdp", seed=0, log_every=1)
    summary = train(cfg)
    model = summary["model"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = {"params": sum(local_bytes(p) for p in model.parameters()),
             "grads": sum(local_bytes(p.grad) for p in trainable if p.grad is not None),
             # AdamW's exp_avg and exp_avg_sq: each the size of its parameter's local shard
             "adamw": 2 * sum(local_bytes(p) for p in trainable)}
    peak = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    print("RANK " + json.dumps({"rank": int(os.environ.get("RANK", 0)), "state_bytes": sum(state.values()), **state,
                                "peak_rss": peak, "parameters": sum(math.prod(p.shape) for p in model.parameters())}),
          flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(mode: str, ranks: int, model: str, data: str) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as output:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(port), str(Path(__file__).resolve()), "--worker", "--mode", mode,
               "--model", model, "--data", data, "--output", output]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                              PYTHONPATH=str(REPO / "src")))
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return sorted((json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("RANK ")),
                  key=lambda r: r["rank"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--budget-gb", type=float, default=80.0, help="per-rank memory budget for the size table")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import shapes_shard

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(4):
            shapes_shard(Path(folder) / f"s-{i:06d}.tar", 16, seed=i)
        data = str(Path(folder) / "s-{000000..000003}.tar")
        for mode in args.modes:
            for ranks in args.ranks:
                per_rank = run(mode, ranks, args.model, data)
                row = {"mode": mode, "ranks": ranks, "parameters": per_rank[0]["parameters"],
                       "state_mb": round(max(r["state_bytes"] for r in per_rank) / 2**20),
                       "peak_rss_mb": round(max(r["peak_rss"] for r in per_rank) / 2**20),
                       "state_bytes_per_parameter": round(max(r["state_bytes"] for r in per_rank) /
                                                          per_rank[0]["parameters"], 2)}
                row["largest_model_in_budget_b"] = round(args.budget_gb * 2**30 / row["state_bytes_per_parameter"]
                                                         / 1e9, 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "budget_gb": args.budget_gb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
