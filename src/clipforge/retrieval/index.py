"""FAISS indexes over unit vectors (inner product = cosine): exact when small, approximate when large.

Chosen by collection size: exact ``IndexFlatIP`` up to ``exact_below`` vectors; beyond, IVF with product-quantised
codes (``IVF{nlist},PQ{m}``, 8-bit codes, ``d / 4`` bytes a vector by default), whose shortlist is re-ranked exactly
against the collection's own stored embeddings (read from disk by id, see ``StoredVectors``): the index holds codes
only, no float copy. It is built within a memory budget whatever the collection's size: the coarse quantizer and PQ
are trained on a sample (64 vectors per list, as FAISS recommends 39-256), then vectors are added in chunks read from
the fp16 shards; ``plan_ivfpq`` sizes the sample, the chunks and the code size to fit ``max_memory``. ``nprobe``
and the re-rank depth are raised until recall@10 against exact search (computed in chunks, never all in RAM) on
tuning queries reaches ``target_recall``. HNSW (``HNSW32``, vectors in RAM) on request. Saved as ``index.faiss`` +
``index.json`` beside the embeddings; plain IVF-PQ files memory-map for serving (``faiss.IO_FLAG_MMAP``). A
collection embedded with ``--captions`` gets a second index, of its captions (``caption_index.*``: modality "text",
as clip-retrieval names it), over the captioned images only (``RowSubset``; ``caption_index.rows.npy`` maps its
positions to the collection's row ids).

The tuning queries should look like the real ones: pass ``queries`` (e.g. text embeddings); without them the
builder uses perturbed collection vectors, which suit clustered data (real CLIP embeddings) but flatter the
index on structureless data.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

from ..files import atomic_path, write_json

GB = 1 << 30
MIN_CHUNK = 4096
INDEX_STEMS = {"image": "index", "text": "caption_index"}  # each modality's files in the collection folder


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("search needs FAISS: pip install 'clipforge[search]'") from None
    return faiss


def parse_size(text: str | int | None) -> int | None:
    """Bytes in ``"2GB"``, ``"512MB"``, ``"1.5G"``, or a plain number of bytes; None passes through."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not match:
        raise ValueError(f"{text!r}: expected a size such as 2GB, 512MB or 1.5G")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


