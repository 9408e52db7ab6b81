"""Near-duplicate images: what ``clipforge filter --dedup`` finds with a model trained here, beside a pixel-space
de-duplication (the classical peer: grey thumbnails compared by correlation), and what it costs.

    python benchmarks/dedup.py runs/flickr8k/checkpoints/step-00002400 --json runs/bench/dedup.json

- Planted copies: Flickr8k test's 1,000 photos (each with its first caption) plus 200 altered copies of 200 of them,
  50 of each kind a scraped collection holds: re-encoded as JPEG at quality 30, re-uploaded at half size, cropped to
  the central 80%, brightened by 20%. Each copy keeps its photo's caption. ``clipforge embed --captions`` and
  ``clipforge filter --dedup T``: recall (planted pairs resolved, one of the two dropped for the other; by kind) and
  false drops (a photo dropped for a different photo). The peer: the same greedy rule on 16 x 16 grey thumbnails,
  centred and scaled (their dot product is the pixel correlation), at correlation thresholds.
- A crowded collection: CIFAR-10 (20,000 train + 10,000 test photos at 32 px, seen at 64) holds few copies; how many
  photos each threshold drops there, beside how close random pairs of photos sit in the model's space.
- Cost: each command's wall seconds (model loading included), and the rule alone (``near_duplicates``: each row
  compared with the kept ones, quadratic) on random unit vectors of the model's width with 10% near copies planted, at
  30,000 and 100,000 rows (``--scale-only``: this part alone).
- Tried and not kept (``--tried-index``, on the CIFAR-10 vectors and on the 100,000 random ones): each row's 32
  nearest neighbours from an IVF-PQ index (``clipforge index``'s, re-ranked exactly) as its only candidates, one
  pass in rank order (``indexed_candidates`` below): the index build and the pass timed, the drops compared with the
  exact rule's. Also the exact rule at blocks of 512 rows (the default) timed beside 2,048.
- Candidates from clusters (``--clustered``: ``filter --dedup-clusters``, ``clustered_near_duplicates``): on the
  CIFAR-10 vectors at three thresholds and on planted random vectors at 100,000 and 300,000 rows, its drops and named
  twins against the exact rule's, and both timed; at 1,000,000 rows the clustered rule alone. Each row in its 3
  nearest clusters (the default) and, as SemDeDup does, in its nearest only.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipforge.data import open_source
from clipforge.retrieval.collection import load_embeddings
from clipforge.retrieval.filter import clustered_near_duplicates, near_duplicates
from clipforge.retrieval.index import build_index

REPO = Path(__file__).resolve().parents[1]
CIFAR_SHARDS = "{train/train-{000000..000009},test/test-{000000..000004}}.tar"
KINDS = {
    "jpeg q30": lambda im: Image.open(_jpeg(im, 30)),
    "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.BICUBIC),
    "centre crop 80%": lambda im: im.crop((im.width // 10, im.height // 10, im.width - im.width // 10,
                                          im.height - im.height // 10)),
    "brighter 20%": lambda im: im.point(lambda v: min(255, int(v * 1.2))),
}


def _jpeg(image: Image.Image, quality: int) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return buffer


def thumbnails(paths: list[str]) -> np.ndarray:
    """[N, 256]: each image as 16 x 16 grey pixels, centred and scaled to unit length."""
    out = np.stack([np.asarray(Image.open(p).convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32).ravel()
                    for p in paths])
    out -= out.mean(axis=1, keepdims=True)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def score(duplicate_of: np.ndarray, twin: dict[int, int], kind: dict[int, str]) -> dict:
    """Recall over the planted pairs (overall and by kind) and false drops, from each row's ``duplicate_of``."""
    gone = set(np.flatnonzero(duplicate_of >= 0).tolist())
    resolved = {copy: copy in gone or original in gone for copy, original in twin.items()}
    by_kind = Counter(kind[c] for c, ok in resolved.items() if ok)
    false = sum(1 for row in gone if twin.get(row) != duplicate_of[row] and twin.get(int(duplicate_of[row])) != row)
    return {"recall": sum(resolved.values()) / len(twin), "false_drops": false, "dropped": len(gone),
            "recall_by_kind": {k: by_kind[k] / sum(1 for v in kind.values() if v == k) for k in KINDS}}


