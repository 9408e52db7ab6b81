"""Memory and time of training's validation set: held as uint8 pixels (``data.evaluation_set(compact=True)``, what
``clipforge train --val-data`` holds now), as float32 tensors (what it held before), and open_clip's way, which holds
nothing and decodes the validation shards again at every validation (``open_clip_train.train.evaluate`` over a
DataLoader of the same samples, one caption each, as its validation data gives). Each way runs in a fresh process on
the same seeded random ViT-B-32 at 224 pixels, decoding in that process, and validates ``--validations`` times; the
two held ways must give the same metrics. The held ways also time reading their images back as batches of 256
(median of 5). The validation times are not like for like: ours embeds and scores every caption of each image
(Flickr8k: five), open_clip's one.

    python benchmarks/validation_memory.py --data ../shared/data --images 1000 --json runs/bench/validation-memory.json
"""
from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import fresh_process

WAYS = ("float32", "uint8", "open_clip")


def rss_gb() -> float:
    """This process's resident memory now (Linux), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def run_one(way: str, data: Path, images: int, validations: int) -> dict:
    import clipforge
    from clipforge.data import evaluation_set, open_source
    from clipforge.data.pipeline import evaluation_samples
    from clipforge.train.validation import validate

    torch.manual_seed(0)  # the same random weights in every process
    model, preprocess, tokenizer = clipforge.load("ViT-B-32")
    source = open_source(str(data / "flickr8k" / "dev"), shuffle_buffer=0)
    before, start = rss_gb(), time.perf_counter()
    if way != "open_clip":
        val_set = evaluation_set(source, preprocess, images, compact=way == "uint8")
    held_gb, decode_s = rss_gb() - before, time.perf_counter() - start
    read_back_s = None
    if way != "open_clip":  # the held images read back as normalised batches, as validate reads them
        read_back_s = statistics.median(_read_back(val_set.images) for _ in range(5))
    seconds, metrics = [], None
    for _ in range(validations):
        start = time.perf_counter()
        if way == "open_clip":
            metrics = open_clip_validation(model, preprocess, tokenizer, source, images, evaluation_samples)
        else:
            metrics = validate(model, tokenizer, val_set, "cpu")
        seconds.append(time.perf_counter() - start)
    return {"way": way, "captions_embedded": images if way == "open_clip" else len(val_set.captions),
            "held_gb": round(held_gb, 3) if way != "open_clip" else 0.0,
            "decode_once_s": round(decode_s, 1) if way != "open_clip" else None,
            "read_back_s": None if read_back_s is None else round(read_back_s, 3),
            "validation_s": [round(s, 1) for s in seconds], "peak_rss_gb": round(resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3), "metrics": {k: round(v, 5) for k, v in metrics.items()}}


def _read_back(images, batch_size: int = 256) -> float:
    """Seconds to stack every held image into batches of ``batch_size`` (a list of tensors, or ``HeldPixels``
    normalising its uint8 pixels as they are read)."""
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        torch.stack(images[first:first + batch_size])
    return time.perf_counter() - start


def open_clip_validation(model, preprocess, tokenizer, source, images: int, evaluation_samples) -> dict:
    """open_clip's training validation, its own code, over a DataLoader that decodes the samples again."""
    from open_clip_train.train import evaluate

    class Samples(torch.utils.data.IterableDataset):
        def __iter__(self):
            for image, texts, _, _ in evaluation_samples(source, images):
                yield preprocess(image), tokenizer(texts[:1])[0]

    class AsDict(torch.nn.Module):  # open_clip's evaluate reads the forward's outputs by name
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, images, texts):
            out = self.clip(images, texts)
            return {"image_features": out.image_features, "text_features": out.text_features,
                    "logit_scale": out.logit_scale}

    loader = torch.utils.data.DataLoader(Samples(), batch_size=256, num_workers=0)
    loader.num_samples = images
    args = SimpleNamespace(device="cpu", precision="fp32", val_frequency=1, epochs=1, distributed=False,
                           horovod=False, zeroshot_frequency=0, save_logs=False, wandb=False, rank=0, local_rank=0)
    found = evaluate(AsDict(model), {"val": SimpleNamespace(dataloader=loader)}, 1, args)
    return {k: v for k, v in found.items() if k.endswith(("R@1", "R@5", "R@10"))}


def main() -> int:
    parser = fresh_process.parser(__doc__, WAYS, 1000, "the first N images of flickr8k/dev")
    parser.add_argument("--validations", type=int, default=2, help="validations per way (a run validates often)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.data, args.images, args.validations)))
        return 0
    rows = []
    for way in WAYS:
        row = fresh_process.row(__file__, way, args, ("data", "images", "validations", "threads"))
        rows.append(row)
        print(f"{way:>9}: held {row['held_gb']:.3f} GB  peak RSS {row['peak_rss_gb']:.2f} GB  validations "
              f"{row['validation_s']} s  (decoded once: {row['decode_once_s']} s; read back: {row['read_back_s']} s; "
              f"{row['captions_embedded']} captions embedded)", flush=True)
    agree = rows[0]["metrics"] == rows[1]["metrics"]
    result = {"images": args.images, "validations": args.validations, "threads": args.threads, "rows": rows,
              "held_metrics_agree": agree,
              "ratios": {"held_uint8_vs_float32": round(rows[1]["held_gb"] / rows[0]["held_gb"], 3),
                         "peak_rss_uint8_vs_float32": round(rows[1]["peak_rss_gb"] / rows[0]["peak_rss_gb"], 3),
                         "peak_rss_uint8_vs_open_clip": round(rows[1]["peak_rss_gb"] / rows[2]["peak_rss_gb"], 3)}}
    return fresh_process.finish(result, agree, args.json, "held metrics")


if __name__ == "__main__":
    raise SystemExit(main())