def resident_bytes() -> int:
    """This process's resident memory now (Linux), else 0: what a budget has already spent."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


class ArrayVectors:
    """An in-memory [n, d] array with ``StoredVectors``' reading interface (``get``, ``chunks``)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be [n, d], got shape {self.vectors.shape}")
        self.shape, self.dim = self.vectors.shape, self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.vectors)

    def get(self, ids) -> np.ndarray:
        return self.vectors[np.asarray(ids, dtype=np.int64)]

    def chunks(self, rows: int, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else stop
        for first in range(start, stop, rows):
            yield first, self.vectors[first:min(first + rows, stop)]


class RowSubset:
    """Rows ``rows`` (ascending ids) of a vector store renumbered 0..len(rows) - 1, with the same reading interface:
    the caption index holds the captioned images only."""

    def __init__(self, vectors, rows):
        self.vectors, self.rows = vectors, np.asarray(rows, dtype=np.int64)
        self.dim = vectors.dim
        self.shape = (len(self.rows), self.dim)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, ids) -> np.ndarray:
        return self.vectors.get(self.rows[np.asarray(ids, dtype=np.int64)])

    def slice(self, first: int, last: int) -> np.ndarray:
        rows = self.rows[first:last]
        if not len(rows):
            return np.empty((0, self.dim), dtype=np.float32)
        span = int(rows[-1] - rows[0]) + 1
        if span > 4 * len(rows):  # sparse: one read per row rather than a long stretch mostly thrown away
            return self.vectors.get(rows)
        block = self.vectors.slice(int(rows[0]), int(rows[-1]) + 1)
        return block[rows - rows[0]]

    def chunks(self, rows: int, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else stop
        for first in range(start, stop, rows):
            yield first, self.slice(first, min(first + rows, stop))


def modality_vectors(folder: str | Path, modality: str = "image", rows: np.ndarray | None = None):
    """``(vectors, rows)``: what an index of ``modality`` holds, and the collection row of each of its positions
    (None for the images: position i is row i). The captions' rows are those with a caption unless given (the ones
    an index was built over, ``load_rows``)."""
    from .collection import StoredVectors, captioned_rows

    stored = StoredVectors(folder, modality)
    if modality == "image":
        return stored, None
    rows = captioned_rows(stored) if rows is None else rows
    return RowSubset(stored, rows), rows


def index_path(folder: str | Path, modality: str = "image", suffix: str = ".faiss") -> Path:
    return Path(folder) / f"{INDEX_STEMS[modality]}{suffix}"


def load_rows(folder: str | Path, modality: str) -> np.ndarray | None:
    """The collection rows of a saved index's positions (None for the image index: the identity)."""
    return None if modality == "image" else np.load(index_path(folder, modality, ".rows.npy"))


def as_vectors(vectors):
    """``vectors`` with the reading interface (``get``, ``chunks``, ``shape``): arrays are wrapped, stores pass."""
    return ArrayVectors(vectors) if isinstance(vectors, np.ndarray) else vectors


class Reranked:
    """An IVF-PQ index whose top ``k * k_factor`` candidates are re-scored exactly against the stored vectors:
    FAISS's ``IndexRefineFlat`` without its in-RAM float copy. ``search`` and ``ntotal`` as a FAISS index."""

    def __init__(self, index, vectors, k_factor: int = 16):
        self.index, self.vectors, self.k_factor = index, vectors, k_factor
        self.ivf = _faiss().extract_index_ivf(index)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = max(k, min(self.ntotal, k * self.k_factor))
        _, candidates = self.index.search(queries, depth)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = found[found >= 0]
            if not len(found):
                continue
            exact = self.vectors.get(found) @ query
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row, :len(best)], ids[row, :len(best)] = exact[best], found[best]
        return scores, ids