def planted_copies(args, tmp: Path, cli: list[str], report: dict) -> None:
    folder = tmp / "photos"
    folder.mkdir()
    paths: list[str] = []
    for sample in open_source(args.flickr8k, shuffle_buffer=0).samples(0, 1, 0, 0, Counter()):
        ext = next(e for e in ("jpg", "jpeg", "png") if e in sample)
        path = folder / f"{len(paths):05d}.{ext}"
        path.write_bytes(sample[ext])
        path.with_suffix(".txt").write_text(sample["txt"].decode().splitlines()[0])
        paths.append(str(path))
    originals = len(paths)
    rng = np.random.default_rng(0)
    twin, kind = {}, {}
    for number, source in enumerate(rng.choice(originals, 200, replace=False).tolist()):
        name = list(KINDS)[number % len(KINDS)]
        path = folder / f"copy{number:03d}.png"
        KINDS[name](Image.open(paths[source]).convert("RGB")).convert("RGB").save(path)
        path.with_suffix(".txt").write_text(Path(paths[source]).with_suffix(".txt").read_text())
        twin[len(paths)], kind[len(paths)] = source, name
        paths.append(str(path))
    emb = tmp / "planted"
    report["planted_embed_s"] = timed(cli + ["embed", str(folder), str(emb), "--pretrained", args.checkpoint,
                                             "--captions", "--no-progress"])
    vectors, rows = load_embeddings(emb)
    order = {str(Path(p).resolve()): i for i, p in enumerate(paths)}
    position = np.array([order[str(Path(r["path"]).resolve())] for r in rows])  # the collection's order -> ours
    report["planted"] = {"photos": originals, "copies": len(twin), "clipforge": [], "pixels": []}
    import pyarrow.parquet as pq

    for threshold in args.thresholds:
        out = tmp / f"planted-{threshold}"
        seconds = timed(cli + ["filter", str(emb), str(out), "--dedup", str(threshold), "--no-progress"])
        duplicate_of = np.full(len(paths), -1)
        for r in pq.read_table(out / "scores.parquet").to_pylist():
            if r["duplicate_of"]:
                duplicate_of[order[str(Path(r["path"]).resolve())]] = order[str(Path(r["duplicate_of"]).resolve())]
        report["planted"]["clipforge"].append({"threshold": threshold, "seconds": seconds,
                                               **score(duplicate_of, twin, kind)})
        print(json.dumps(report["planted"]["clipforge"][-1]), file=sys.stderr)
    pixels = thumbnails([paths[p] for p in position])
    for threshold in args.pixel_thresholds:
        start = time.perf_counter()
        found = near_duplicates(pixels, threshold, np.arange(len(pixels)))  # the collection's order (no scores)
        duplicate_of = np.full(len(paths), -1)
        duplicate_of[position[found >= 0]] = position[found[found >= 0]]
        report["planted"]["pixels"].append({"threshold": threshold, "seconds": time.perf_counter() - start,
                                            **score(duplicate_of, twin, kind)})
        print(json.dumps(report["planted"]["pixels"][-1]), file=sys.stderr)
    same = vectors[np.argsort(position)]
    report["planted"]["cosine_of_planted_pairs"] = {
        k: float(np.median([same[c] @ same[o] for c, o in twin.items() if kind[c] == k])) for k in KINDS}


