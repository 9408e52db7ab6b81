"""One LiMBer mapping training step alone: median step time, or peak resident memory of the first step or of a step
after a warm-up, of ``caption_loss`` (the frozen SmolLM2-135M reading image prefixes and Flickr8k captions) and its
backward into the map.

    python benchmarks/limber_step.py [--batch 16] [--prefix-tokens 4] [--prompt "A picture of"] [--grad-checkpointing] \
        --measure time|first|warm|heldout

Random 512-wide image features (a ViT-B-32's width; the LM's cost does not depend on them) and the first ``--batch``
Flickr8k training captions (``--data``), fp32, the threads torch is given. One measure per process: run it once per
measure (and per commit, with PYTHONPATH pointing at another checkout's ``src``, to compare two versions). Prints
one JSON line.
"""
from __future__ import annotations

import argparse
import json

import torch

from clipforge.bench.corpora import flickr8k_captions
from clipforge.captioning.limber import ImageToPrefix, MappingConfig, caption_loss, held_out_loss, load_language_model
from step_measure import measure_step  # beside this script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prefix-tokens", type=int, default=4)
    p.add_argument("--prompt", default="A picture of")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the LM's layers in backward")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--measure", choices=("time", "first", "warm", "heldout"), required=True,
                   help="heldout: median seconds of held_out_loss (scoring, no gradient) over --batch images x 5 captions")
    args = p.parse_args()
    lm, tokenizer = load_language_model("smollm2")
    if args.grad_checkpointing:
        from clipforge.captioning.limber import recompute_activations

        recompute_activations(lm)
    torch.manual_seed(0)  # after loading: reading the cached conversion draws random numbers, reading the GGUF does not
    mapping = ImageToPrefix(MappingConfig(image_dim=512, lm_dim=lm.config.hidden_size,
                                          prefix_tokens=args.prefix_tokens, prompt=args.prompt))
    mapping.start_from(lm)
    with torch.no_grad():
        mapping.proj.weight.normal_(std=0.01)  # image-dependent prefixes, as after some training
    captions = flickr8k_captions(args.data, args.batch)
    if len(captions) < args.batch:
        raise SystemExit(f"need {args.batch} Flickr8k captions under {args.data}/flickr8k/train")
    features = torch.randn(args.batch, 512)

    def step() -> float:
        mapping.zero_grad(set_to_none=True)
        loss = caption_loss(mapping, lm, tokenizer, features, captions)
        loss.backward()
        return loss.item()

    result = {"batch": args.batch, "prefix_tokens": args.prefix_tokens, "prompt": args.prompt,
              "grad_checkpointing": args.grad_checkpointing,
              "caption_tokens": sum(len(tokenizer(c, add_special_tokens=False).input_ids) + 1 for c in captions),
              "threads": torch.get_num_threads()}
    if args.measure == "heldout":  # timed as a step is: the median after one warm-up
        texts = flickr8k_captions(args.data, 5 * args.batch)
        groups = [texts[5 * i:5 * i + 5] for i in range(args.batch)]
        result.update(measure_step(lambda: held_out_loss(mapping, lm, tokenizer, features, groups), "time",
                                   args.repeats))
        result["held_out_loss"] = result.pop("loss")
    else:
        result.update(measure_step(step, args.measure, args.repeats))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
