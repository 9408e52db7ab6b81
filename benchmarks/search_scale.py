"""Search at scale: peak RSS and wall time of `clipforge index build` and `clipforge serve` at 1M-10M vectors, recall
against exact search, query latency with the index memory-mapped vs in RAM; the code before issue 19 as the peer.

    python benchmarks/search_scale.py --sizes 1000000 3000000 10000000 --dims 128 --json runs/bench/search-scale.json
    python benchmarks/search_scale.py --sizes 1000000 --dims 512 --json runs/bench/search-scale-512.json
    python benchmarks/search_scale.py --sizes 3000000 --peer-commit 2b293d8   # + the in-RAM build/serve before

Stand-in collections (no real 10M-image collection exists here): unit vectors around 1,000 random centres with
Gaussian noise (structure like real CLIP embeddings, so recall is meaningful), written as `clipforge embed` writes
them (fp16 shards of 1M + parquet metadata with a path and a caption per row) under --work, reused across runs.
Each build and server runs as its own process under `/usr/bin/time -v` (peak RSS = its VmHWM); the server is asked
300 text queries over HTTP (random-init ViT-Tiny-64 as the text tower: dim 128 only), RSS read from /proc after
them. Recall@10 and index-only latency (one vector query at a time, 1 thread) are measured in this process on 1,000
fresh queries near the data, against exact search computed in chunks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from report import free_port

REPO = Path(__file__).resolve().parents[1]
SHARD = 1_000_000


def standin(folder: Path, n: int, d: int, seed: int = 0, clusters: int = 1000) -> Path:
    from clipforge.retrieval.collection import write_image_shard, write_info

    if (folder / "embed_info.json").exists():
        return folder
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    for shard, start in enumerate(range(0, n, SHARD)):
        rows = min(SHARD, n - start)
        part = centres[rng.integers(0, clusters, rows)] + 0.8 * rng.standard_normal((rows, d), dtype=np.float32)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        ids = range(start, start + rows)
        write_image_shard(folder, shard, part, {"path": [f"images/{i:09d}.jpg" for i in ids],
                                                "caption": [f"stand-in caption number {i}" for i in ids],
                                                "width": [640] * rows, "height": [480] * rows})
        print(f"  wrote shard {shard} ({start + rows:,} / {n:,})", file=sys.stderr, flush=True)
    np.save(folder / "centres.npy", centres)
    write_info(folder, {"input": "stand-in", "dim": d, "count": n, "model_spec": {"model": "ViT-Tiny-64"}})
    return folder


def fresh_queries(folder: Path, count: int = 1000, seed: int = 7) -> np.ndarray:
    from clipforge.retrieval.collection import StoredVectors

    stored = StoredVectors(folder)
    rng = np.random.default_rng(seed)
    q = stored.get(np.sort(rng.choice(len(stored), count, replace=False)))
    q = q + 0.1 * rng.standard_normal(q.shape).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def timed(command: list[str], env=None) -> dict:
    """Wall time and peak RSS of a command, from GNU time."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return {"wall_s": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024), "stderr_tail": done.stderr[-600:]}


def build(folder: Path, src: Path, extra=()) -> dict:
    result = timed([sys.executable, "-m", "clipforge.cli", "index", "build", str(folder), "--quiet", *extra],
                   env={"PYTHONPATH": str(src)})
    info = json.loads((folder / "index.json").read_text())
    result.update(index_mb=round((folder / "index.faiss").stat().st_size / 2**20),
                  **{k: info.get(k) for k in ("kind", "nlist", "pq_m", "pq_bits", "nprobe", "k_factor", "recall@10")})
    return result


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_ms": round(1000 * s[len(s) // 2], 3), "p99_ms": round(1000 * s[min(len(s) - 1, int(0.99 * len(s)))], 3)}


def index_latency_and_recall(folder: Path, queries: np.ndarray, truth: np.ndarray, mmap: bool) -> dict:
    import faiss

    from clipforge.retrieval.index import load_index, recall_at_k

    faiss.omp_set_num_threads(1)
    index, _ = load_index(folder, mmap=mmap)
    passes = []
    for _ in range(2):  # first pass: pages not yet touched by this process; second: warm
        times, found = [], []
        for q in queries:
            start = time.perf_counter()
            _, ids = index.search(q[None], 10)
            times.append(time.perf_counter() - start)
            found.append(ids[0])
        passes.append(percentiles(times))
    return {"recall@10": round(recall_at_k(np.array(found), truth), 4), "first_pass": passes[0], **passes[1]}


