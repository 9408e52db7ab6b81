"""``clipforge embed``, ``clipforge index build``, ``clipforge search``."""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

from ..argtypes import fraction, non_negative_int, or_auto, positive_int
from ..files import read_user_text
from ..inference import add_decode_argument, add_model_arguments


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Embed images (a folder, a CSV with a filepath column, or WebDataset shards) into sharded "
                     "float16 .npy files plus parquet metadata. Re-running continues at the first missing shard, and "
                     "embeds images added since, after the embedded ones wherever their names sort (images removed "
                     "or renamed are refused: their rows would stay, found by searches). Image and "
                     "checkpoint paths are recorded relative to the output folder (absolute ones outside it as "
                     "given), so search and serve work from any directory and the project can move as a whole. "
                     "Several processes: torchrun --nproc-per-node N -m clipforge.cli embed ...")
    p.add_argument("input", help="image folder, CSV/TSV, or shards ('data/{000000..000009}.tar')")
    p.add_argument("output", help="output folder")
    add_model_arguments(p)
    p.add_argument("--texts", help="also embed these texts (one per line) into text_emb/")
    p.add_argument("--captions", action="store_true",
                   help="also embed each image's caption (its first line) into caption_emb/, row for row: `index "
                        "build` indexes them (search --modality text), and the pair's CLIP score is what `clipforge "
                        "filter` keeps or drops pairs by")
    p.add_argument("--all-captions", action="store_true",
                   help="--captions with all of each image's caption lines, their mean vector (Flickr- or COCO-style "
                        "images with several captions each: the caption index then finds a described image at R@1 "
                        "64-66%% instead of 44%% on Flickr8k, docs/BENCHMARKS.md)")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="images per output shard [10000]")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="processes decoding images ahead of the model [4 on GPU, 1 on CPU]")
    add_decode_argument(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_embed)


def run_embed(args, loaded: tuple | None = None) -> int:
    """``loaded``: the (model, preprocess, tokenizer) the flags name, where the caller has it already (end2end)."""
    import torch

    from ..inference import decoding_from_args, load_from_args
    from .embed import embed_collection

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and "MASTER_ADDR" in os.environ and not torch.distributed.is_initialized():  # under torchrun
        torch.distributed.init_process_group("gloo")  # only to add up counts: the images never cross processes
        if args.device is None and torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    model, preprocess, tokenizer = loaded or load_from_args(args)
    texts = [l.strip() for l in read_user_text(args.texts, "--texts").splitlines() if l.strip()] if args.texts else None
    _suggest_bf16(args, model, rank)
    try:
        device = next(model.parameters()).device
        workers = args.workers if args.workers is not None else 4 if device.type == "cuda" else 1
        stats = embed_collection(model, preprocess, args.input, args.output, args.shard_size, args.batch_size,
                                 texts, tokenizer, rank, world, args.progress and rank == 0, workers=workers,
                                 model_spec={"model": args.model, "pretrained": args.pretrained},
                                 max_patches=getattr(preprocess, "max_patches", None),
                                 force_image_size=args.force_image_size,
                                 captions="all" if args.all_captions else args.captions,
                                 decoding=decoding_from_args(args, preprocess))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        bad_shards = (f"; {stats['bad_input_shards']} input shards unreadable or cut short, their readable part "
                      f"embedded" if stats.get("bad_input_shards") else "")
        for reason in stats["unreadable_examples"]:  # (under torchrun, those this process met)
            print(f"warning: {reason}, skipped", file=sys.stderr)
        print(f"embedded {stats['embedded']} images into {args.output} ({stats['skipped']} unreadable, skipped; "
              f"{stats['reused_shards']} shards already done{bad_shards})")
    return 0


