"""Adopting clip-retrieval's index with its embeddings: `clipforge import clip-retrieval --index` beside importing
and then building clipforge's own index (`clipforge index build`, the peer: the only way before).

    python benchmarks/adopt_index.py --rows 1000000 --json runs/bench/adopt-index.json

The embeddings folder: ``partitions`` img_emb .npy files of clustered unit float16 vectors (the structure CLIP
embeddings have; 512 dimensions, as ViT-B-32's) and their metadata, as `clip-retrieval inference` lays it out; the
index: what `clip-retrieval index` leaves for a collection this size, autofaiss's factory string
(``OPQ64_256,IVF{nlist}_HNSW32,PQ64x8``, an IVF list per ~250 vectors) built with FAISS directly (autofaiss 2.18 does
not run on FAISS 1.15), trained on a sample with fewer iterations than FAISS's defaults (its build is not what is
timed). Each way is timed from the command line, with its peak memory (the child's maximum resident set), and the
recall@10 each index was tuned to (the same target, on the same 500 queries: new points of the collection's
clusters, against exact search), and the median time of one of those queries through each index as `serve` loads it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from index_growth import clustered
from report import finish, machine, timed_command as timed


def write_folder(folder: Path, vectors: np.ndarray, partitions: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for kind in ("img_emb", "metadata"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for n, rows in enumerate(np.array_split(np.arange(len(vectors)), partitions)):
        np.save(folder / "img_emb" / f"img_emb_{n}.npy", vectors[rows].astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"/data/images/{i:09d}.jpg" for i in rows],
                                 "caption": [f"a photo number {i}" for i in rows]}),
                       folder / "metadata" / f"metadata_{n}.parquet")


def autofaiss_like_index(path: Path, vectors: np.ndarray, seed: int = 0) -> tuple[str, float]:
    """(factory string, seconds) of the index `clip-retrieval index` would leave, written to ``path``."""
    import faiss

    nlist = 1 << int(np.log2(len(vectors) / 250))
    factory = f"OPQ64_256,IVF{nlist}_HNSW32,PQ64x8"
    started = time.perf_counter()
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    opq.niter = opq.niter_pq = 4
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.pq.cp.niter, ivf.do_polysemous_training = 10, False
    sample = np.random.default_rng(seed).choice(len(vectors), size=min(len(vectors), 64 * nlist), replace=False)
    index.train(vectors[np.sort(sample)])
    for first in range(0, len(vectors), 65_536):
        index.add(vectors[first:first + 65_536])
    faiss.write_index(index, str(path))
    return factory, time.perf_counter() - started


def query_ms(folder: Path, queries: np.ndarray, repeats: int = 3) -> float:
    """Median milliseconds of one query's top 10 through the saved index as `serve` loads it (codes memory-mapped,
    the shortlist re-ranked from the stored vectors), the page cache warm from a first pass."""
    from clipforge.retrieval.index import load_index

    index, _ = load_index(folder, mmap=True)
    index.search(queries, 10)
    times = []
    for _ in range(repeats):
        for query in queries:
            started = time.perf_counter()
            index.search(query[None], 10)
            times.append(time.perf_counter() - started)
    return round(1000 * float(np.median(times)), 2)


def write_data(tmp: Path, rows: int, partitions: int) -> None:
    """The embeddings folder, tuning queries and autofaiss-like index, in a process of their own: a child started
    by a process counts that process's peak memory in its own (vfork), so the one that times stays small."""
    vectors = clustered(rows + 500, 512, seed=0)
    np.save(tmp / "queries.npy", vectors[rows:])  # new points of the collection's clusters
    write_folder(tmp / "embeddings", vectors[:rows], partitions)
    (tmp / "index").mkdir()
    factory, build_s = autofaiss_like_index(tmp / "index" / "image.index", vectors[:rows])
    (tmp / "index.txt").write_text(f"{factory} {build_s:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--json")
    p.add_argument("--write-data", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_data:
        write_data(Path(args.write_data), args.rows, args.partitions)
        return
    cli = [sys.executable, "-m", "clipforge.cli"]
    model = ["--model", "ViT-B-32", "--no-check", "--no-progress"]  # random weights: nothing to check against
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, __file__, "--write-data", str(tmp), "--rows", str(args.rows),
                        "--partitions", str(args.partitions)], check=True, stderr=subprocess.DEVNULL)
        factory, build_s = (tmp / "index.txt").read_text().split()
        tune = ["--tune-queries", str(tmp / "queries.npy")]
        adopt_s, adopt_gb = timed(cli + ["import", "clip-retrieval", str(tmp / "embeddings"), str(tmp / "adopted"),
                                         *model, "--index", str(tmp / "index"), *tune])
        import_s, import_gb = timed(cli + ["import", "clip-retrieval", str(tmp / "embeddings"), str(tmp / "built"),
                                           *model])
        index_s, index_gb = timed(cli + ["index", "build", str(tmp / "built"), "--quiet", *tune])
        adopted, built = (json.loads((tmp / name / "index.json").read_text()) for name in ("adopted", "built"))
        latency = {name: query_ms(tmp / name, np.load(tmp / "queries.npy")) for name in ("adopted", "built")}
    report = {"machine": machine(), "rows": args.rows, "dim": 512, "partitions": args.partitions,
              "autofaiss-like index": factory, "its build here s (not compared)": float(build_s),
              "import --index s": round(adopt_s, 1), "import --index peak RSS GB": round(adopt_gb, 2),
              "adopted recall@10, nprobe, k_factor": [adopted["recall@10"], adopted["nprobe"], adopted["k_factor"]],
              "peer: import s, index build s": [round(import_s, 1), round(index_s, 1)],
              "peer: import, index build peak RSS GB": [round(import_gb, 2), round(index_gb, 2)],
              "peer: built index": f"IVF{built['nlist']},PQ{built['pq_m']}x{built['pq_bits']}",
              "built recall@10, nprobe, k_factor": [built["recall@10"], built["nprobe"], built["k_factor"]],
              "ratio (import + index build) / import --index": round((import_s + index_s) / adopt_s, 2),
              "one query, top 10, median ms: adopted, built": [latency["adopted"], latency["built"]]}
    finish(report, args.json)


if __name__ == "__main__":
    main()
