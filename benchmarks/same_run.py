"""Does a training run give the same losses under another clipforge commit, another torch, or other CPU kernels?

Trains the objectives study's seed-0 "contrastive, text from scratch" run (benchmarks/objectives.py: the Flickr8k
recipe with the zoo model's own text tower) with whichever clipforge and torch this Python imports, stops it after
``--steps`` logged steps (the schedule stays the full run's), and compares its ``metrics.jsonl`` with a reference run's,
record by record. It uses only what every clipforge since the study began has (``TrainConfig``, ``train``,
``read_config``), so an older commit can run it:

    # the reference: python benchmarks/objectives.py --runs "contrastive, text from scratch" ... (its metrics.jsonl)
    REF=runs/objectives/contrastive-text-from-scratch/metrics.jsonl
    git worktree add ../clipforge-a8c9380 a8c9380        # another commit
    PYTHONPATH=../clipforge-a8c9380/src python benchmarks/same_run.py --steps 1300 --output runs/same-run/a8c9380 \\
        --reference $REF
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python benchmarks/same_run.py --steps 1000 --output runs/same-run/avx2 --reference $REF   # AVX2 kernels
    python benchmarks/same_run.py --compare-only --output runs/objectives-avx2/contrastive-text-from-scratch \\
        --reference $REF                                   # two finished runs

Prints the first logged step whose records differ (every field but samples/s) and the loss difference at every 100th
step.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def records(path: Path) -> dict[int, dict]:
    """step -> its logged fields (training and validation lines merged), samples/s left out: it is timing."""
    merged: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            merged.setdefault(record["step"], {}).update(record)
    for record in merged.values():
        record.pop("samples_per_s", None)
    return merged


def compare(run: Path, reference: Path) -> None:
    ours, theirs = records(run), records(reference)
    steps = sorted(set(ours) & set(theirs))
    if not steps:
        raise SystemExit(f"no logged step in common between {run} and {reference}")
    first = next((s for s in steps if ours[s] != theirs[s]), None)
    print(f"{len(steps)} logged steps in common (to step {steps[-1]}): "
          + ("identical, every field" if first is None else f"first difference at step {first}"))
    for step in steps:
        if step % 100 == 0 and "loss" in ours[step] and "loss" in theirs[step]:
            print(f"step {step}: loss {ours[step]['loss']:.6f} vs {theirs[step]['loss']:.6f} "
                  f"(difference {ours[step]['loss'] - theirs[step]['loss']:+.6f})")


def train_until(output: Path, steps: int) -> None:
    """Train in a child process (its own process group, data workers included) and stop it once ``steps`` is
    logged."""
    child = subprocess.Popen([sys.executable, __file__, "--train", "--output", str(output)], cwd=REPO,
                             start_new_session=True)
    metrics = output / "metrics.jsonl"
    try:
        while child.poll() is None:
            if metrics.exists() and steps in records(metrics):
                break
            time.sleep(5)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait()


def train_run(output: Path) -> None:
    import torch

    from clipforge.train import TrainConfig, train
    from clipforge.train.cli import read_config

    torch.set_num_threads(2)
    recipe = read_config(REPO / "recipes" / "flickr8k.yaml")
    # objectives.py's "contrastive, text from scratch" settings (written out: an older clipforge cannot import it)
    train(TrainConfig(**{**recipe, "text_model": None, "lock_text": False, "text_cache": False,
                         "output": str(output), "progress": False, "save_every": recipe["steps"] // 4, "keep": 4}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="this run's folder (or a finished run's)")
    parser.add_argument("--reference", type=Path, help="the metrics.jsonl to compare with")
    parser.add_argument("--steps", type=int, default=200, help="stop once this step is logged [200]")
    parser.add_argument("--compare-only", action="store_true", help="compare --output's metrics.jsonl, train nothing")
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.train:
        return train_run(args.output)
    if not args.compare_only:
        if args.output.exists():
            raise SystemExit(f"{args.output} exists: give a new folder (a resumed run is not the same run)")
        train_until(args.output, args.steps)
    if args.reference:
        compare(args.output / "metrics.jsonl", args.reference)


if __name__ == "__main__":
    main()
