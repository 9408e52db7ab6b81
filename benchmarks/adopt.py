"""Adopting clip-retrieval's embeddings: `clipforge import clip-retrieval` on a synthetic embeddings folder as
`clip-retrieval inference` lays it out, timed and with its peak memory, beside a plain copy of the same files (the
floor: adoption reads and writes every vector once).

    python benchmarks/adopt.py --rows 1000000 --partitions 4 --json runs/bench/adopt.json

The folder: ``partitions`` img_emb/text_emb .npy files of unit float16 vectors (512 dimensions, as ViT-B-32's) and
their metadata parquet (``image_path``, ``caption``), in a temporary folder. The model named (random ViT-B-32
weights: ``--no-check``, since there are no images to check against) only records what embeds queries later.
Peak memory is each command's own maximum resident set (``wait4``), the model's weights included.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from report import finish, machine, timed_command as timed


def write_folder(folder: Path, rows: int, partitions: int, dim: int = 512, seed: int = 0) -> int:
    """A clip-retrieval embeddings folder; returns its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    per = rows // partitions
    for kind in ("img_emb", "text_emb", "metadata"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for n in range(partitions):
        for kind in ("img_emb", "text_emb"):
            out = np.lib.format.open_memmap(folder / kind / f"{kind}_{n}.npy", mode="w+", dtype=np.float16,
                                            shape=(per, dim))
            for first in range(0, per, 65_536):
                block = rng.standard_normal((min(65_536, per - first), dim), dtype=np.float32)
                out[first:first + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
            out.flush()
            del out
        ids = range(n * per, (n + 1) * per)
        pq.write_table(pa.table({"image_path": [f"/data/images/{i:09d}.jpg" for i in ids],
                                 "caption": [f"a photo number {i}" for i in ids]}),
                       folder / "metadata" / f"metadata_{n}.parquet")
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "clip-retrieval"
        size = write_folder(source, args.rows, args.partitions)
        copy_started = time.perf_counter()
        shutil.copytree(source, Path(tmp) / "copy")
        copy_s = time.perf_counter() - copy_started
        shutil.rmtree(Path(tmp) / "copy")
        model_only_s, model_only_gb = timed([sys.executable, "-c",
                                             "import clipforge; clipforge.create_model('ViT-B-32')"])
        seconds, peak_gb = timed([sys.executable, "-m", "clipforge.cli", "import", "clip-retrieval", str(source),
                                  str(Path(tmp) / "adopted"), "--model", "ViT-B-32", "--no-check", "--no-progress"])
    report = {"machine": machine(), "rows": args.rows, "partitions": args.partitions,
              "folder_gb": round(size / 1e9, 2),
              "adopt_s": round(seconds, 1), "adopt_rows_per_s": round(args.rows / seconds),
              "adopt_peak_rss_gb": round(peak_gb, 2), "peer: copying the folder (shutil.copytree) s": round(copy_s, 1),
              "ratio adopt / copy": round(seconds / copy_s, 2),
              "a process building the model alone: s, peak RSS GB": [round(model_only_s, 1), round(model_only_gb, 2)]}
    finish(report, args.json)


if __name__ == "__main__":
    main()