def _suggest_bf16(args, model, rank: int) -> None:
    """A CPU embedding at the default fp32, with an image tower large enough for its matmuls to dominate, on a
    processor that multiplies bf16 natively: say that bf16 is there to ask for (not chosen for the user: features
    then differ from fp32's by bf16 rounding)."""
    import torch

    from ..environment import cpu_has_bf16
    from ..inference import weights_dtype

    if rank != 0 or args.precision not in (None, "auto") or not isinstance(model, torch.nn.Module):
        return
    visual = getattr(model, "visual", model)
    if next(model.parameters()).device.type == "cpu" and weights_dtype(model) == torch.float32 \
            and sum(p.numel() for p in visual.parameters()) >= 20_000_000 and cpu_has_bf16():
        print("note: this processor multiplies bf16 natively; --precision bf16 embeds this size of model ~2-3x "
              "faster here, with features within bf16 rounding of fp32's (retrieval and zero-shot within 0.4 "
              "points, docs/BENCHMARKS.md)", file=sys.stderr)


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Keep the image-caption pairs of a collection embedded with --captions whose CLIP score (the "
                     "cosine of the image's and its caption's embeddings) passes a threshold, as LAION and DataComp's "
                     "baseline filter web pairs; with --dedup, keep one image of each group of near-duplicates (the "
                     "best-scored). The kept pairs are written as WebDataset shards (the image as stored, "
                     "every caption line, a .json with the score) that `clipforge train --train-data OUTPUT` reads; "
                     "OUTPUT/scores.parquet lists every pair's score (and what each near-duplicate duplicates) and "
                     "OUTPUT/filter_info.json the quantiles.")
    p.add_argument("collection", help="a folder written by `clipforge embed IMAGES FOLDER --captions` (--dedup alone: "
                                      "by `clipforge embed IMAGES FOLDER`)")
    p.add_argument("output", help="a new folder for the kept pairs' shards")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--min-score", type=float, metavar="S",
                   help="keep pairs scoring at least this cosine (LAION-400M kept >= 0.3 by OpenAI's ViT-B/32; each "
                        "model has its own scale: see the quantiles filter_info.json reports)")
    g.add_argument("--keep-fraction", type=fraction, metavar="F",
                   help="keep the top fraction of the scored pairs (DataComp's CLIP-score baseline keeps 0.3)")
    p.add_argument("--dedup", type=float, metavar="COSINE",
                   help="of the pairs kept by score (or of all), drop each image whose cosine to a better-scored kept "
                        "image (without scores: an earlier one) is COSINE or more, as search --dedup drops results; "
                        "0.95 drops re-encoded and resized copies (a weak model's space is crowded below that; crops "
                        "need about 0.9: docs/BENCHMARKS.md); scores.parquet names each dropped image's twin")
    p.add_argument("--dedup-clusters", type=or_auto(non_negative_int), default="auto", metavar="N",
                   help="with --dedup: 0 compares each image with every kept one (exact; quadratic: 18 s at 100,000 "
                        "images, 150 s at 300,000 on 2 cores); N takes the candidates from N k-means clusters, each "
                        "image in its 3 nearest (10x faster at 100,000, 25x at 300,000, a million in 26 s; it missed "
                        "1 to 8 in 9,000 to 27,000 near-duplicates the exact rule drops: docs/BENCHMARKS.md); auto: "
                        "exact below 50,000 images, else the square root of their number [auto]")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="pairs per output shard [10000]")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_filter)


