"""Keep the image-caption pairs a model scores as matching: CLIP-score filtering, as LAION and DataComp's baseline
filter web pairs, over a collection embedded with ``clipforge embed --captions``; and drop near-duplicate images.

A pair's score is the cosine of its image and caption embeddings (the collection's float16 vectors; embedded with
``--all-captions``, the mean of the image's captions). A near-duplicate is an image whose cosine to a better-ranked
kept image (higher score; without scores, earlier in the collection) reaches the ``dedup`` threshold: the rule
``search --dedup`` applies to results, here over the whole collection (re-uploads, crops and resizes of one photo,
which a model sees as one image and a dataset counts many times). The kept pairs are written as WebDataset shards
(the image as stored, every caption line, a ``.json`` with the score and where the pair came from) that ``clipforge
train --train-data OUT`` reads; ``OUT/scores.parquet`` lists every pair's score. A kept pair whose image the
collection knows only by its web address (adopted from clip-retrieval) is listed in ``OUT/urls.parquet`` instead, as
img2dataset takes a list of pairs to download.
"""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

from ..files import atomic_path, write_json
from .collection import (caption_shard, check_collection, embedded_shards, item_captions, item_from_path,
                         item_image_bytes, load_metadata, load_vectors, read_info, unfinished_embedding)

SCORES = "scores.parquet"
URLS = "urls.parquet"  # kept pairs known only by their web address (an adopted collection): img2dataset's input
INFO = "filter_info.json"


def caption_scores(folder: str | Path) -> tuple[np.ndarray, list[dict]]:
    """(each image's CLIP score, NaN for one without a caption; the metadata rows), in the collection's order."""
    folder = check_collection(folder)
    if not read_info(folder).get("captions"):
        raise ValueError(f"{folder} holds no caption embeddings: embed it with --captions "
                         f"(clipforge embed IMAGES {folder} --captions ...; done image shards are embedded again)")
    unfinished = unfinished_embedding(folder)
    if unfinished:
        print(f"warning: {unfinished}; scoring the pairs embedded so far", file=sys.stderr)
    scores = []
    for shard, path in embedded_shards(folder):
        captions = caption_shard(folder, shard)
        if not captions.exists():
            raise FileNotFoundError(f"{captions}: missing beside {path.name}; embed the collection again with "
                                    "--captions")
        images, texts = np.load(path).astype(np.float32), np.load(captions).astype(np.float32)
        score = (images * texts).sum(axis=1)
        score[~texts.any(axis=1)] = np.nan  # no caption: no score
        scores.append(score)
    return np.concatenate(scores), load_metadata(folder)


def _check_threshold(threshold: float) -> None:
    if not -1 <= threshold <= 1:
        raise ValueError(f"--dedup {threshold}: a cosine similarity, from -1 to 1 (0.95 keeps one of each re-upload)")


def near_duplicates(vectors: np.ndarray, threshold: float, order: np.ndarray, block: int = 512,
                    chunk: int = 65_536, progress: bool = False) -> np.ndarray:
    """For each row of ``vectors`` (unit length), the row it duplicates (its nearest kept row), or -1 for a kept one:
    taken in ``order`` (best first), a row goes when its cosine to a kept row before it is ``threshold`` or more (the
    greedy rule of ``search --dedup``); rows outside ``order`` are neither. Costs one matrix product of every row
    against the kept ones, ``block`` rows at a time (quadratic: 100,000 rows take about 20 s on 2 CPU cores)."""
    import torch
    from tqdm import tqdm

    _check_threshold(threshold)
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    duplicate_of = np.full(len(x), -1, dtype=np.int64)
    kept_ids = np.empty(len(x), dtype=np.int64)
    kept_vectors, count = torch.empty_like(x), 0
    # kept rows are compared ``chunk`` at a time: a [block, chunk] float32 matrix, 128 MiB at the defaults (blocks of
    # 512 beat 2,048 by 13-26% measured alone, docs/BENCHMARKS.md)
    for start in tqdm(range(0, len(order), block), desc="finding near-duplicates", unit="block", disable=not progress,
                      file=sys.stderr):
        ids = order[start:start + block]
        queries = x[ids]
        best = torch.full((len(ids),), -2.0)
        which = torch.zeros(len(ids), dtype=torch.long)
        for first in range(0, count, chunk):
            value, index = (queries @ kept_vectors[first:min(count, first + chunk)].T).max(dim=1)
            better = value > best
            best, which = torch.where(better, value, best), torch.where(better, index + first, which)
        best = best.numpy()
        dup = np.where(best >= threshold, kept_ids[which.numpy()], -1)
        inner = (queries @ queries.T).numpy()
        block_kept: list[int] = []
        for j in range(len(ids)):  # within the block, in order; the nearest kept row wherever it is
            if block_kept:
                nearest = block_kept[int(np.argmax(inner[j, block_kept]))]
                if inner[j, nearest] >= max(threshold, best[j] + 1e-7):
                    dup[j] = ids[nearest]
            if dup[j] < 0:
                block_kept.append(j)
        duplicate_of[ids] = dup
        new = ids[block_kept]
        kept_vectors[count:count + len(new)] = x[new]
        kept_ids[count:count + len(new)] = new
        count += len(new)
    return duplicate_of


