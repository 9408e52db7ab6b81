"""The subprocess protocol: a measurement is a JSON task run in a fresh process (``python -m clipforge.bench.worker
TASK``), which prints its result as one JSON line; peak memory then belongs to that measurement alone."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from .peers import build, peer
from .tasks import embed_speed, train_memory, train_speed

TASKS = {"embed": embed_speed, "train_speed": train_speed, "train_memory": train_memory}


def run_task(task: dict) -> dict:
    """One measurement in this process: build the model, its peers, and measure."""
    torch.set_num_threads(task.get("threads", 2))
    torch.manual_seed(0)
    device = torch.device(task.get("device", "cpu"))
    ours = build(task["model"])
    models = {impl: peer(impl, ours) for impl in task["impls"]}
    result = {impl: {"skipped": f"{impl} is not installed or has no such architecture"}
              for impl, m in models.items() if m is None}
    models = {impl: m.to(device) for impl, m in models.items() if m is not None}
    result.update(TASKS[task["kind"]](task, ours, models))
    return result


def run_in_subprocess(task: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "clipforge.bench.worker", json.dumps(task)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_task(json.loads(sys.argv[1]))))
