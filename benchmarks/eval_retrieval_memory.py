"""Peak memory and time of `clipforge eval retrieval` on Flickr8k images: each batch embedded as it is decoded
(``evaluate.retrieval.embed_retrieval_set``, what the command runs) against the earlier way, every preprocessed image
held before any is embedded (``data.evaluation_set`` + ``embed_pairs``, what the command ran before), and against
CLIP_benchmark's ``zeroshot_retrieval.evaluate`` over a DataLoader of the same samples. Each runs in a fresh process
(its own peak RSS), decoding in that process, on the same seeded random ViT-B-32 at 224 pixels; recall must agree.
The earlier way, which decodes everything before embedding, also gives the share of the time decoding takes.

    python benchmarks/eval_retrieval_memory.py --data ../shared/data --images 2000 --json runs/bench/eval-memory.json
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

import fresh_process

WAYS = ("held", "streamed", "clip_benchmark")


def run_one(way: str, data: Path, images: int, batch_size: int) -> dict:
    import clipforge
    from clipforge.data import evaluation_set, open_source
    from clipforge.data.pipeline import evaluation_samples
    from clipforge.evaluate.retrieval import embed_pairs, embed_retrieval_set, retrieval_metrics

    torch.manual_seed(0)  # the same random weights in every process
    model, preprocess, tokenizer = clipforge.load("ViT-B-32")
    source = open_source(str(data / "flickr8k" / "train"), shuffle_buffer=0)
    start, decoding = time.perf_counter(), None
    if way == "held":  # decoding and embedding one after the other: the time decoding takes, apart
        pairs = evaluation_set(source, preprocess, limit=images)
        decoding = time.perf_counter() - start
        image_features, text_features = embed_pairs(model, tokenizer, pairs.images, pairs.captions, batch_size)
        metrics = retrieval_metrics(image_features, text_features, pairs.caption_images)
    elif way == "streamed":
        image_features, text_features, owners, _ = embed_retrieval_set(model, tokenizer, source, preprocess, images,
                                                                       batch_size, progress=False)
        metrics = retrieval_metrics(image_features, text_features, owners)
    else:
        from clip_benchmark.metrics import zeroshot_retrieval

        class Samples(torch.utils.data.IterableDataset):
            def __iter__(self):
                for image, texts, _, _ in evaluation_samples(source, images):
                    yield preprocess(image), texts

        loader = torch.utils.data.DataLoader(Samples(), batch_size=batch_size, num_workers=0,
                                             collate_fn=lambda batch: (torch.stack([b[0] for b in batch]),
                                                                       [b[1] for b in batch]))
        found = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
        metrics = {f"text_to_image_R@{k}": found[f"image_retrieval_recall@{k}"] for k in (1, 5, 10)}
        metrics.update({f"image_to_text_R@{k}": found[f"text_retrieval_recall@{k}"] for k in (1, 5, 10)})
    seconds = time.perf_counter() - start
    return {"way": way, "seconds": round(seconds, 1), "peak_rss_gb": round(resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3), "metrics": {k: round(v, 5) for k, v in metrics.items()},
        **({"decoding_share": round(decoding / seconds, 3)} if decoding is not None else {})}


def main() -> int:
    parser = fresh_process.parser(__doc__, WAYS, 2000, "the first N images of flickr8k/train")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.data, args.images, args.batch_size)))
        return 0
    rows = []
    for way in WAYS:
        rows.append(fresh_process.row(__file__, way, args, ("data", "images", "batch_size", "threads")))
        share = f"  decoding {rows[-1]['decoding_share']:.0%} of it" if "decoding_share" in rows[-1] else ""
        print(f"{way:>15}: {rows[-1]['seconds']:7.1f} s  peak RSS {rows[-1]['peak_rss_gb']:.2f} GB  "
              f"R@1 t2i {rows[-1]['metrics']['text_to_image_R@1']:.4f}{share}", flush=True)
    agree = all(row["metrics"] == rows[0]["metrics"] for row in rows)
    result = {"images": args.images, "batch_size": args.batch_size, "threads": args.threads, "rows": rows,
              "metrics_agree": agree,
              "ratios": {"peak_rss_streamed_vs_held": round(rows[1]["peak_rss_gb"] / rows[0]["peak_rss_gb"], 3),
                         "peak_rss_streamed_vs_clip_benchmark": round(rows[1]["peak_rss_gb"] / rows[2]["peak_rss_gb"],
                                                                      3)}}
    return fresh_process.finish(result, agree, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
