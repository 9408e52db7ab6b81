"""What produced a result: library versions, the machine, and clipforge's git commit when it runs from a checkout; and
whether a device named for a run is there (``device_problem``).

Saved beside every training run (``run_config.json``'s ``environment``) so that two runs of the same settings that
end differently can be told apart by what changed underneath them."""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

_PACKAGES = ("numpy", "Pillow", "tokenizers", "webdataset", "transformers", "open_clip_torch")


def run_environment() -> dict:
    """Versions of Python and of the installed packages that shape training numerics (absent ones left out), the
    machine (CPU model, the instruction set torch's kernels use), torch's thread count, and clipforge's commit (with
    ``-dirty`` if its sources differ from it)."""
    import torch

    from . import __version__

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    environment = {"clipforge": __version__, "python": sys.version.split()[0],
                   "torch": torch.__version__,  # with its build tag (+cpu, +cu130), which package metadata drops
                   **versions, "machine": platform.processor() or platform.machine(), "cpu": _cpu_model(),
                   # the kernels torch dispatches to (AVX2, AVX512): they sum in different orders, so the same run
                   # on two CPUs of one family drifts apart after some steps
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "torch_threads": torch.get_num_threads(), "torch_cuda": torch.version.cuda}
    commit = _git_commit(Path(__file__).resolve().parent)
    if commit:
        environment["git_commit"] = commit
    return environment


def _cpu_model() -> str | None:
    """The CPU's model name and family/model numbers (Linux), which tell apart CPUs one brand name covers."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "model name" not in fields:
        return None
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def _git_commit(folder: Path) -> str | None:
    """``HEAD`` of the git checkout holding ``folder`` (``-dirty`` when tracked files under it changed), or None
    when it is not in one (an installed wheel) or git is missing."""
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)

        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_has_bf16() -> bool:
    """Whether this processor multiplies bf16 natively (AVX512-BF16 or AMX); without, bf16 matmul is slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used here, or None: said before any model loads (torch's own errors come late, as a
    traceback, and a missing second GPU only at the first tensor moved there)."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        return "not a device name (cpu, cuda, cuda:1, mps ...)"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
            return f"no CUDA device is available here (torch {torch.__version__}, {build})"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        return "Apple's MPS is not available here"
    return None