def serve(folder: Path, src: Path, extra=(), queries: int = 300) -> dict:
    """Start `clipforge serve`, time `queries` text searches over HTTP, then read the server's RSS."""
    import httpx

    port = free_port()
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "serve", str(folder), "--model", "ViT-Tiny-64",
                                "--port", str(port), *extra], env={**os.environ, "PYTHONPATH": str(src)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"serve exited: {process.stderr.read()[-2000:]}")
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            startup = time.perf_counter() - start
            status = Path(f"/proc/{process.pid}/status").read_text()
            rss_started = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
            words = ["red", "dog", "beach", "city", "night", "two", "people", "car", "tree", "snow", "small", "old"]
            rng = np.random.default_rng(0)
            times = []
            for _ in range(queries):
                text = " ".join(rng.choice(words, 4))
                t = time.perf_counter()
                response = http.get("/search", params={"q": text, "k": 10})
                times.append(time.perf_counter() - t)
                response.raise_for_status()
            status = Path(f"/proc/{process.pid}/status").read_text()
    finally:
        process.terminate()
        process.wait(timeout=60)
    field = lambda key: round(int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024)  # noqa: E731
    # RssFile: pages of the memory-mapped index and metadata files, shared with the page cache and dropped by the
    # kernel under memory pressure; RssAnon: the process's own memory
    return {"startup_s": round(startup, 1), "rss_after_startup_mb": round(rss_started),
            "rss_after_queries_mb": field("VmRSS"), "anon_mb": field("RssAnon"), "file_backed_mb": field("RssFile"),
            "peak_rss_mb": field("VmHWM"), "http": percentiles(times)}


def peer_checkout(commit: str, work: Path) -> Path:
    """The code at ``commit`` (before issue 19) in a git worktree: its src folder."""
    tree = work / f"peer-{commit}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True)
    return tree / "src"


def peer_folder(folder: Path) -> Path:
    """A sibling folder sharing the stand-in's shards (symlinks), so the peer's index never replaces ours."""
    peer = folder.parent / (folder.name + "-peer")
    peer.mkdir(exist_ok=True)
    for name in ("img_emb", "metadata", "embed_info.json"):
        if not (peer / name).exists():
            (peer / name).symlink_to(folder / name)
    return peer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "search-scale")
    parser.add_argument("--max-memory", help="pass --max-memory to the builds")
    parser.add_argument("--peer-commit", help="also build and serve with the code at this commit (e.g. 2b293d8)")
    parser.add_argument("--no-serve", action="store_true")
    parser.add_argument("--reuse-index", action="store_true", help="keep an index already built in --work")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from clipforge.retrieval.collection import StoredVectors
    from clipforge.retrieval.index import exact_top_k

    src = REPO / "src"
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "python": platform.python_version(), "rows": []}
    for d in args.dims:
        for n in args.sizes:
            folder = args.work / f"{n // 1_000_000}M-{d}"
            print(f"{n:,} x {d}: stand-in", file=sys.stderr, flush=True)
            standin(folder, n, d)
            row = {"n": n, "dim": d, "disk_mb": {"embeddings": round(sum(p.stat().st_size for p in
                                                                          (folder / "img_emb").glob("*.npy")) / 2**20),
                                                 "metadata": round(sum(p.stat().st_size for p in
                                                                       (folder / "metadata").glob("*.parquet")) / 2**20)}}
            if args.reuse_index and (folder / "index.faiss").exists():
                row["build"] = {"reused": True, **json.loads((folder / "index.json").read_text())}
            else:
                print("  build", file=sys.stderr, flush=True)
                row["build"] = build(folder, src, ["--max-memory", args.max_memory] if args.max_memory else [])
            print(f"  {row['build']}", file=sys.stderr, flush=True)
            queries = fresh_queries(folder)
            _, truth = exact_top_k(StoredVectors(folder), queries, 10)
            row["index_in_ram"] = index_latency_and_recall(folder, queries, truth, mmap=False)
            row["index_mmap"] = index_latency_and_recall(folder, queries, truth, mmap=True)
            if not args.no_serve and d == 128:
                print("  serve", file=sys.stderr, flush=True)
                row["serve_mmap"] = serve(folder, src)
                row["serve_in_ram"] = serve(folder, src, ["--index-in-memory"])
            if args.peer_commit:
                peer_src, peer = peer_checkout(args.peer_commit, args.work), peer_folder(folder)
                print("  peer build", file=sys.stderr, flush=True)
                row["peer_build"] = build(peer, peer_src)
                if not args.no_serve and d == 128:
                    row["peer_serve"] = serve(peer, peer_src)
            for part in ("build", "peer_build"):
                row.get(part, {}).pop("stderr_tail", None)
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