def run_filter(args) -> int:
    from .filter import filter_collection

    if args.dedup_clusters != "auto" and args.dedup is None:
        raise ValueError("--dedup-clusters goes with --dedup COSINE")
    info = filter_collection(args.collection, args.output, args.min_score, args.keep_fraction, args.shard_size,
                             args.progress, args.dedup, args.dedup_clusters)
    reasons = [f"CLIP score >= {info['threshold']:.4f}; {info['pairs'] - info['scored']:,} without a caption"
               if info["threshold"] is not None else "any score"]
    if "dedup" in info:
        rule = f"candidates from {info['dedup_clusters']:,} clusters" if info["dedup_clusters"] else "exact"
        reasons.append(f"{info['near_duplicates']:,} near-duplicates at cosine >= {info['dedup']} dropped ({rule})")
    if info["unreadable"]:
        reasons.append(f"{info['unreadable']} images no longer readable, left out")
    quantiles = ", ".join(f"{k} {v:.3f}" for k, v in info["score_quantiles"].items())
    print(f"kept {info['kept']:,} of {info['pairs']:,} pairs ({'; '.join(reasons)}) in {info['shards']} shards under "
          f"{args.output}" + (f"; scores: {quantiles}" if quantiles else ""))
    if info.get("kept_as_urls"):
        urls = Path(args.output) / info["urls"]
        print(f"and {info['kept_as_urls']:,} kept pairs known only by their web address in {urls}; to download them: "
              f"img2dataset --url_list {urls} --input_format parquet --url_col url --caption_col caption "
              "--save_additional_columns '[\"clip_score\"]' --output_format webdataset --output_folder IMAGES")
    return 0


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Build a FAISS index beside the embeddings: exact for small collections; for large ones IVF-PQ "
                     "(codes only, the shortlist re-ranked from the stored embeddings), trained on a sample and "
                     "filled chunk by chunk within --max-memory; or HNSW. Tuned to reach --target-recall@10 against "
                     "exact search. A collection embedded with --captions gets a second index, of its captions "
                     "(search --modality text). After `embed` added images, an index takes their vectors (its IVF "
                     "lists kept, tuned again) unless --rebuild, the earlier rows changed, or a rebuild would choose "
                     "another kind (or the collection more than doubled); with nothing embedded since and the same "
                     "settings, the index is left as it is. Several processes or machines (IVF-PQ): "
                     "torchrun --nproc-per-node N -m clipforge.cli index build FOLDER (FOLDER on a shared file "
                     "system across machines).")
    p.add_argument("words", nargs="+", metavar="[build] FOLDER",
                   help="a folder written by clipforge embed ('build', the one action, may be left out)")
    p.add_argument("--kind", choices=["auto", "flat", "ivfpq", "hnsw"], default="auto")
    p.add_argument("--modality", choices=["auto", "image", "text"], default="auto",
                   help="what to index: the images, the captions (of a collection embedded with --captions; the "
                        "captioned images only), or auto: the images, and the captions too where they were embedded "
                        "[auto]")
    p.add_argument("--target-recall", type=fraction, default=0.95)
    p.add_argument("--exact-below", type=non_negative_int, default=50_000, help="auto: exact search below this many vectors")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory budget for the whole process, e.g. 2GB: IVF-PQ chunks and code size are chosen "
                        "to fit it (and printed); flat/HNSW refuse a budget they exceed [no limit]")
    p.add_argument("--nlist", type=positive_int, help="IVF-PQ: inverted lists [4 sqrt(n), at most 2048]")
    p.add_argument("--tune-queries", default="auto", help=TUNE_QUERIES_HELP)
    p.add_argument("--rebuild", action="store_true",
                   help="build from scratch even where the index can take the images embedded since it was built "
                        "(by default those are added to it, and it is tuned again: after `embed` added images), or "
                        "holds them all already with these settings (by default it is then left as it is)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_index)


def run_index(args) -> int:
    from .collection import (check_collection, read_info, stored_paths_digest, unfinished_embedding,
                             write_metadata_arrow)
    from .index import rows_record

    words = args.words[1:] if args.words[0] == "build" and len(args.words) > 1 else args.words
    if len(words) != 1 or (words == ["build"] and not os.path.isdir("build")):
        raise ValueError(f"index takes one folder (clipforge index build FOLDER), got {' '.join(args.words)}")
    args.folder = words[0]
    check_collection(args.folder)
    captions = bool(read_info(args.folder).get("captions"))
    if args.modality == "text" and not captions:
        raise ValueError(f"--modality text: {args.folder} holds no caption embeddings; embed it with --captions "
                         f"(clipforge embed IMAGES {args.folder} --captions ...; done image shards are embedded again)")
    modalities = {"auto": ["image"] + (["text"] if captions else []), "image": ["image"], "text": ["text"]}
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    unfinished = unfinished_embedding(args.folder)
    if unfinished and rank == 0:  # an index of part of the images is still useful, but should not pass unnoticed
        print(f"warning: {unfinished}; indexing the images embedded so far", file=sys.stderr)
    if rank == 0:  # what serving memory-maps; first, so that the build's budget counts what it left resident
        write_metadata_arrow(args.folder)
    queries = _tuning_queries(args.folder, args.tune_queries)
    digest = functools.lru_cache(maxsize=None)(functools.partial(stored_paths_digest, args.folder))  # read once
    built_over = {**rows_record(args.folder, digest), "tune_queries": _queries_identity(args.tune_queries)} \
        if rank == 0 else {}  # before a build: little is resident yet
    if world == 1:
        for modality in modalities[args.modality]:
            _build_one_index(args, modality, queries, unfinished, built_over, digest)
        return 0
    import torch.distributed as dist

    if args.kind not in ("auto", "ivfpq"):
        raise SystemExit(f"--kind {args.kind}: only IVF-PQ builds split across processes")
    dist.init_process_group("gloo")
    try:
        for modality in modalities[args.modality]:
            _build_one_index(args, modality, queries, unfinished, built_over, digest, dist.barrier)
    finally:
        dist.destroy_process_group()
    return 0


def _build_one_index(args, modality: str, queries, unfinished: str | None, built_over: dict, digest,
                     barrier=None) -> None:
    """Build, save and report the index of ``modality``; under torchrun (``barrier`` given) this rank's part. An index
    built before ``embed`` added images takes the new ones (``index.extendable``) unless --rebuild. ``built_over``:
    the collection rows it is built over (``index.rows_record``), recorded in its info; ``digest``: their paths'."""
    from .index import (build_index, build_index_distributed, extend_index, extendable, modality_vectors, parse_size,
                        save_index, up_to_date)

    max_memory = parse_size(args.max_memory)
    rank = int(os.environ.get("RANK", 0))
    log = None if args.quiet or rank != 0 else (lambda message: print(message, file=sys.stderr, flush=True))
    what = "index" if modality == "image" else "caption index"
    if not args.rebuild and barrier is None and max_memory is None and \
            (current := up_to_date(args.folder, modality, args.kind, args.exact_below, args.nlist,
                                   args.target_recall, digest, built_over["tune_queries"])):
        print(f"the {current['kind']} {what} of {current['count']} vectors in {args.folder} is up to date (recall@10 "
              f"{current['recall@10']:.3f}): nothing was embedded since; --rebuild builds it anew")
        return
    previous = None if args.rebuild or barrier is not None else \
        extendable(args.folder, modality, args.kind, args.exact_below, args.nlist, digest)
    if previous is not None:
        index, info, rows = extend_index(args.folder, modality, *previous, args.target_recall, queries, log)
        save_index(index, {**info, **built_over}, args.folder, modality, rows)
        print(f"added {info['count'] - info['extended_from']} vectors to the {info['kind']} {what} of "
              f"{info['extended_from']} (now {info['count']}, recall@10 {info['recall@10']:.3f}) in {args.folder}"
              + (" (embedding unfinished)" if unfinished else "") + "; --rebuild builds it anew")
        return
    vectors, rows = modality_vectors(args.folder, modality)
    if not len(vectors):
        if args.modality == "text":
            raise ValueError(f"{args.folder}: no image has a caption to index")
        if rank == 0:
            print(f"note: no image of {args.folder} has a caption: no caption index", file=sys.stderr)
        return
    if barrier is not None:
        part_log = None if args.quiet else \
            (lambda message: print(f"[rank {rank}] {message}", file=sys.stderr, flush=True))
        index, info = build_index_distributed(vectors, args.folder, rank, int(os.environ["WORLD_SIZE"]), barrier,
                                              args.target_recall, queries=queries, log=part_log,
                                              max_memory=max_memory, nlist=args.nlist)
        if rank != 0:
            return
    else:
        index, info = build_index(vectors, args.kind, args.target_recall, args.exact_below, queries=queries, log=log,
                                  max_memory=max_memory, nlist=args.nlist)
    save_index(index, {**info, **built_over}, args.folder, modality, rows)
    if not info.get("target_met", True):
        print(f"warning: the {info['kind']} {what} reaches recall@10 {info['recall@10']:.3f}, below the target "
              f"{args.target_recall}; these vectors have little cluster structure. Use --kind flat (exact) or hnsw.")
    print(f"built {info['kind']} {what} of {info['count']} vectors (recall@10 {info['recall@10']:.3f}) in "
          f"{args.folder}" + (" (embedding unfinished)" if unfinished else ""))


def _queries_identity(choice: str) -> str:
    """What an index was tuned on, for its info: "auto", "collection", or a query file's content digest (another
    file, or the same file changed, tunes another index)."""
    if choice in ("auto", "collection"):
        return choice
    with open(choice, "rb") as f:
        return f"file:{hashlib.file_digest(f, 'sha256').hexdigest()}"


def _tuning_queries(folder: str, choice: str):
    """Text embeddings are what users search with, and they sit apart from image embeddings (the modality gap), so
    they tune the index more honestly than perturbed images when there are enough of them."""
    import numpy as np

    from .collection import load_text_embeddings

    if choice == "collection":
        return None
    if choice == "auto":
        queries = load_text_embeddings(folder)
        return queries if queries is not None and len(queries) >= 100 else None
    path = Path(choice)
    if not path.exists() or path.suffix != ".npy":
        raise SystemExit(f"--tune-queries: expected auto, collection or an existing .npy file, got {choice!r}")
    return np.load(path).astype(np.float32)


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Adopt embeddings made elsewhere as a clipforge collection, without embedding again: "
                     "clip-retrieval's (the output folder of `clip-retrieval inference`: img_emb/, metadata/ and, "
                     "with --enable_text, text_emb/, which become the collection's caption vectors). The vectors "
                     "are copied in chunks as unit float16, the metadata mapped onto clipforge's columns, and the "
                     "vectors checked against the model given (its features of a few of the images), which search "
                     "and serve then embed queries with. Then: clipforge index build OUTPUT; or give --index, "
                     "the folder `clip-retrieval index` wrote, to adopt its autofaiss indexes as well (clip-retrieval's "
                     "other metadata fields are kept either way: /item, /knn-service and /metadata return them).")
    p.epilog = ("example: clipforge import clip-retrieval embeddings/ emb/ --model ViT-B-32 --pretrained openai "
                "--images 'shards/{00000..00099}.tar'")
    p.add_argument("format", choices=["clip-retrieval"])
    p.add_argument("source", help="the embeddings folder clip-retrieval wrote")
    p.add_argument("output", help="a new folder for the collection")
    add_model_arguments(p)
    p.add_argument("--images", help="the folder or shards clip-retrieval read, where its image_path values are not "
                                    "files from here: a shard's samples are found by key, a folder's files by name")
    p.add_argument("--index", metavar="FOLDER",
                   help="also adopt the indexes `clip-retrieval index` built there (image.index and, with caption "
                        "vectors, text.index; autofaiss's flat, HNSW or IVF indexes), checked against the vectors "
                        "and tuned to --target-recall, instead of building them with clipforge index build")
    p.add_argument("--target-recall", type=fraction, default=0.95, help="with --index: tune its search to this "
                                                                        "recall@10 against exact search [0.95]")
    p.add_argument("--tune-queries", default="auto", help="with --index: " + TUNE_QUERIES_HELP)
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing the model's features of a few images with the stored vectors")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_import)


