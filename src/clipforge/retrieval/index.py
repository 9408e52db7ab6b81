"""FAISS indexes over unit vectors (inner product = cosine): exact when small, approximate when large.

Chosen by collection size: exact ``IndexFlatIP`` up to ``exact_below`` vectors; IVF with product quantisation
(``IVF{nlist},PQ{m}``) beyond, with ``nprobe`` raised until recall@10 against exact search on held-out queries
reaches ``target_recall``; HNSW (``HNSW32``) on request. Saved as ``index.faiss`` + ``index.json`` beside the
embeddings.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_path, write_json


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
                n_queries: int = 500, seed: int = 0):
    """Return ``(index, info)``; ``info`` records the choice, its parameters and the measured recall@10."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n == 0:
        raise ValueError("cannot index an empty collection")
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
        index.add(vectors)
        knobs = [16, 32, 64, 128, 256, 512]
        setter = lambda value: setattr(index.hnsw, "efSearch", value)
        info["param"] = "efSearch"
    elif kind == "ivfpq":
        # FAISS wants >= 39 training points per list; 2048 lists keep k-means affordable on a CPU at 1M+
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39, 2048))
        m = next(m for m in (d // 4, d // 8, d // 2, d, 8, 4, 2, 1) if m and d % m == 0 and m <= 64)
        quantizer = faiss.IndexFlatIP(d)
        ivfpq = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        ivfpq.train(vectors[rng.choice(n, size=min(n, 64 * nlist), replace=False)])
        # PQ codes are coarse: the shortlist (k x k_factor) is re-ranked with exact inner products.
        index = faiss.IndexRefineFlat(ivfpq)
        index.add(vectors)
        index.k_factor = 8
        # (nprobe, k_factor) pairs from cheap to expensive: more lists first, then a longer exact re-rank
        knobs = [(p, 8) for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= nlist] + \
                [(min(128, nlist), f) for f in (16, 32, 64, 128)] + [(min(256, nlist), 128)]

        def setter(value):
            faiss.downcast_index(index.base_index).nprobe, index.k_factor = value
        info.update(param="nprobe,k_factor", nlist=nlist, pq_m=m)
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose auto, flat, ivfpq or hnsw")
    # tune the search knob on held-out queries (perturbed collection vectors) against exact search
    rng = np.random.default_rng(seed + 1)
    queries = vectors[rng.choice(n, size=min(n_queries, n), replace=False)]
    queries = queries + 0.1 * rng.standard_normal(queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
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
        faiss.downcast_index(index.base_index if hasattr(index, "base_index") else index).nprobe = info["nprobe"]
        if "k_factor" in info:
            index.k_factor = info["k_factor"]
    if "efSearch" in info:
        faiss.downcast_index(index).hnsw.efSearch = info["efSearch"]
    return index, info
