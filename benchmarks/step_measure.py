"""What ``coca_step.py`` and ``limber_step.py`` measure of a training step, one measure per process (kept beside the
scripts, not in the package, so that they still run against an older checkout's ``src`` through PYTHONPATH)."""
from __future__ import annotations

import time

from clipforge.bench.timing import rss_peak_growth


def measure_step(step, measure: str, repeats: int = 5) -> dict:
    """``step()`` runs one training step and returns its loss. ``first``: peak resident growth over the first step
    (what the step needs); ``warm``: over a step after one warm-up (growth above what the allocator already holds);
    ``time``: median seconds of ``repeats`` steps after one warm-up."""
    if measure == "first":
        peak = rss_peak_growth()
        return {"loss": step(), "first_step_peak_mb": peak()}
    step()
    if measure == "warm":
        peak = rss_peak_growth()
        return {"loss": step(), "warm_step_peak_mb": peak()}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return {"loss": loss, "median_s": sorted(times)[len(times) // 2], "times_s": [round(t, 3) for t in times]}
