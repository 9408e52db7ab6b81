"""What the memory benchmarks share: each way measured runs in a fresh Python process (its own peak RSS), the script
calling itself with ``--one WAY``, which prints its row as JSON on its last line."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def parser(doc: str, ways: tuple[str, ...], images: int, images_help: str) -> argparse.ArgumentParser:
    """The options every such benchmark takes: ``--data``, ``--images``, ``--threads``, ``--json`` and the child's
    hidden ``--one``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--images", type=int, default=images, help=images_help)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--one", choices=ways, help=argparse.SUPPRESS)  # the child process's way
    return p


def row(script: str, way: str, args: argparse.Namespace, options: tuple[str, ...]) -> dict:
    """``script --one WAY`` with ``args``' values of ``options`` (dest names), in a new process: its JSON row."""
    argv = [sys.executable, script, "--one", way]
    for name in options:
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def finish(result: dict, agree: bool, json_path: Path | None, what: str = "metrics") -> int:
    """Prints the ratios and whether the ``what`` agree, writes ``result`` to ``json_path``; the exit status."""
    print(json.dumps(result["ratios"]), f"{what} agree" if agree else f"{what.upper()} DIFFER")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
    return 0 if agree else 1