EXACT_DEDUP_BELOW = 50_000  # --dedup-clusters auto: the exact rule below this many rows (20 s at 100,000)


def dedup_clusters_for(rows: int, clusters: int | str | None) -> int:
    """The clusters the candidates come from for ``rows`` rows, 0 for the exact rule: ``clusters`` as given, None
    for the square root of the rows, "auto" for that from ``EXACT_DEDUP_BELOW`` rows on; 0 too where one cluster or
    fewer than two rows a cluster would leave nothing to gain."""
    if clusters == "auto":
        clusters = 0 if rows < EXACT_DEDUP_BELOW else None
    clusters = max(1, round(rows ** 0.5)) if clusters is None else int(clusters)
    if clusters < 0:
        raise ValueError(f"--dedup-clusters {clusters}: at least 0 (0: the exact rule)")
    return 0 if clusters == 1 or rows < 2 * clusters else clusters


def clustered_near_duplicates(vectors: np.ndarray, threshold: float, order: np.ndarray, clusters: int | None = None,
                              probes: int = 3, neighbours: int = 32, seed: int = 0,
                              progress: bool = False) -> np.ndarray:
    """``near_duplicates``' rule with candidates from clusters, for collections where comparing every row with every
    kept one takes too long (SemDeDup's idea, Abbas et al. 2023, made to agree with the greedy rule): spherical
    k-means (FAISS; ``clusters`` as ``dedup_clusters_for`` reads it, trained on 64 rows a cluster) and each row of
    ``order`` put in its ``probes`` nearest clusters. Within each cluster, each row's ``neighbours`` most similar
    earlier rows at ``threshold`` or more are its candidate twins; then, in ``order``, a row goes for its most similar
    candidate still kept (a row with more candidates than that, in a large group of copies, is compared with every
    kept row of its clusters). So a row goes exactly when the rule would drop it for a kept row it shares a cluster
    with; a pair that shares none is missed (both kept): measured in docs/BENCHMARKS.md."""
    import torch
    from tqdm import tqdm

    from .index import _faiss

    _check_threshold(threshold)
    order = np.asarray(order, dtype=np.int64)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    clusters = dedup_clusters_for(len(order), clusters)
    if not clusters:
        return near_duplicates(x, threshold, order, progress=progress)
    probes = min(probes, clusters)
    rng = np.random.default_rng(seed)
    kmeans = _faiss().Kmeans(x.shape[1], clusters, niter=20, seed=seed, spherical=True, max_points_per_centroid=64)
    kmeans.train(x[np.sort(rng.choice(order, size=min(len(order), 64 * clusters), replace=False))])
    in_rank_order = x[order]  # row r of the ranking is ``order[r]``
    ranked = torch.from_numpy(in_rank_order)
    _, nearest = kmeans.index.search(in_rank_order, probes)
    rank_of = np.repeat(np.arange(len(order)), probes)
    by_cluster = np.lexsort((rank_of, nearest.ravel()))  # each cluster's members in rank order
    members_of, cluster_of = rank_of[by_cluster], nearest.ravel()[by_cluster]
    bounds = np.searchsorted(cluster_of, np.arange(clusters + 1))
    lists = [members_of[bounds[c]:bounds[c + 1]] for c in range(clusters)]
    later, earlier, similarity = [], [], []
    truncated = np.zeros(len(order), dtype=bool)  # rows with more candidates in a cluster than ``neighbours``
    for members in tqdm(lists, desc="near-duplicate candidates", unit="cluster", disable=not progress,
                        file=sys.stderr):
        for start, sims in _earlier_similarities(ranked[torch.from_numpy(members)]):
            counts = (sims >= threshold).sum(dim=1)
            rows = torch.nonzero(counts, as_tuple=True)[0]
            if not len(rows):
                continue
            truncated[members[rows[counts[rows] > neighbours].numpy() + start]] = True
            values, columns = sims[rows].topk(min(neighbours, sims.shape[1]), dim=1)
            found, picks = torch.nonzero(values >= threshold, as_tuple=True)
            later.append(members[rows[found].numpy() + start])
            earlier.append(members[columns[found, picks].numpy()])
            similarity.append(values[found, picks].numpy())
    later, earlier, similarity = (np.concatenate(parts) if parts else np.empty(0) for parts in
                                  (later, earlier, similarity))
    arranged = np.lexsort((-similarity, later))  # by the later row, its most similar candidate first
    later, earlier = later[arranged].astype(np.int64), earlier[arranged].astype(np.int64)
    starts = np.searchsorted(later, np.arange(len(order) + 1)).tolist()
    earlier, homes, cut_short = earlier.tolist(), nearest.tolist(), truncated.tolist()  # plain lists: a fast loop
    dropped_for = [-1] * len(order)
    kept_in: list[list[int]] = [[] for _ in range(clusters)]  # each cluster's kept rows so far
    for row in range(len(order)):  # rank order: each decision sees every earlier one
        for candidate in earlier[starts[row]:starts[row + 1]]:
            if dropped_for[candidate] < 0:
                dropped_for[row] = candidate
                break
        else:
            if cut_short[row]:  # more candidates than it was given (a large group of copies): every kept row it shares
                shared = np.array([k for c in homes[row] for k in kept_in[c]], dtype=np.int64)
                if len(shared):
                    sims = (ranked[torch.from_numpy(shared)] @ ranked[row]).numpy()
                    if sims.max() >= threshold:
                        dropped_for[row] = int(shared[int(np.argmax(sims))])
        if dropped_for[row] < 0:
            for c in homes[row]:
                kept_in[c].append(row)
    dropped_for = np.array(dropped_for, dtype=np.int64)
    duplicate_of = np.full(len(x), -1, dtype=np.int64)
    dropped = dropped_for >= 0
    duplicate_of[order[dropped]] = order[dropped_for[dropped]]
    return duplicate_of