def crowded(args, tmp: Path, cli: list[str], report: dict) -> int:
    emb = tmp / "cifar"
    report["cifar_embed_s"] = timed(cli + ["embed", f"{args.cifar}/{CIFAR_SHARDS}", str(emb), "--pretrained",
                                           args.checkpoint, "--no-progress"])
    vectors, _ = load_embeddings(emb)
    pairs = np.random.default_rng(0).integers(0, len(vectors), (20_000, 2))
    cosines = (vectors[pairs[:, 0]] * vectors[pairs[:, 1]]).sum(1)
    report["cifar"] = {"photos": len(vectors), "random_pair_cosine": {f"p{q}": float(np.quantile(cosines, q / 100))
                                                                      for q in (50, 90, 99, 99.9)}, "filter": []}
    for threshold in args.thresholds:
        out = tmp / f"cifar-{threshold}"
        seconds = timed(cli + ["filter", str(emb), str(out), "--dedup", str(threshold), "--no-progress"])
        info = json.loads((out / "filter_info.json").read_text())
        report["cifar"]["filter"].append({"threshold": threshold, "seconds": seconds,
                                          "dropped": info["near_duplicates"]})
        print(json.dumps(report["cifar"]["filter"][-1]), file=sys.stderr)
    return vectors.shape[1]