def exact_top_k(vectors, queries: np.ndarray, k: int, chunk_rows: int = 262_144):
    """Exact inner-product top-k of ``queries`` over ``vectors`` (array or ``StoredVectors``), chunk by chunk."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    faiss = _faiss()
    chunks = (chunk for _, chunk in as_vectors(vectors).chunks(chunk_rows))
    return knn_ground_truth(np.ascontiguousarray(queries, dtype=np.float32), chunks, k,
                            metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)


def default_nlist(n: int) -> int:
    # FAISS wants >= 39 training points per list; 2048 lists keep k-means affordable on a CPU at 10M+
    return max(1, min(int(4 * math.sqrt(n)), n // 39, 2048))


def plan_ivfpq(n: int, d: int, max_memory: int | None = None, n_queries: int = 500, in_use: int | None = None,
               nlist: int | None = None) -> dict:
    """The IVF-PQ build's parameters and its estimated peak memory: the largest chunks and codes that fit.

    ``max_memory`` (bytes) is the whole process's budget; ``in_use`` (default: this process's RSS now) is spent
    already. Peak = what is in use + the larger of training (the sample, with k-means' working copies) and adding
    (the codes, twice for list growth, plus one chunk and its assignment buffers) or tuning (codes plus exact-search
    scores for one chunk). Raises when even the smallest settings do not fit, saying what would."""
    in_use = resident_bytes() if in_use is None else in_use
    nlist = nlist or default_nlist(n)
    train_rows = min(n, max(64 * nlist, 100 * 256))  # PQ's 256 centroids per sub-vector want ~100 points each
    code_sizes = [m for m in (d // 4, d // 8, d // 16) if m >= 1 and d % m == 0]
    # a chunk as float32 stays under 64 MiB whatever the budget: larger ones add memory, not speed
    chunk_options = [c for c in (262_144, 131_072, 65_536, 32_768, 16_384, 8_192) if c * d * 4 <= 64 * 2**20]
    chunk_options.append(MIN_CHUNK)

    def estimate(m: int, chunk: int, train: int) -> int:
        codes = 2 * n * (m + 8)
        training = 3 * train * d * 4 + nlist * d * 4
        adding = codes + chunk * (3 * d * 4 + 16)
        tuning = codes + chunk * (d * 4 + n_queries * 4) + n_queries * 1024 * 4
        return in_use + max(training, adding, tuning)

    smallest = None
    for m in code_sizes:
        for train in (train_rows, min(n, 39 * nlist)):
            for chunk in chunk_options:
                need = estimate(m, min(chunk, max(n, 1)), train)
                smallest = need if smallest is None else min(smallest, need)
                if max_memory is None or need <= max_memory:
                    # 256 centroids per sub-vector want >= 39 points each; a tiny collection gets fewer bits
                    bits = int(min(8, max(1, math.floor(math.log2(max(train, 2) / 39)))))
                    return {"nlist": nlist, "pq_m": m, "pq_bits": bits, "train_rows": train,
                            "chunk_rows": min(chunk, max(n, 1)), "estimated_peak_bytes": need,
                            "max_memory": max_memory}
    raise MemoryError(f"an IVF-PQ index of {n:,} x {d} vectors needs at least {smallest / GB:.2f} GB here "
                      f"({in_use / GB:.2f} GB already in use); --max-memory is {max_memory / GB:.2f} GB")


def train_ivfpq(vectors, plan: dict, seed: int = 0, log=None):
    """An empty IVF-PQ index with its quantizer and codebooks trained on a sample of ``vectors``."""
    faiss = _faiss()
    log = log or (lambda message: None)
    n, d = vectors.shape
    index = faiss.index_factory(d, f"IVF{plan['nlist']},PQ{plan['pq_m']}x{plan['pq_bits']}",
                                faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    # the exact re-rank forgives coarse codes: skip polysemous training (40 of 50 s at 700k x 64 here) and cap the
    # codebooks' k-means at 10 iterations on <= 64 points a centroid (FAISS's defaults: 25 on 256)
    ivf.do_polysemous_training = False
    ivf.pq.cp.niter, ivf.pq.cp.max_points_per_centroid = 10, 64
    sample = np.sort(np.random.default_rng(seed).choice(n, size=plan["train_rows"], replace=False))
    log(f"training {plan['nlist']} IVF lists and the PQ codebooks ({plan['pq_m']} x {plan['pq_bits']}-bit codes) on "
        f"{len(sample):,} sampled vectors")
    index.train(vectors.get(sample))
    return index


def add_chunks(index, vectors, chunk_rows: int, start: int = 0, stop: int | None = None, log=None) -> None:
    """Add ids ``start..stop`` of ``vectors`` to a trained index, ``chunk_rows`` at a time (ids = row numbers)."""
    stop = len(vectors) if stop is None else stop
    log = log or (lambda message: None)
    for first, chunk in vectors.chunks(chunk_rows, start, stop):
        index.add_with_ids(chunk, np.arange(first, first + len(chunk), dtype=np.int64))
        log(f"added {first + len(chunk) - start:,} / {stop - start:,} vectors")


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact top-k found in the approximate top-k."""
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx_ids.tolist(), exact_ids.tolist()))
    return hits / exact_ids.size


def chosen_kind(kind: str, count: int, exact_below: int) -> str:
    """The kind of index ``build_index`` makes of ``count`` vectors: ``kind``, or for "auto" exact search below
    ``exact_below`` vectors and IVF-PQ from there."""
    return kind if kind != "auto" else ("flat" if count < exact_below else "ivfpq")


