"""Index recall and query latency at 100k and 1M random unit vectors; HTTP latency under concurrent load; image
embedding throughput on real images, clipforge vs open_clip.

    python benchmarks/search.py --sizes 100000 1000000 --json runs/bench/search.json

Vectors are random unit vectors of dimension 128 (ViT-Tiny-64's embedding size): the hardest case for approximate
search, having no cluster structure. The index is tuned to recall@10 >= 0.95 on 500 random queries, then measured
against exact search (``IndexFlatIP``) on 1,000 other random queries; latencies are single queries, 1 thread.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def percentiles(samples):
    s = sorted(samples)
    return {"p50_ms": 1000 * s[len(s) // 2], "p99_ms": 1000 * s[min(len(s) - 1, int(0.99 * len(s)))]}


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def index_bench(n: int, d: int = 128, queries: int = 1000, kind: str = "ivfpq") -> dict:
    import faiss

    from clipforge.retrieval.index import build_index, recall_at_k

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, d), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    q = rng.standard_normal((queries, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    start = time.perf_counter()
    index, info = build_index(vectors, kind=kind, target_recall=0.95, queries=random_unit(500, d, seed=99))
    build_s = time.perf_counter() - start
    exact = faiss.IndexFlatIP(d)
    exact.add(vectors)
    _, truth = exact.search(q, 10)
    _, found = index.search(q, 10)
    faiss.omp_set_num_threads(1)
    lat = {}
    for name, idx in ((kind, index), ("exact", exact)):
        times = []
        for row in q[:300]:
            t = time.perf_counter()
            idx.search(row[None], 10)
            times.append(time.perf_counter() - t)
        lat[name] = percentiles(times)
    return {"n": n, "dim": d, "index": info, "build_s": build_s, "recall@10_fresh_queries": recall_at_k(found, truth),
            "latency": lat, "memory_mb": {"exact": n * d * 4 / 2**20}}


def http_bench(n: int = 100_000, clients: int = 8, per_client: int = 40) -> dict:
    # The 100k-vector index is ~0.5 GB on disk: remove it however the run ends.
    with tempfile.TemporaryDirectory(prefix="clipforge-http-bench-") as folder:
        return _http_bench(Path(folder), n, clients, per_client)


def _http_bench(folder: Path, n: int, clients: int, per_client: int) -> dict:
    import httpx
    import pyarrow as pa
    import pyarrow.parquet as pq
    import uvicorn

    import clipforge
    from clipforge.retrieval.index import build_index, save_index
    from clipforge.serve.app import create_app

    (folder / "img_emb").mkdir()
    (folder / "metadata").mkdir()
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((n, 128), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.save(folder / "img_emb" / "img_emb_00000.npy", vectors.astype(np.float16))
    pq.write_table(pa.table({"path": [f"v{i}.jpg" for i in range(n)], "caption": [""] * n,
                             "width": [0] * n, "height": [0] * n}), folder / "metadata" / "metadata_00000.parquet")
    save_index(*build_index(vectors, kind="ivfpq", target_recall=0.95, queries=random_unit(500, 128, seed=98)), folder)
    model = clipforge.create_model("ViT-Tiny-64").eval()
    app = create_app(folder, model, clipforge.Preprocess(64), clipforge.get_tokenizer("ViT-Tiny-64"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=8765, log_level="error"))
    server_thread = threading.Thread(target=server.run, daemon=True)
    server_thread.start()
    while not server.started:
        time.sleep(0.05)
    times, errors = [], []

    def client(c):
        with httpx.Client(base_url="http://127.0.0.1:8765") as http:
            for i in range(per_client):
                t = time.perf_counter()
                r = http.get("/search", params={"q": f"a photo of thing {c}-{i}", "k": 10})
                times.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(r.status_code)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server.should_exit = True
    server_thread.join(timeout=30)  # free the port for the next size
    sizes = app.state.batchers["text"].batch_sizes
    return {"n": n, "clients": clients, "requests": len(times), "errors": len(errors), **percentiles(times),
            "requests_per_s": len(times) / wall, "mean_text_batch": statistics.mean(sizes)}


def embed_bench(data: Path, model_name: str = "ViT-B-32", limit: int = 200) -> dict:
    """Images/s embedding real photos (coco-mini, then CIFAR-10 test) with the same random weights in both."""
    import torch

    import clipforge
    from clipforge.bench.peers import build, peer
    from clipforge.bench.timing import interleaved, summary
    from clipforge.data import ShardSource
    from clipforge.preprocess import open_image

    torch.set_num_threads(2)
    ours = build(model_name).eval()
    theirs = peer("open_clip", ours).eval()
    preprocess = clipforge.Preprocess(ours.image_size)
    results = {}
    for name, spec in (("coco-mini", data / "coco-mini/test/test-000000.tar"),
                       ("cifar10", data / "cifar10/test/test-000000.tar")):
        source = ShardSource(str(spec), shuffle_buffer=0)
        images = []
        for raw in source.samples(0, 1, 0, 0, {}):
            images.append(preprocess(open_image(raw["jpg"])))
            if len(images) >= limit:
                break
        batch = torch.stack(images)
        runs = {}
        for impl, model in (("clipforge", ours), ("open_clip", theirs)):
            with torch.no_grad():
                model.encode_image(batch[:8])

            def run(model=model):
                with torch.no_grad():
                    for i in range(0, len(batch), 32):
                        model.encode_image(batch[i:i + 32])
            runs[impl] = run
        rates = summary(interleaved(runs, 5), len(batch), "images_per_s")  # interleaved, order rotating
        row = {impl: rates[impl]["images_per_s"] for impl in runs}
        row["ratio"] = rates["open_clip"]["clipforge_ratio"]
        row["images"] = len(batch)
        results[name] = row
    return {"model": model_name, **results}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--skip", nargs="*", default=[], choices=["index", "http", "embed"])
    parser.add_argument("--embed-images", type=int, default=64, help="images per data set for the embed test")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    out |= {"machine": platform.processor() or platform.machine()}
    if "index" not in args.skip:
        out["index"] = []
        for n in args.sizes:
            for kind in (["ivfpq", "hnsw"] if n <= 200_000 else ["ivfpq"]):
                out["index"].append(index_bench(n, kind=kind))
                print(json.dumps(out["index"][-1]), flush=True)
    if "http" not in args.skip:
        out["http"] = []
        for n in args.sizes:
            out["http"].append(http_bench(n))
            print(json.dumps(out["http"][-1]), flush=True)
    if "embed" not in args.skip:
        out["embed"] = embed_bench(args.data, limit=args.embed_images)
        print(json.dumps(out["embed"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
