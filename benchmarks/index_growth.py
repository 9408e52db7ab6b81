"""A collection that grows: `index build` after `embed` added images adds their vectors to the IVF-PQ index (its
trained lists kept, tuned again) beside building it anew (`--rebuild`, the peer: what every build did before, and
what autofaiss does).

    python benchmarks/index_growth.py --rows 1000000 --added 100000 --json runs/bench/index-growth.json

Synthetic clustered unit vectors (the structure CLIP embeddings have) in shards as `clipforge embed` writes them; the
index is built over the first ``rows - added``, the rest appended as a new shard, then each way is timed from the
command line, and its recall@10 measured on queries near the collection (old rows and new alike) against exact
search.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from report import finish, machine


def clustered(n: int, d: int, seed: int, clusters: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    vectors = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_rows(folder: Path, shard: int, vectors: np.ndarray, first: int) -> None:
    from clipforge.retrieval.collection import write_image_shard

    ids = range(first, first + len(vectors))
    write_image_shard(folder, shard, vectors, {"path": [f"img/{i}.jpg" for i in ids], "caption": [""] * len(ids),
                                               "width": [0] * len(ids), "height": [0] * len(ids)})


def build(folder: Path, *extra: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clipforge.cli", "index", "build", str(folder), "--kind", "ivfpq",
                           "--quiet", *extra], check=True, capture_output=True, text=True)
    return time.perf_counter() - started, done.stdout.strip()


def recall(folder: Path, queries: np.ndarray, vectors: np.ndarray) -> dict:
    """recall@10 on ``queries`` against exact search, and the knobs the build tuned."""
    from clipforge.retrieval.index import exact_top_k, load_index, recall_at_k

    index, info = load_index(folder)
    return {"recall@10": round(recall_at_k(index.search(queries, 10)[1], exact_top_k(vectors, queries, 10)[1]), 3),
            "nprobe": info["nprobe"], "k_factor": info["k_factor"], "nlist": info["nlist"],
            "tuned recall@10": round(info["recall@10"], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--added", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--json")
    args = p.parse_args()
    vectors = clustered(args.rows, args.dim, seed=0)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(args.rows, 500, replace=False)]
    queries = queries + 0.1 * rng.standard_normal(queries.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    before = args.rows - args.added
    report = {"machine": machine(), "rows": args.rows, "added": args.added, "dim": args.dim}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "emb"
        shard = 0
        for first in range(0, before, args.shard_rows):
            write_rows(folder, shard, vectors[first:min(before, first + args.shard_rows)], first)
            shard += 1
        report["first build s"], _ = build(folder)
        write_rows(folder, shard, vectors[before:], before)
        report["adding the new rows s"], said = build(folder)
        assert said.startswith("added"), said
        report["adding: index"] = recall(folder, queries, vectors)
        report["peer: --rebuild s"], said = build(folder, "--rebuild")
        assert said.startswith("built"), said
        report["peer: index"] = recall(folder, queries, vectors)
    report["speed-up vs rebuild"] = round(report["peer: --rebuild s"] / report["adding the new rows s"], 2)
    report = {key: round(value, 3) if isinstance(value, float) else value for key, value in report.items()}
    finish(report, args.json)


if __name__ == "__main__":
    main()