def build_index(vectors, kind: str = "auto", target_recall: float = 0.95, exact_below: int = 50_000,
                n_queries: int = 500, seed: int = 0, queries: np.ndarray | None = None, log=None,
                max_memory: int | str | None = None, nlist: int | None = None):
    """Return ``(index, info)``; ``info`` records the choice, its parameters and the measured recall@10.

    ``vectors``: an [n, d] array of unit vectors, or ``StoredVectors`` (a collection read from disk in chunks).
    ``queries``: vectors to tune the search knobs on (up to ``n_queries`` are used); default perturbed collection
    vectors. ``log``: called with a line per stage (k-means and adding take minutes at millions of vectors).
    ``max_memory``: the process's memory budget (bytes or "2GB"): the IVF-PQ build's chunks and code size are
    chosen to fit it (``plan_ivfpq``); flat and HNSW indexes hold every vector and refuse a budget they exceed.
    ``nlist``: IVF lists (default ``default_nlist(n)``).
    """
    faiss = _faiss()
    log = log or (lambda message: None)
    vectors = as_vectors(vectors)
    n, d = vectors.shape
    if n == 0:
        raise ValueError("cannot index an empty collection")
    if queries is not None:  # checked before an expensive build, not after
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != d or len(queries) == 0:
            raise ValueError(f"tuning queries must be a non-empty [N, {d}] array, got shape {queries.shape}")
    max_memory = parse_size(max_memory)
    kind = chosen_kind(kind, n, exact_below)
    info = {"kind": kind, "count": n, "dim": d}
    if kind in ("flat", "hnsw"):
        need = resident_bytes() + n * d * 4 * (2 if kind == "hnsw" else 1) + (n * 32 * 8 if kind == "hnsw" else 0)
        if max_memory is not None and need > max_memory:
            raise MemoryError(f"a {kind} index of {n:,} x {d} vectors holds them all in RAM (~{need / GB:.2f} GB), "
                              f"over --max-memory {max_memory / GB:.2f} GB; use --kind ivfpq")
        in_ram = vectors.vectors if isinstance(vectors, ArrayVectors) else vectors.slice(0, n)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(in_ram)
        info["recall@10"] = 1.0
        return index, info
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        log(f"building the HNSW graph over {n:,} vectors")
        index.add(in_ram)
        del in_ram
        info["param"] = "efSearch"
    elif kind == "ivfpq":
        plan = plan_ivfpq(n, d, max_memory, n_queries, nlist=nlist)
        log(f"plan: {plan['nlist']} lists, {plan['pq_m']} x {plan['pq_bits']}-bit codes, "
            f"{plan['train_rows']:,} training vectors, chunks of {plan['chunk_rows']:,}; estimated peak {plan['estimated_peak_bytes'] / GB:.2f} GB"
            + (f" (budget {max_memory / GB:.2f} GB)" if max_memory else ""))
        trained = train_ivfpq(vectors, plan, seed, log)
        add_chunks(trained, vectors, plan["chunk_rows"], log=log)
        index = Reranked(trained, vectors)
        info.update(_ivfpq_info(plan))
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose auto, flat, ivfpq or hnsw")
    return index, tune_index(index, vectors, info, target_recall, queries, n_queries, seed, log)


def _ivfpq_info(plan: dict) -> dict:
    """What index.json records of an IVF-PQ build (``load_index`` reads ``rerank`` and the tuned knobs)."""
    return {"param": "nprobe,k_factor", "nlist": plan["nlist"], "pq_m": plan["pq_m"], "pq_bits": plan["pq_bits"],
            "rerank": "stored", "plan": plan}


def _knobs(index, info: dict):
    """``(first value, following, setter)`` of the index's search knob: ``following(value, previous, gain)`` is the
    next value to try, cheaper first (None: none left), given the one before ``value`` and the recall it gained."""
    if info["kind"] == "hnsw":
        ladder = [16, 32, 64, 128, 256, 512, 1024, 2048]
        return ladder[0], lambda value, previous, gain: next((v for v in ladder if v > value), None), \
            lambda value: setattr(index.hnsw, "efSearch", value)
    nlist = info["nlist"]
    probes = sorted({min(p, nlist) for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)} | {nlist})

    def following(value, previous, gain):
        # more lists first; a deeper exact re-rank where all are scanned (so the last steps reach any target on any
        # data) or where more lists stopped helping: the codes rank the true neighbours below the shortlist (coarse
        # codes, such as an adopted autofaiss index's OPQ64_256 ... PQ64 of 512-d vectors)
        probe, factor = value
        stalled = previous is not None and probe > previous[0] and gain < 0.005
        if (stalled or probe == nlist) and factor < 256:
            return probe, factor * 4
        return next(((p, factor) for p in probes if p > probe), None)

    def setter(value):
        index.ivf.nprobe, index.k_factor = value
    return (probes[0], 16), following, setter


