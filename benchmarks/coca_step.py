"""One clipforge CoCa training step alone (no open_clip beside it: at larger batches its step does not fit beside
ours in memory): median step time, or peak resident memory of the first step or of a step after a warm-up.

    python benchmarks/coca_step.py [--model coca_ViT-B-32] [--model-cfg JSON] [--batch 32] --measure time|first|warm

Forward, CoCa's loss (contrastive + 2 x caption) and backward on the first ``--batch`` Flickr8k training captions
(``--data``) and random images, fp32, the threads torch is given. One measure per process: run it once per measure
(and per commit, with PYTHONPATH pointing at another checkout's ``src``, to compare two versions). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json

import torch

import clipforge
from clipforge.bench.corpora import flickr8k_captions
from clipforge.loss import ClipLoss, CoCaLoss
from step_measure import measure_step  # beside this script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="coca_ViT-B-32")
    p.add_argument("--model-cfg", default="{}", help="JSON overrides of the model's config")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--measure", choices=("time", "first", "warm"), required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    model = clipforge.create_model(args.model, **json.loads(args.model_cfg)).train()
    tokens = clipforge.get_tokenizer(args.model, context_length=model.text.context_length)(
        flickr8k_captions(args.data, args.batch))
    images = torch.randn(args.batch, 3, model.image_size, model.image_size)
    loss_fn = CoCaLoss(ClipLoss())

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(images, tokens)
        # the caption fields by name: caption_nll since the seventeenth session, caption_logits before
        fields = {k: getattr(out, k) for k in ("caption_logits", "caption_nll", "caption_labels") if hasattr(out, k)}
        loss = loss_fn(*out[:3], **fields)
        loss.backward()
        return loss.item()

    result = {"model": args.model, "batch": args.batch, "caption_tokens": int((tokens[:, 1:] != 0).sum()),
              "threads": torch.get_num_threads()}
    result.update(measure_step(step, args.measure, args.repeats))
    if args.measure == "time":
        result["samples_per_s"] = args.batch / result["median_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
