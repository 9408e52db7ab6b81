"""What the benchmark scripts share: the machine line a report starts with, a command's time and its own peak
memory, and the report printed and written as JSON (``--json PATH``) at the end. Scripts run as ``python benchmarks/NAME.py``, so ``from report import ...``."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name where Linux says it (platform.processor() is empty there), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int = 2) -> str:
    import torch

    return f"{cpu_name()}, torch {torch.__version__}, {threads} threads"


def free_port() -> int:
    """A loopback port nothing listens on now, for a server a benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(report: dict, path: str | None) -> None:
    print(json.dumps(report, indent=1))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1) + "\n")


def timed_command(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one command, its own (``wait4``): not the largest child's so far, as
    ``RUSAGE_CHILDREN`` gives. A child started by vfork counts its parent's peak in its own, so the parent should not
    have held the benchmark's data (make it in a process of its own)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise subprocess.CalledProcessError(status, command)
    return time.perf_counter() - started, usage.ru_maxrss / 2**20