def _tuning_set(vectors, info: dict, queries: np.ndarray | None, n_queries: int, seed: int, log,
                chunk_rows: int | None = None):
    """``(queries, their exact top-k ids, k)`` that recall is measured on; ``info`` records what the queries were."""
    n = len(vectors)
    rng = np.random.default_rng(seed + 1)
    if queries is None:
        queries = vectors.get(np.sort(rng.choice(n, size=min(n_queries, n), replace=False)))
        queries = queries + 0.1 * rng.standard_normal(queries.shape).astype(np.float32)
        info["tuned_on"] = "perturbed collection vectors"
    else:
        queries = queries[rng.permutation(len(queries))[:n_queries]]
        info["tuned_on"] = f"{len(queries)} given queries"
    queries = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)
    k = min(10, n)
    log(f"exact top-{k} of {len(queries)} tuning queries")
    chunk_rows = chunk_rows or info.get("plan", {}).get("chunk_rows", 262_144)
    _, truth = exact_top_k(vectors, queries, k, chunk_rows)
    return queries, truth, k


def tune_index(index, vectors, info: dict, target_recall: float = 0.95, queries: np.ndarray | None = None,
               n_queries: int = 500, seed: int = 0, log=None, chunk_rows: int | None = None) -> dict:
    """Raise the search knob until recall@10 against exact search (chunked) reaches ``target_recall``."""
    log = log or (lambda message: None)
    queries, truth, k = _tuning_set(vectors, info, queries, n_queries, seed, log, chunk_rows)
    value, following, setter = _knobs(index, info)
    previous, last_recall = None, 0.0
    while value is not None:
        setter(value)
        _, found = index.search(queries, k)
        recall = recall_at_k(found, truth)
        if info["param"] == "nprobe,k_factor":
            info.update(nprobe=value[0], k_factor=value[1], **{"recall@10": recall})
        else:
            info.update({info["param"]: value, "recall@10": recall})
        log(f"tuning {info['param']} = {value}: recall@10 {recall:.3f} (target {target_recall})")
        if recall >= target_recall:
            break
        previous, value, last_recall = value, following(value, previous, recall - last_recall), recall
    info["target_recall"], info["target_met"] = target_recall, info["recall@10"] >= target_recall
    return info


def save_index(index, info: dict, folder: str | Path, modality: str = "image",
               rows: np.ndarray | None = None, index_file: str | Path | None = None) -> Path:
    """Write ``index.faiss`` + ``index.json`` (``modality`` "text": ``caption_index.*``, with ``rows``, the
    collection row of each position), each atomically; the rows first, so that an index file never lacks them.
    ``index_file``: the index as a file already (an adopted one, read memory-mapped, which FAISS cannot write back),
    copied as it is: not linked, since the tool that wrote it rewrites that file in place when run again."""
    faiss = _faiss()
    if (rows is None) != (modality == "image"):
        raise ValueError("the caption index is saved with its rows, the image index without")
    if rows is not None:
        with atomic_path(index_path(folder, modality, ".rows.npy")) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, np.asarray(rows, dtype=np.int64))
    with atomic_path(index_path(folder, modality)) as tmp:
        if index_file is None:
            faiss.write_index(index.index if isinstance(index, Reranked) else index, str(tmp))
        else:
            shutil.copyfile(index_file, tmp)
    write_json(index_path(folder, modality, ".json"), info)
    return index_path(folder, modality)


