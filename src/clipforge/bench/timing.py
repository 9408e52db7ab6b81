"""How the bench times and measures: implementations take turns with the order rotating every repeat, so the
machine's drifting speed (shared cores, thermal state) hits every implementation alike; ratios are medians of
adjacent runs. Peak memory and the matmul peak that MFU is measured against."""
from __future__ import annotations

import re
import resource
import statistics
import time
from pathlib import Path

import torch


# clipforge run another way (ONNX Runtime fp32 and int8, weights cast to bf16): each also timed against open_clip
CLIPFORGE_BACKENDS = ("onnx", "onnx-int8", "bf16")


def without_grad(fn):
    """``fn`` as a timed run: called under ``torch.no_grad()``, its result dropped."""
    def run():
        with torch.no_grad():
            fn()
    return run


def interleaved(runs: dict, repeats: int) -> dict:
    """``{name: [seconds per repeat]}``: each ``run()`` in turn, the order rotated every repeat."""
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: dict, items: int, unit: str) -> dict:
    """Median/min/max rate per implementation and, for peers, ``clipforge_ratio``: the median of adjacent-run
    ratios (> 1: clipforge faster). clipforge's other backends (``CLIPFORGE_BACKENDS``) also get ``open_clip_ratio``:
    the same against open_clip (> 1: the backend faster)."""
    out = {}
    for name, ts in times.items():
        rates = [items / t for t in ts]
        out[name] = {unit: statistics.median(rates), "min": min(rates), "max": max(rates)}
        if name != "clipforge" and "clipforge" in times:
            out[name]["clipforge_ratio"] = statistics.median(p / c for c, p in zip(times["clipforge"], ts))
        if name in CLIPFORGE_BACKENDS and "open_clip" in times:
            out[name]["open_clip_ratio"] = statistics.median(p / c for c, p in zip(ts, times["open_clip"]))
    return out


def rss_peak_growth():
    """Start measuring: returns a function giving the peak resident memory since now, above the current RSS, in MB.

    On Linux the kernel's high-water mark is reset first (``/proc/self/clear_refs``), so transient set-up memory
    (tokenizer tables, weight conversion) freed before the steps neither hides nor inflates their peak; elsewhere
    it falls back to the growth of ``ru_maxrss``.
    """
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