def _earlier_similarities(vectors, block: int = 1024):
    """``(start, sims)`` for each block of rows of ``vectors`` from ``start``: their cosines to every row before
    them (-2 in the places of themselves and the rows after)."""
    import torch

    after = torch.ones(block, block, dtype=torch.bool).triu_()  # in the diagonal square: itself and after
    for start in range(0, len(vectors), block):
        sims = vectors[start:start + block] @ vectors[:start + block].T
        rows = sims.shape[0]
        sims[:, start:].masked_fill_(after[:rows, :rows], -2.0)
        yield start, sims


def filter_collection(folder: str | Path, output: str | Path, min_score: float | None = None,
                      keep_fraction: float | None = None, shard_size: int = 10_000, progress: bool = True,
                      dedup: float | None = None, dedup_clusters: int | str = "auto") -> dict:
    """Write the pairs of ``folder`` scoring at least ``min_score`` (or the top ``keep_fraction`` of the scored ones)
    into ``output`` as shards ``000000.tar`` ...; with ``dedup`` (a cosine), of those only one of each group of
    near-duplicate images, the best-scored: by the exact rule (``dedup_clusters`` 0, and "auto" below
    ``EXACT_DEDUP_BELOW`` rows) or with candidates from that many clusters ("auto": the square root of the rows;
    ``clustered_near_duplicates``). Returns (and writes as ``filter_info.json``) what was kept."""
    from tqdm import tqdm

    if min_score is not None and keep_fraction is not None:
        raise ValueError("give one of --min-score S (a cosine) or --keep-fraction F (the top fraction of the pairs)")
    if min_score is None and keep_fraction is None and dedup is None:
        raise ValueError("give --min-score S or --keep-fraction F (CLIP-score filtering), --dedup COSINE "
                         "(near-duplicate images dropped), or both")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"--keep-fraction {keep_fraction}: a fraction above 0, at most 1")
    output = Path(output)
    if output.exists() and any(output.glob("*.tar")):
        raise FileExistsError(f"{output} already holds shards: give an empty or new folder")
    by_score = min_score is not None or keep_fraction is not None
    if by_score or read_info(check_collection(folder)).get("captions"):
        scores, rows = caption_scores(folder)  # without a score filter, the scores still rank near-duplicates
    else:
        rows = load_metadata(folder)
        scores = np.full(len(rows), np.nan, dtype=np.float32)
    scored = ~np.isnan(scores)
    if by_score and not scored.any():
        raise ValueError(f"{folder}: no image has a caption to score")
    threshold = None
    if by_score:
        threshold = float(min_score) if min_score is not None else float(np.quantile(scores[scored], 1 - keep_fraction))
        kept = np.flatnonzero(scored & (scores >= threshold))
    else:
        kept = np.arange(len(rows))
    duplicate_of = np.full(len(rows), -1, dtype=np.int64)
    if dedup is not None:
        vectors = load_vectors(folder)  # the rows are read already
        ranked = kept[np.argsort(-np.nan_to_num(scores[kept], nan=-np.inf), kind="stable")]  # best first; ties in order
        dedup_clusters = dedup_clusters_for(len(ranked), dedup_clusters)
        duplicate_of = near_duplicates(vectors, dedup, ranked, progress=progress) if not dedup_clusters else \
            clustered_near_duplicates(vectors, dedup, ranked, dedup_clusters, progress=progress)
        kept = kept[duplicate_of[kept] < 0]
    output.mkdir(parents=True, exist_ok=True)
    by_address = np.array([bool(rows[i].get("url")) for i in kept], dtype=bool)  # adopted, only a web address
    addressed, kept = kept[by_address], kept[~by_address]  # those listed for a downloader, not written
    written, unreadable = 0, 0
    bar = tqdm(total=len(kept), desc="writing kept pairs", unit="pair", disable=not progress, file=sys.stderr)
    for number, start in enumerate(range(0, len(kept), shard_size)):
        with atomic_path(output / f"{number:06d}.tar") as tmp, tarfile.open(tmp, "w") as tar:
            for i in kept[start:start + shard_size]:
                row = rows[i]
                item = item_from_path(row["path"])
                try:
                    data, ext = item_image_bytes(item)
                    captions = item_captions(item) or [row["caption"]]
                except (OSError, KeyError):  # moved or deleted since it was embedded
                    unreadable += 1
                    continue
                key = f"{i:09d}"
                record = {"source": row["path"], **({"clip_score": round(float(scores[i]), 6)} if scored[i] else {})}
                for suffix, payload in ((ext, data), ("txt", "\n".join(captions).encode()),
                                        ("json", json.dumps(record).encode())):
                    member = tarfile.TarInfo(f"{key}.{suffix}")
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
                written += 1
        bar.update(len(kept[start:start + shard_size]))
    bar.close()
    if len(addressed):
        _write_urls(output / URLS, rows, scores, addressed)
    _write_scores(output / SCORES, rows, scores, np.concatenate([kept, addressed]),
                  duplicate_of if dedup is not None else None)
    quantiles = {f"p{q}": round(float(np.quantile(scores[scored], q / 100)), 4) for q in (10, 25, 50, 75, 90)} \
        if scored.any() else {}
    info = {"collection": str(folder), "pairs": len(rows), "scored": int(scored.sum()), "threshold": threshold,
            "kept": written, "unreadable": unreadable, "shards": -(-len(kept) // shard_size),
            **({"kept_as_urls": len(addressed), "urls": URLS} if len(addressed) else {}),
            "score_quantiles": quantiles, **({"keep_fraction": keep_fraction} if keep_fraction else {}),
            **({"dedup": dedup, "near_duplicates": int((duplicate_of >= 0).sum()),
                "dedup_clusters": dedup_clusters} if dedup is not None else {})}
    write_json(output / INFO, info)
    return info


def _write_urls(path: Path, rows: list[dict], scores: np.ndarray, kept: np.ndarray) -> None:
    """The kept pairs whose image is only a web address, as img2dataset's parquet input (``url``, ``caption``, and
    ``clip_score`` for ``--save_additional_columns``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"url": [rows[i]["url"] for i in kept], "caption": [rows[i]["caption"] for i in kept],
                      "clip_score": pa.array(scores[kept], type=pa.float32(), from_pandas=True)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_scores(path: Path, rows: list[dict], scores: np.ndarray, kept: np.ndarray,
                  duplicate_of: np.ndarray | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    mask = np.zeros(len(rows), dtype=bool)
    mask[kept] = True
    columns = {"path": [r["path"] for r in rows], "caption": [r["caption"] for r in rows],
               "clip_score": pa.array(scores, type=pa.float32(), from_pandas=True), "kept": mask}
    if any(r.get("url") for r in rows):  # adopted images known only by their web address
        columns["url"] = [r.get("url") or None for r in rows]
    if duplicate_of is not None:  # the kept image each near-duplicate was dropped for
        columns["duplicate_of"] = [rows[j]["path"] if j >= 0 else None for j in duplicate_of]
    table = pa.table(columns)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