def load_index(folder: str | Path, mmap: bool = False, vectors=None, modality: str = "image"):
    """``(index, info)`` of a folder's saved index. ``mmap``: leave IVF-PQ codes on disk, paged in as searched
    (``faiss.IO_FLAG_MMAP``); ``vectors``: the re-rank store (default what ``modality_vectors`` gives, over the
    rows the index was built on)."""
    faiss = _faiss()
    folder = Path(folder)
    path = index_path(folder, modality)
    if not path.exists():
        how = "" if modality == "image" else " (it indexes the captions of a collection embedded with --captions)"
        raise FileNotFoundError(f"{folder}: no {path.name}; run `clipforge index build {folder}`{how}")
    info = json.loads(index_path(folder, modality, ".json").read_text())
    reranked = info.get("rerank") == "stored"
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap and reranked else 0)
    if reranked:
        if vectors is None:
            vectors, _ = modality_vectors(folder, modality, load_rows(folder, modality))
        index = Reranked(index, as_vectors(vectors), info.get("k_factor", 16))
        index.ivf.nprobe = info["nprobe"]
        return index, info
    if "nprobe" in info:  # an index built before the re-rank moved out of it (IVF-PQ fast-scan + RFlat)
        faiss.extract_index_ivf(index).nprobe = info["nprobe"]
        if "k_factor" in info:
            faiss.downcast_index(index).k_factor = info["k_factor"]
    if "efSearch" in info:
        faiss.downcast_index(index).hnsw.efSearch = info["efSearch"]
    return index, info


def adopt_index(path: str | Path, vectors, target_recall: float = 0.95, queries: np.ndarray | None = None,
                n_queries: int = 500, seed: int = 0, log=None):
    """``(index, info)`` of a FAISS index built elsewhere over ``vectors`` with ids in row order (autofaiss's, as
    ``clip-retrieval index`` writes it), read, checked and tuned as ``build_index`` leaves its own: flat, HNSW, or IVF
    with any codes (OPQ and an HNSW quantizer included), whose shortlist is then re-ranked exactly against the stored
    vectors as clipforge's IVF-PQ is (the codes memory-mapped, never all in RAM). Refused, naming the problem, where
    its dimension, size or metric differ, or where rows do not find themselves: its ids are not these rows."""
    faiss = _faiss()
    log = log or (lambda message: None)
    vectors = as_vectors(vectors)
    n, d = vectors.shape
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    if index.d != d or index.ntotal != n:
        raise ValueError(f"{path} indexes {index.ntotal:,} vectors of dimension {index.d} and the collection holds "
                         f"{n:,} of dimension {d}: it was built from other embeddings")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{path} ranks by L2 distance and clipforge by inner product; run clipforge index build")
    base = faiss.downcast_index(index)  # its class, for the checks only: ``index`` owns it
    info = {"count": n, "dim": d, "adopted": {"file": Path(path).name, "faiss_class": type(base).__name__}}
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # no inverted lists in it
        ivf = None
    if ivf is not None:
        info.update(kind="ivfpq" if isinstance(ivf, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)) else "ivf",
                    param="nprobe,k_factor", nlist=ivf.nlist, rerank="stored", plan={"chunk_rows": 65_536})
        index = Reranked(index, vectors)
    elif isinstance(base, faiss.IndexHNSW):
        info.update(kind="hnsw", param="efSearch")
    elif isinstance(base, faiss.IndexFlat):
        info["kind"] = "flat"
    else:
        raise ValueError(f"{path}: FAISS's {type(base).__name__}, and clipforge adopts flat, HNSW and IVF indexes; "
                         "run clipforge index build")
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(100, n), replace=False))
    _, found = index.search(np.ascontiguousarray(vectors.get(rows), dtype=np.float32), min(10, n))
    themselves = float(np.mean([row in hits for row, hits in zip(rows, found)]))
    log(f"{path}: {type(base).__name__}, adopted as {info['kind']}; {themselves:.0%} of {len(rows)} sampled rows "
        "find themselves")
    if themselves < 0.5:
        raise ValueError(f"{path}: only {themselves:.0%} of {len(rows)} sampled rows find themselves among their 10 "
                         "nearest: its ids are not this collection's rows (built from other embeddings, or from the "
                         "partitions in another order)")
    if info["kind"] == "flat":
        queries, truth, k = _tuning_set(vectors, info, queries, n_queries, seed, log)
        info.update({"recall@10": recall_at_k(index.search(queries, k)[1], truth), "target_recall": target_recall})
        info["target_met"] = info["recall@10"] >= target_recall
        return index, info
    return index, tune_index(index, vectors, info, target_recall, queries, n_queries, seed, log)


