"""A BERT text tower without transformers (models/bert.py): a command's start-up and peak memory on a checkpoint
with one, and its text embedding speed, against transformers' BertModel (what clipforge ran before and open_clip
runs for a Hugging Face text tower).

    git worktree add /tmp/clipforge-before 2525a9a      # the code before, for the start-up peer rows
    python benchmarks/bert_tower.py runs/flickr8k/checkpoints/step-00002400 --before /tmp/clipforge-before \\
        --json runs/bench/bert-tower.json

Start-up: `clipforge classify` of one Flickr8k photo among four labels, the whole command (import, load, tokenize,
embed, print), once per source tree (this one; `--before`'s `src` first on PYTHONPATH), interleaved, 5 repeats.
Text embedding: 2,048 Flickr8k test captions (each photo's second to fifth) through the checkpoint's text tower in
batches of 256, tokenization included, with its own transformer and tokenizer and with transformers' BertModel (the
same weights) and AutoTokenizer swapped in; 3 interleaved repeats; the largest difference between the two's
normalised features beside them. Medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import finish, machine, timed_command
from text_padding import captions

REPO = Path(__file__).resolve().parents[1]


def start_up(checkpoint: str, trees: dict[str, Path], repeats: int) -> dict:
    import tarfile

    data = REPO.parent / "shared" / "data" / "flickr8k" / "test"
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(sorted(data.glob("*.tar"))[0]) as shard:
        photo = Path(scratch) / "photo.jpg"
        member = next(m for m in shard if m.name.endswith(".jpg"))
        photo.write_bytes(shard.extractfile(member).read())
        runs: dict = {name: [] for name in trees}
        for _ in range(repeats):
            for name, src in trees.items():
                command = [sys.executable, "-m", "clipforge.cli", "classify", "--model", checkpoint, "--labels",
                           "dog,cat,person,car", str(photo), "--no-progress"]
                env = {**os.environ, "PYTHONPATH": str(src)}
                subprocess.run(command, env=env, check=True, capture_output=True)  # the same files cached for both
                runs[name].append(timed_command(command, env))
    return {name: {"seconds": round(statistics.median(s for s, _ in times), 2),
                   "peak_rss_gb": round(statistics.median(gb for _, gb in times), 3)} for name, times in runs.items()}


def text_embedding(checkpoint: str, data: str, n: int, batch: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import clipforge
    from clipforge.models.hf_text import resolve_hf_model

    torch.set_num_threads(2)
    texts = captions(data, n)
    model, _, tokenizer = clipforge.load(checkpoint)
    tower = model.text
    folder = resolve_hf_model(model.config["text_cfg"]["hf_model_name"])
    hf_logging.set_verbosity_error()  # its load report lists the pooler head left out on purpose
    hf_logging.disable_progress_bar()
    theirs = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
    theirs.load_state_dict(tower.transformer.state_dict(), strict=False)
    auto = AutoTokenizer.from_pretrained(folder)
    length = tower.context_length

    def their_tokens(chunk):
        return auto(chunk, padding="max_length", truncation=True, max_length=length, return_tensors="pt")["input_ids"]

    ours_transformer = tower.transformer
    ways = {"clipforge (models/bert.py, tokenizers)": (ours_transformer, tokenizer),
            "transformers BertModel + AutoTokenizer": (theirs, their_tokens)}
    seconds: dict = {way: [] for way in ways}
    features: dict = {}
    with torch.no_grad():
        for _ in range(repeats):
            for way, (transformer, tokenize) in ways.items():
                tower.transformer = transformer
                started = time.perf_counter()
                out = [model.encode_text(tokenize(texts[i:i + batch]), normalize=True)
                       for i in range(0, len(texts), batch)]
                seconds[way].append(time.perf_counter() - started)
                features[way] = torch.cat(out)
    tower.transformer = ours_transformer
    first, second = features.values()
    return {"texts": len(texts), "batch": batch,
            "texts_per_s": {way: round(len(texts) / statistics.median(times)) for way, times in seconds.items()},
            "max_abs_feature_difference": float((first - second).abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint with a BERT text tower (the Flickr8k recipe's MiniLM)")
    p.add_argument("--before", type=Path, help="a worktree of clipforge before models/bert.py (start-up peer rows)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "test"))
    p.add_argument("--texts", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    trees = {"clipforge": REPO / "src", **({"clipforge before (transformers)": args.before / "src"}
                                            if args.before else {})}
    report = {"machine": machine(), "checkpoint": args.checkpoint,
              "classify one photo (median)": start_up(args.checkpoint, trees, args.repeats),
              "text embedding (median)": text_embedding(args.checkpoint, args.data, args.texts, args.batch,
                                                        max(3, args.repeats // 2 + 1))}
    finish(report, args.json)


if __name__ == "__main__":
    main()