def run_import(args) -> int:
    from ..inference import load_from_args
    from .clip_retrieval_import import adopt_clip_retrieval, adopt_indexes, autofaiss_indexes

    if args.model is None and args.pretrained is None:
        raise ValueError("give the model clip-retrieval embedded with (--model NAME --pretrained TAG_OR_PATH, or "
                         "--pretrained CHECKPOINT): search and serve embed queries with it")
    indexes = autofaiss_indexes(args.index, args.source) if args.index else {}
    stats = adopt_clip_retrieval(args.source, args.output, *load_from_args(args),
                                 model_spec={"model": args.model, "pretrained": args.pretrained},
                                 images=args.images, check=args.check, progress=args.progress)
    checked = (f"; vectors checked on {stats['checked_images']} images (median cosine {stats['check_cosine']:.3f})"
               if stats["check_cosine"] is not None else "")
    print(f"adopted {stats['images']} images in {stats['partitions']} partitions into {args.output}"
          + (" with their caption vectors" if stats["captions"] else "") + checked)
    if stats["fields"] or stats["left_out"]:
        print(f"kept its other metadata fields: {', '.join(stats['fields']) or 'none'}"
              + (" (" + "; ".join(f"not {name}: {why}" for name, why in stats["left_out"].items()) + ")"
                 if stats["left_out"] else ""))
    if stats["not_found"]:
        print(f"warning: {stats['not_found']} images not found from here (no thumbnails for them): give --images, "
              "the folder or shards clip-retrieval read", file=sys.stderr)
    if not indexes:
        print(f"next: clipforge index build {args.output}")
        return 0
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if args.progress else None
    adopted = adopt_indexes(indexes, args.output, args.target_recall, _tuning_queries(args.output, args.tune_queries),
                            log)
    for modality, info in adopted.items():
        knobs = info["param"].split(",") if "param" in info else []  # nprobe,k_factor or efSearch; flat: none
        print(f"adopted {indexes[modality].name} as the {info['kind']} {'caption ' if modality == 'text' else ''}"
              f"index: recall@10 {info['recall@10']:.3f}"
              + (" at " + ", ".join(f"{knob} {info[knob]}" for knob in knobs) if knobs else ""))
        if not info["target_met"]:
            print(f"warning: {indexes[modality].name} reaches recall@10 {info['recall@10']:.3f}, below the target "
                  f"{args.target_recall}; clipforge index build {args.output} --rebuild builds one that does",
                  file=sys.stderr)
        elif info.get("k_factor", 16) > 16:  # its codes rank too coarsely for the usual shortlist
            print(f"note: {indexes[modality].name}'s codes are coarse: each query re-ranks {info['k_factor']} x k "
                  f"candidates from disk; for a collection searched often, clipforge index build {args.output} "
                  "--rebuild builds one that searches faster (docs/BENCHMARKS.md: 3.7x at 1M x 512)")
    print(f"next: clipforge serve {args.output}")
    return 0