def rows_record(folder: str | Path, digest) -> dict:
    """Which collection rows an index is built over, for its info: how many, and their paths' digest (what
    ``extendable`` checks before adding the rows embedded since). ``digest(rows)``: ``stored_paths_digest`` of the
    folder, shared with ``extendable`` so that one run reads each digest once. Read before a build, while little is
    resident."""
    from .collection import StoredVectors

    rows = len(StoredVectors(folder))
    return {"collection_rows": rows, "collection_sha256": digest(rows)}


def extendable(folder: str | Path, modality: str, kind: str, exact_below: int, nlist: int | None, digest):
    """``(info, vectors, rows)``: the saved index's info, and what it holds with the rows embedded since (as
    ``modality_vectors`` gives them), where it can take those instead of a rebuild: its collection rows are still the
    first ones (``digest(rows)`` of their paths agrees), more have come, and a rebuild would choose the same kind (at
    most twice the rows an IVF-PQ or HNSW index was built over: beyond that its lists or graph were shaped for another
    collection). None otherwise."""
    saved = _saved_info(folder, modality, digest)
    if saved is None:
        return None
    info, rows_now = saved
    if rows_now <= info["collection_rows"] or nlist not in (None, info.get("nlist")):
        return None
    vectors, rows = _added_rows(folder, modality, info)
    if chosen_kind(kind, len(vectors), exact_below) != info["kind"] or \
            (info["kind"] != "flat" and len(vectors) > 2 * info["count"]):
        return None
    return info, vectors, rows


def up_to_date(folder: str | Path, modality: str, kind: str, exact_below: int, nlist: int | None,
               target_recall: float, digest, tune_queries: str = "auto") -> dict | None:
    """The saved index's info where building again would make the same index: it holds every row embedded (their
    paths' ``digest`` agreeing with its record), is of the kind asked (auto: the one its size chooses) and was tuned
    to the same target with the same lists on the same queries (``tune_queries``: as the CLI records them; an index
    from before they were recorded was tuned on "auto"). None otherwise."""
    saved = _saved_info(folder, modality, digest)
    if saved is None:
        return None
    info, rows_now = saved
    if rows_now != info["collection_rows"] or chosen_kind(kind, info["count"], exact_below) != info["kind"] or \
            info.get("target_recall", target_recall) != target_recall or nlist not in (None, info.get("nlist")) or \
            info.get("tune_queries", "auto") != tune_queries:
        return None
    return info


def _saved_info(folder: str | Path, modality: str, digest) -> tuple[dict, int] | None:
    """``(info, the collection's rows now)`` of the saved index of ``modality`` where the collection rows it was
    built over are still the collection's first (as many or more now, ``digest`` of their paths agreeing with its
    record); None where there is no such index or record, or those rows changed."""
    from .collection import StoredVectors

    path = index_path(folder, modality, ".json")
    if not path.exists() or not index_path(folder, modality).exists():
        return None
    info = json.loads(path.read_text())
    built_over, rows_now = info.get("collection_rows"), len(StoredVectors(folder))
    if built_over is None or rows_now < built_over or digest(built_over) != info.get("collection_sha256"):
        return None
    return info, rows_now