def planted_vectors(n: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    copies = rng.choice(n, n // 10, replace=False)
    x[copies] = x[rng.integers(0, n, len(copies))] + 0.1 * rng.standard_normal((len(copies), dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def indexed_candidates(vectors: np.ndarray, threshold: float, index, neighbours: int = 32,
                       block: int = 4096) -> np.ndarray:
    """``near_duplicates``' rule with each row's ``neighbours`` nearest rows from ``index`` as its only candidates (in
    collection order): one batched search per block, then a pass that keeps a row unless a kept neighbour reaches the
    threshold. The same as the exact rule unless a row has more such neighbours than it is given, none kept."""
    kept = np.zeros(len(vectors), dtype=bool)  # rows are kept as the pass reaches them: only earlier ones are
    duplicate_of = np.full(len(vectors), -1, dtype=np.int64)
    for start in range(0, len(vectors), block):
        scores, found = index.search(np.ascontiguousarray(vectors[start:start + block]), neighbours + 1)
        for row, row_scores, row_found in zip(range(start, start + block), scores, found):
            for value, other in zip(row_scores.tolist(), row_found.tolist()):  # best first (the row itself too)
                if value < threshold:
                    break
                if other >= 0 and kept[other]:
                    duplicate_of[row] = other
                    break
            kept[row] = duplicate_of[row] < 0
    return duplicate_of


def scale(dim: int, report: dict) -> None:
    report["exact"] = {}
    for n in (30_000, 100_000):
        x = planted_vectors(n, dim)
        start = time.perf_counter()
        found = near_duplicates(x, 0.95, np.arange(n))
        report["exact"][n] = {"seconds": time.perf_counter() - start, "dropped": int((found >= 0).sum())}
        print(json.dumps({"exact": n, **report["exact"][n]}), file=sys.stderr)


def compare_clustered(x: np.ndarray, threshold: float, exact: np.ndarray | None, exact_s: float | None) -> dict:
    """The clustered rule (3 probes, and SemDeDup's 1) on ``x`` in collection order, against the exact drops."""
    out = {"rows": len(x), "threshold": threshold, "clusters": max(1, round(len(x) ** 0.5))}
    if exact is not None:
        out.update(exact_s=round(exact_s, 2), exact_dropped=int((exact >= 0).sum()))
    for probes in (3, 1):
        start = time.perf_counter()
        found = clustered_near_duplicates(x, threshold, np.arange(len(x)), probes=probes)
        seconds = time.perf_counter() - start
        row = {"seconds": round(seconds, 2), "dropped": int((found >= 0).sum())}
        if exact is not None:
            row.update(missed=int(((exact >= 0) & (found < 0)).sum()), extra=int(((exact < 0) & (found >= 0)).sum()),
                       same_twin=float(np.mean(found[exact >= 0] == exact[exact >= 0])),
                       speedup=round(exact_s / seconds, 1))
        out[f"{probes} probes"] = row
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def clustered(cifar: np.ndarray, report: dict) -> None:
    report["clustered"] = []
    for threshold in (0.9, 0.95, 0.98):
        start = time.perf_counter()
        exact = near_duplicates(cifar, threshold, np.arange(len(cifar)))
        report["clustered"].append({"vectors": "cifar10 (model's)", **compare_clustered(
            cifar, threshold, exact, time.perf_counter() - start)})
    for n in (100_000, 300_000, 1_000_000):
        x = planted_vectors(n, cifar.shape[1])
        exact, exact_s = None, None
        if n <= 300_000:
            start = time.perf_counter()
            exact = near_duplicates(x, 0.95, np.arange(n))
            exact_s = time.perf_counter() - start
        report["clustered"].append({"vectors": "random, 10% planted", **compare_clustered(x, 0.95, exact, exact_s)})


def tried_index(sets: dict[str, np.ndarray], report: dict) -> None:
    report["tried_index"] = {}
    for name, x in sets.items():
        start = time.perf_counter()
        exact = near_duplicates(x, 0.95, np.arange(len(x)), block=2048, chunk=16_384)
        exact_s = time.perf_counter() - start
        start = time.perf_counter()  # the default blocks (512 rows): same drops, timed beside 2,048
        same = np.array_equal(near_duplicates(x, 0.95, np.arange(len(x)), block=512, chunk=65_536) >= 0, exact >= 0)
        block512_s = time.perf_counter() - start
        start = time.perf_counter()
        index, info = build_index(x, kind="ivfpq")
        built = time.perf_counter() - start
        start = time.perf_counter()
        found = indexed_candidates(x, 0.95, index)
        report["tried_index"][name] = {
            "rows": len(x), "exact_block2048_s": exact_s, "exact_block512_s": block512_s,
            "block512_same_drops": bool(same),
            "indexed_s": time.perf_counter() - start, "index_build_s": built,
            "nprobe": info["nprobe"], "nlist": info["nlist"], "index_recall@10": info["recall@10"],
            "same_decision_as_exact": float(np.mean((found >= 0) == (exact >= 0)))}
        print(json.dumps({name: report["tried_index"][name]}), file=sys.stderr)


def cifar_vectors(args, cli: list[str]) -> np.ndarray:
    """The model's vectors of CIFAR-10's 30,000 photos (``clipforge embed`` into a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        emb = Path(tmp) / "cifar"
        subprocess.run(cli + ["embed", f"{args.cifar}/{CIFAR_SHARDS}", str(emb), "--pretrained", args.checkpoint,
                              "--no-progress"], check=True, stdout=subprocess.DEVNULL)
        return load_embeddings(emb)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="the model (not needed with --scale-only)")
    p.add_argument("--flickr8k", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "test"))
    p.add_argument("--cifar", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    p.add_argument("--pixel-thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--scale-only", action="store_true", help="only the rule's cost on planted random vectors")
    p.add_argument("--tried-index", action="store_true", help="only the IVF-PQ candidates tried and not kept")
    p.add_argument("--clustered", action="store_true", help="only candidates from clusters against the exact rule")
    p.add_argument("--dim", type=int, default=128, help="with --scale-only: the vectors' width [128, the recipe's]")
    p.add_argument("--json")
    args = p.parse_args()
    if args.checkpoint is None and not args.scale_only:
        p.error("give the model's checkpoint (only --scale-only runs without one)")
    torch.set_num_threads(2)
    cli = [sys.executable, "-m", "clipforge.cli"]
    report = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads",
              "checkpoint": args.checkpoint}
    if args.scale_only:
        scale(args.dim, report)
    elif args.clustered:
        clustered(cifar_vectors(args, cli), report)
    elif args.tried_index:
        cifar = cifar_vectors(args, cli)
        tried_index({"cifar10 (model vectors)": cifar, "random, planted": planted_vectors(100_000, cifar.shape[1])},
                    report)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            planted_copies(args, Path(tmp), cli, report)
            dim = crowded(args, Path(tmp), cli, report)
        scale(dim, report)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