TUNE_QUERIES_HELP = ("what recall is tuned on: 'auto' (the folder's text_emb/ when it holds >= 100 texts, else "
                     "perturbed collection vectors), 'collection', or a .npy file of query vectors [auto]")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Search an indexed collection by text or by image, among its images or (--modality text) its "
                     "captions; prints rank, score and path. With --copy-to, also writes the results' images and "
                     "captions to a folder (a subset to train or label on).")
    p.add_argument("folder")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", help="query by this image instead")
    p.add_argument("--queries", metavar="FILE", help="many text queries, one per line, embedded and searched in "
                   "batches; with --json one JSON line per query, with --copy-to a subfolder per query")
    p.add_argument("-k", type=positive_int, default=10)
    p.add_argument("--modality", choices=["image", "text"], default="image",
                   help="search the images, or the captions (a collection embedded with --captions; index build "
                        "indexes them): each result is the image whose caption matches, a text query finding "
                        "captions that say the same thing, an --image query the captions that describe it [image]")
    p.add_argument("--dedup", type=float, metavar="COSINE",
                   help="leave out near-duplicates of better results (images, or with --modality text captions) at "
                        "this cosine similarity or more (e.g. 0.95)")
    p.add_argument("--min-score", type=float, metavar="COSINE",
                   help="keep only results at this cosine similarity or more (with -k as the most kept)")
    p.add_argument("--copy-to", metavar="FOLDER",
                   help="also write each result's image (its file's bytes, from a folder or a shard) to FOLDER as "
                        "RANK-NAME.EXT, its captions beside it as .txt, and hits.jsonl listing rank, score and "
                        "source: a subset of the collection to train or label on (clip-retrieval's filter)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_arguments(p, recorded=True)
    p.set_defaults(func=run_search)


def run_search(args) -> int:
    from ..inference import load_from_args
    from ..preprocess import Decoding, open_image
    from .search import Searcher, require_caption_index

    given = sum(x is not None for x in (args.query, args.image, args.queries))
    if given != 1:
        raise ValueError(f"give {'one' if not given else 'only one'} of: a text query, --image PATH, --queries FILE")
    if args.query is not None and not args.query.strip():
        raise ValueError("the text query is empty: give words to search for (or --image PATH, --queries FILE)")
    if args.dedup is not None and not 0 < args.dedup <= 1:
        raise ValueError(f"--dedup {args.dedup}: a cosine similarity in (0, 1], e.g. 0.95")
    texts = _read_queries(args.queries) if args.queries else None  # a bad file fails before the model loads
    if args.modality == "text":
        require_caption_index(args.folder)
    searcher = Searcher(args.folder, *load_from_args(args, collection=args.folder))
    if texts is None:
        if args.image:  # decoded as embed decodes the collection's photos: upright, a large JPEG reduced
            image = open_image(args.image, decoding=Decoding.for_model(searcher.preprocess))
            hits = searcher.search_image(image, args.k, args.dedup, args.modality)
        else:
            hits = searcher.search_text(args.query, args.k, args.dedup, args.modality)
        _report_hits(args, args.query or args.image, _kept(args, hits), args.copy_to, one_of_many=False)
        return 0
    from tqdm import tqdm

    batch = 256
    for start in tqdm(range(0, len(texts), batch), desc="searching", unit="batch", disable=len(texts) <= batch,
                      file=sys.stderr):
        chunk = texts[start:start + batch]
        found = searcher.search_vectors(searcher.embed_texts(chunk), args.k, args.dedup, args.modality)
        for i, (query, hits) in enumerate(zip(chunk, found), start):
            folder = args.copy_to and Path(args.copy_to) / f"{i + 1:05d}-{_slug(query)}"
            _report_hits(args, query, _kept(args, hits), folder, one_of_many=True)
    return 0


def _read_queries(path: str) -> list[str]:
    texts = [line.strip() for line in read_user_text(path, "--queries").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--queries {path}: no queries (one per line)")
    return texts


def _kept(args, hits: list[dict]) -> list[dict]:
    """``hits`` at --min-score or more (saying so when that leaves none)."""
    if args.min_score is None:
        return hits
    kept = [hit for hit in hits if hit["score"] >= args.min_score]
    if not kept and hits:
        print(f"no result scores --min-score {args.min_score} or more (the best: {hits[0]['score']:.4f})",
              file=sys.stderr)
    return kept


def _report_hits(args, query: str, hits: list[dict], copy_to, one_of_many: bool) -> None:
    """Print one query's results (JSON: its hit list, or with many queries one line with the query), and copy them
    when asked."""
    if copy_to:
        copied, failed, addresses = copy_hits(hits, copy_to)
        print(f"copied {copied} images to {copy_to}" + (f" ({failed} unreadable, skipped)" if failed else "")
              + (f"; {addresses} listed in hits.jsonl by their web address (no copy here)" if addresses else ""),
              file=sys.stderr)
    if args.json:
        print(json.dumps({"query": query, "hits": hits} if one_of_many else hits))
        return
    if one_of_many:
        print(f"# {query}")
    for rank, hit in enumerate(hits, 1):  # an adopted image kept only as its web address: that address
        print(f"{rank:3d}  {hit['score']:.4f}  {hit.get('url') or hit['path']}"
              + (f"  {hit['caption']}" if hit["caption"] else ""))


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "query"


def copy_hits(hits: list[dict], folder: str | os.PathLike) -> tuple[int, int, int]:
    """Write each hit's image bytes (as stored: no re-encoding) and captions into ``folder``, named by rank, and
    ``hits.jsonl``; an image that can no longer be read (moved or deleted since ``embed``) is skipped, named on
    stderr and counted; an adopted image kept only as its web address is listed with it (``url``, no ``file``:
    nothing is downloaded). Returns (copied, skipped, listed by address)."""
    import re

    from ..files import atomic_path
    from .collection import item_captions, item_from_path, item_image_bytes

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--copy-to {folder}: a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    copied, failed, addresses, listing = 0, 0, 0, []
    for rank, hit in enumerate(hits, 1):
        if hit.get("url"):
            listing.append({"rank": rank, "score": hit["score"], "file": None, "url": hit["url"],
                            "source": str(hit["path"]), "caption": hit.get("caption") or ""})
            addresses += 1
            continue
        item = item_from_path(str(hit["path"]))
        try:
            data, ext = item_image_bytes(item)
            captions = item_captions(item)
        except (OSError, KeyError) as exc:
            print(f"skipped {hit['path']}: {exc}", file=sys.stderr)
            failed += 1
            continue
        name = Path(item["path"]).stem if "path" in item else item["key"]
        stem = f"{rank:05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:100]}"
        with atomic_path(folder / f"{stem}.{ext}") as tmp:
            tmp.write_bytes(data)
        if captions:
            with atomic_path(folder / f"{stem}.txt") as tmp:
                tmp.write_text("\n".join(captions) + "\n")
        listing.append({"rank": rank, "score": hit["score"], "file": f"{stem}.{ext}", "source": str(hit["path"]),
                        "caption": hit.get("caption") or ""})
        copied += 1
    with atomic_path(folder / "hits.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in listing))
    return copied, failed, addresses