def _added_rows(folder: str | Path, modality: str, info: dict):
    """``(vectors, rows)`` as ``modality_vectors`` gives them, the rows indexed before first and the ones embedded
    since after them; only the new part of a caption store is read to find its captioned rows."""
    if modality == "image":
        return modality_vectors(folder, modality)
    from .collection import StoredVectors, captioned_rows

    stored = StoredVectors(folder, modality)
    rows = np.concatenate([load_rows(folder, modality), captioned_rows(stored, start=info["collection_rows"])])
    return RowSubset(stored, rows), rows


def extend_index(folder: str | Path, modality: str, info: dict, vectors, rows, target_recall: float = 0.95,
                 queries: np.ndarray | None = None, log=None):
    """``(index, info, rows)``: the saved index of ``modality`` with the vectors of the rows embedded since it was
    built added (``info``, ``vectors`` and ``rows`` as ``extendable`` found them), tuned again to ``target_recall``."""
    log = log or (lambda message: None)
    index, _ = load_index(folder, mmap=False, vectors=vectors, modality=modality)
    start, stop = index.ntotal, len(vectors)
    log(f"adding the {stop - start:,} vectors embedded since the {info['kind']} index was built over {start:,}")
    if isinstance(index, Reranked):
        add_chunks(index.index, vectors, info["plan"]["chunk_rows"], start, stop, log)
    elif stop > start:
        index.add(vectors.slice(start, stop))
    info = {**info, "count": stop, "extended_from": start}
    if info["kind"] != "flat":
        info = tune_index(index, vectors, info, target_recall, queries, log=log)
    return index, info, rows


def build_index_distributed(vectors, folder: str | Path, rank: int, world: int, barrier, target_recall: float = 0.95,
                            n_queries: int = 500, seed: int = 0, queries: np.ndarray | None = None, log=None,
                            max_memory: int | str | None = None, nlist: int | None = None):
    """The IVF-PQ build split across ``world`` processes (torchrun; several machines when ``folder`` is on a shared
    file system): rank 0 trains the quantizer and codebooks once; every rank adds its contiguous share of the ids to
    a copy and writes it as a part; rank 0 merges the parts in rank order (the codes alone, no vectors) and tunes.
    The lists then hold the same codes in the same order as a one-process build from the same trained index, so the
    results are identical. ``barrier()`` waits for every rank. Returns ``(index, info)`` on rank 0, else (None, None).
    """
    from ..files import read_json

    faiss = _faiss()
    log = log or (lambda message: None)
    folder = Path(folder)
    n, d = vectors.shape
    trained_path, plan_path = folder / "index.trained.faiss", folder / "index.plan.json"
    part_path = lambda r: folder / f"index.part-{r:03d}.faiss"  # noqa: E731
    if rank == 0:
        plan = plan_ivfpq(n, d, parse_size(max_memory), n_queries, nlist=nlist)
        trained = train_ivfpq(vectors, plan, seed, log)
        with atomic_path(trained_path) as tmp:
            faiss.write_index(trained, str(tmp))
        write_json(plan_path, plan)
        del trained
    barrier()
    plan = read_json(plan_path)
    part = faiss.read_index(str(trained_path))
    start, stop = n * rank // world, n * (rank + 1) // world
    add_chunks(part, vectors, plan["chunk_rows"], start, stop, log)
    with atomic_path(part_path(rank)) as tmp:
        faiss.write_index(part, str(tmp))
    del part
    barrier()
    if rank != 0:
        return None, None
    merged = faiss.read_index(str(trained_path))
    for r in range(world):
        part = faiss.read_index(str(part_path(r)))
        faiss.extract_index_ivf(merged).merge_from(faiss.extract_index_ivf(part), 0)  # ids are already global
        del part
    for path in [trained_path, plan_path] + [part_path(r) for r in range(world)]:
        path.unlink()
    log(f"merged {world} parts: {merged.ntotal:,} vectors")
    index = Reranked(merged, vectors)
    info = {"kind": "ivfpq", "count": n, "dim": d, **_ivfpq_info(plan), "built_by": world}
    return index, tune_index(index, vectors, info, target_recall, queries, n_queries, seed, log)
