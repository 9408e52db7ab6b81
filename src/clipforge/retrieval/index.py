"""FAISS indexes over unit vectors (inner product = cosine): exact when small, approximate when large.

Chosen by collection size: exact ``IndexFlatIP`` up to ``exact_below`` vectors; beyond, IVF with 4-bit fast-scan
product quantisation and an exact re-rank of the shortlist (``IVF{nlist},PQ{d/2}x4fs,RFlat``), its ``nprobe`` and
re-rank depth raised until recall@10 against exact search on tuning queries reaches ``target_recall``; HNSW
(``HNSW32``) on request. Saved as ``index.faiss`` + ``index.json`` beside the embeddings.

The tuning queries should look like the real ones: pass ``queries`` (e.g. text embeddings); without them the
builder uses perturbed collection vectors, which suit clustered data (real CLIP embeddings) but flatter the
index on structureless data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..files import atomic_path, write_json


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("search needs FAISS: pip install 'clipforge[search]'") from None
    return faiss


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact top-k found in the approximate top-k."""
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx_ids.tolist(), exact_ids.tolist()))
    return hits / exact_ids.size


def build_index(vectors: np.ndarray, kind: str = "auto", target_recall: float = 0.95, exact_below: int = 50_000,
                n_queries: int = 500, seed: int = 0, queries: np.ndarray | None = None, log=None):
    """Return ``(index, info)``; ``info`` records the choice, its parameters and the measured recall@10.

    ``queries``: vectors to tune the search knobs on (up to ``n_queries`` are used); default perturbed collection
    vectors. ``log``: called with a line per stage (k-means and adding take minutes at a million vectors).
    """
    faiss = _faiss()
    log = log or (lambda message: None)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n == 0:
        raise ValueError("cannot index an empty collection")
    if queries is not None:  # checked before an expensive build, not after
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != d or len(queries) == 0:
            raise ValueError(f"tuning queries must be a non-empty [N, {d}] array, got shape {queries.shape}")
    if kind == "auto":
        kind = "flat" if n < exact_below else "ivfpq"
    info = {"kind": kind, "count": n, "dim": d}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        info["recall@10"] = 1.0
        return index, info
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        log(f"building the HNSW graph over {n:,} vectors")
        index.add(vectors)
        knobs = [16, 32, 64, 128, 256, 512, 1024, 2048]
        setter = lambda value: setattr(index.hnsw, "efSearch", value)
        info["param"] = "efSearch"
    elif kind == "ivfpq":
        # FAISS wants >= 39 training points per list; 2048 lists keep k-means affordable on a CPU at 1M+
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39, 2048))
        # 4-bit fast-scan codes of two dimensions each: scanned with SIMD lookups ~10x faster than float vectors,
        # fine enough that an exact re-rank of a short list recovers the true top-k
        m = d // 2 if d % 2 == 0 else d
        index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        log(f"training {nlist} IVF lists and the PQ codebooks on {min(n, 64 * nlist):,} vectors")
        index.train(vectors[rng.choice(n, size=min(n, 64 * nlist), replace=False)])
        log(f"adding {n:,} vectors")
        index.add(vectors)
        ivf = faiss.extract_index_ivf(index)
        # (nprobe, k_factor) from cheap to expensive: more lists first, then (all lists) a deeper exact re-rank.
        # At nprobe == nlist every code is scanned, so the last steps reach any target on any data.
        probes = sorted({min(p, nlist) for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)})
        knobs = [(p, 16) for p in probes] + [(nlist, f) for f in (64, 256)]

        def setter(value):
            ivf.nprobe, index.k_factor = value
        info.update(param="nprobe,k_factor", nlist=nlist, pq_m=m, pq_bits=4)
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose auto, flat, ivfpq or hnsw")
    # tune the search knob on queries against exact search
    rng = np.random.default_rng(seed + 1)
    if queries is None:
        queries = vectors[rng.choice(n, size=min(n_queries, n), replace=False)]
        queries = queries + 0.1 * rng.standard_normal(queries.shape).astype(np.float32)
        info["tuned_on"] = "perturbed collection vectors"
    else:
        queries = queries[rng.permutation(len(queries))[:n_queries]]
        info["tuned_on"] = f"{len(queries)} given queries"
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(d)
    exact.add(vectors)
    k = min(10, n)
    _, truth = exact.search(queries, k)
    for value in knobs:
        setter(value)
        _, found = index.search(queries, k)
        recall = recall_at_k(found, truth)
        if kind == "ivfpq":
            info.update(nprobe=value[0], k_factor=value[1], **{"recall@10": recall})
        else:
            info.update({info["param"]: value, "recall@10": recall})
        log(f"tuning {info['param']} = {value}: recall@10 {recall:.3f} (target {target_recall})")
        if recall >= target_recall:
            break
    info["target_recall"], info["target_met"] = target_recall, info["recall@10"] >= target_recall
    return index, info


def save_index(index, info: dict, folder: str | Path) -> Path:
    faiss = _faiss()
    folder = Path(folder)
    with atomic_path(folder / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    write_json(folder / "index.json", info)
    return folder / "index.faiss"


def load_index(folder: str | Path):
    faiss = _faiss()
    folder = Path(folder)
    if not (folder / "index.faiss").exists():
        raise FileNotFoundError(f"{folder}: no index.faiss; run `clipforge index build {folder}`")
    index = faiss.read_index(str(folder / "index.faiss"))
    info = json.loads((folder / "index.json").read_text())
    if "nprobe" in info:
        faiss.extract_index_ivf(index).nprobe = info["nprobe"]
        if "k_factor" in info:
            faiss.downcast_index(index).k_factor = info["k_factor"]
    if "efSearch" in info:
        faiss.downcast_index(index).hnsw.efSearch = info["efSearch"]
    return index, info
