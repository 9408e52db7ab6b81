"""Keep the image-caption pairs a model scores as matching: CLIP-score filtering, as LAION and DataComp's baseline
filter web pairs, over a collection embedded with ``clipforge embed --captions``.

A pair's score is the cosine of its image and caption embeddings (the collection's float16 vectors). The kept pairs are
written as WebDataset shards (the image as stored, every caption line, a ``.json`` with the score and where the pair
came from) that ``clipforge train --train-data OUT`` reads; ``OUT/scores.parquet`` lists every pair's score.
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
                         item_image_bytes, load_metadata, read_info, unfinished_embedding)

SCORES = "scores.parquet"
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


def filter_collection(folder: str | Path, output: str | Path, min_score: float | None = None,
                      keep_fraction: float | None = None, shard_size: int = 10_000, progress: bool = True) -> dict:
    """Write the pairs of ``folder`` scoring at least ``min_score`` (or the top ``keep_fraction`` of the scored ones)
    into ``output`` as shards ``000000.tar`` ...; returns (and writes as ``filter_info.json``) what was kept."""
    from tqdm import tqdm

    if (min_score is None) == (keep_fraction is None):
        raise ValueError("give one of --min-score S (a cosine) or --keep-fraction F (the top fraction of the pairs)")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"--keep-fraction {keep_fraction}: a fraction above 0, at most 1")
    output = Path(output)
    if output.exists() and any(output.glob("*.tar")):
        raise FileExistsError(f"{output} already holds shards: give an empty or new folder")
    scores, rows = caption_scores(folder)
    scored = ~np.isnan(scores)
    if not scored.any():
        raise ValueError(f"{folder}: no image has a caption to score")
    threshold = float(min_score) if min_score is not None else float(np.quantile(scores[scored], 1 - keep_fraction))
    kept = np.flatnonzero(scored & (scores >= threshold))
    output.mkdir(parents=True, exist_ok=True)
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
                record = {"source": row["path"], "clip_score": round(float(scores[i]), 6)}
                for suffix, payload in ((ext, data), ("txt", "\n".join(captions).encode()),
                                        ("json", json.dumps(record).encode())):
                    member = tarfile.TarInfo(f"{key}.{suffix}")
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
                written += 1
        bar.update(len(kept[start:start + shard_size]))
    bar.close()
    _write_scores(output / SCORES, rows, scores, kept)
    quantiles = {f"p{q}": round(float(np.quantile(scores[scored], q / 100)), 4) for q in (10, 25, 50, 75, 90)}
    info = {"collection": str(folder), "pairs": len(rows), "scored": int(scored.sum()), "threshold": threshold,
            "kept": written, "unreadable": unreadable, "shards": -(-len(kept) // shard_size),
            "score_quantiles": quantiles, **({"keep_fraction": keep_fraction} if keep_fraction else {})}
    write_json(output / INFO, info)
    return info


def _write_scores(path: Path, rows: list[dict], scores: np.ndarray, kept: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    mask = np.zeros(len(rows), dtype=bool)
    mask[kept] = True
    table = pa.table({"path": [r["path"] for r in rows], "caption": [r["caption"] for r in rows],
                      "clip_score": pa.array(scores, type=pa.float32(), from_pandas=True), "kept": mask})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
