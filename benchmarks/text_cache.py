"""`--text-cache` kept: the recipe's training captions through its frozen MiniLM computed once and read back on a
resume, and the validation captions computed at the first validation and read at the later ones.

    python benchmarks/text_cache.py runs/flickr8k/checkpoints/step-00002400 --json runs/bench/text-cache.json

With the checkpoint's text tower locked, as the recipe trains it: the 29,932 distinct training captions of
recipes/flickr8k.yaml (Flickr8k train, with their left/right-mirrored forms) filled into the cache as a new run does,
written to a temporary run folder, then read back as a resumed run does (its fingerprint included); Flickr8k dev
(1,000 photos, 5,000 captions) validated twice as training validates. Seconds; the peer figure for each is the work
each repetition did before (open_clip's locked tower computes every caption at every step and validation).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from report import finish, machine

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch

    import clipforge
    from clipforge.data import open_source
    from clipforge.train.loop import TEXT_FEATURES, _training_captions
    from clipforge.train.validation import open_validation, validate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint with a Hugging Face text tower (the Flickr8k recipe's)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    model, _, tokenizer = clipforge.load(args.checkpoint)
    model.text.lock()
    train = open_source(f"{args.data}/train/train-{{000000..000005}}.tar", shuffle_buffer=0)
    texts = _training_captions(SimpleNamespace(seed=0, hflip=True), train)
    tokens = tokenizer(texts)
    report = {"machine": machine(), "checkpoint": args.checkpoint, "training captions": len(texts)}
    with tempfile.TemporaryDirectory() as run:
        cache = model.text.cache_features()
        started = time.perf_counter()
        fingerprint = cache.fingerprint(model.text, tokens)
        cache.fill(tokens)
        cache.save(Path(run) / TEXT_FEATURES, fingerprint)
        filled = time.perf_counter() - started
        kept = dict(cache.table)
        cache = model.text.cache_features()  # a resumed run's: empty until read back
        started = time.perf_counter()
        assert cache.load(Path(run) / TEXT_FEATURES, cache.fingerprint(model.text, tokens))
        read = time.perf_counter() - started
        assert cache.table.keys() == kept.keys() and all(torch.equal(kept[k], v) for k, v in cache.table.items())
        report["a run's start: training captions (s)"] = {"computed and kept (a new run)": round(filled, 1),
                                                          "read back (a resumed run)": round(read, 2)}
    cfg = SimpleNamespace(val_data=f"{args.data}/dev", val_samples=None, seed=0, label_captions=None,
                          objective="contrastive", csv_keys=lambda: None)
    val_set, _ = open_validation(cfg, None, model.image_size, None)
    times, metrics = [], []
    for _ in range(2):
        started = time.perf_counter()
        metrics.append(validate(model, tokenizer, val_set, torch.device("cpu")))
        times.append(time.perf_counter() - started)
    assert metrics[0] == metrics[1]
    report["validation on Flickr8k dev (s)"] = {"first (captions computed and kept)": round(times[0], 1),
                                                "later (captions read)": round(times[1], 1)}
    finish(report, args.json)


if __name__ == "__main__":
    main()
