"""CoCa on CPU, clipforge vs open_clip on the same weights: captioning with ``generate`` (greedy: open_clip's
``generation_type="top_k", top_k=1``; with ``--beams``, its beam search) and image embedding; with ``--train``, one
training step of both losses.

    python benchmarks/coca.py [--model coca_ViT-B-32] [--batch 8] [--length 30] [--repeats 5] [--json out.json]
    PYTHONPATH=.venv/peers/transformers-4 python benchmarks/coca.py --beams 6 --beam-groups 3 [...]
    python benchmarks/coca.py --train [--data ../shared/data] [--batch 16] [--repeats 5] [--json out.json]

open_clip's random initialisation (its decoder's vocabulary projection drawn, as open_clip leaves it empty), loaded
into clipforge; captions checked identical token for token, then both timed taking turns
(``bench.timing.interleaved``); fp32, the threads torch is given. Random weights rarely emit end-of-text, so every
caption runs to ``--length`` tokens: the most work a caption can take. open_clip 3.3 turns ``generate`` off when
transformers lacks ``BeamSearchScorer`` (transformers 5.x); its greedy path needs only the logits warpers, switched
back on here. Its beam search (``--beams``, open_clip's default generation: 6 beams in 3 groups) needs transformers
4.x: the README's test command installs 4.56 in ``.venv/peers/transformers-4``, put first on PYTHONPATH.

``--train``: forward, CoCa's loss (contrastive + 2 x caption, open_clip's default weights) and backward, on the
first ``--batch`` Flickr8k training captions (``--data``; else a fixed set of captions of similar length): losses
and gradients checked equal first, then timed taking turns; each one's peak memory above the step's start
(``bench.timing.rss_peak_growth``) in a process of its own, after a warm-up step.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from clipforge.bench.timing import interleaved, summary
from clipforge.files import write_json


FALLBACK_CAPTIONS = ["A black dog is running through the grass .", "Two children play on the beach near the water .",
                     "A man in a red jacket climbs a rock wall .", "A girl is sitting on a bench reading a book .",
                     "A brown dog carries a stick in its mouth .", "People walk down a busy city street at night ."]


def paired_models(model: str):
    """(open_clip's CoCa on random weights, clipforge's loaded with the same weights); open_clip leaves the decoder's
    vocabulary projection as ``torch.empty`` made it, so it is drawn first."""
    import open_clip

    import clipforge

    torch.manual_seed(0)
    theirs = open_clip.create_model(model, pretrained=None)
    with torch.no_grad():
        vocabulary = theirs.text_decoder.text_projection
        torch.nn.init.normal_(vocabulary, std=vocabulary.shape[0] ** -0.5)
    path = Path(tempfile.mkdtemp(prefix="coca-bench-")) / "w.pt"
    torch.save(theirs.state_dict(), path)
    return theirs, clipforge.load(model, pretrained=str(path))[0]


def training_steps(args):
    """{"clipforge": step, "open_clip": step}: forward, CoCa's loss, backward; each step returns its loss."""
    from open_clip.loss import CoCaLoss as OpenClipCoCaLoss

    import clipforge
    from clipforge.bench.corpora import flickr8k_captions
    from clipforge.loss import ClipLoss, CoCaLoss

    theirs, ours = (model.train() for model in paired_models(args.model))
    captions = flickr8k_captions(args.data, args.batch) if args.data else []
    captions = (captions or FALLBACK_CAPTIONS * (args.batch // len(FALLBACK_CAPTIONS) + 1))[: args.batch]
    tokens = clipforge.get_tokenizer(args.model)(captions)
    images = torch.randn(args.batch, 3, ours.image_size, ours.image_size)
    their_loss, our_loss = OpenClipCoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0), CoCaLoss(ClipLoss())

    def step_theirs():
        theirs.zero_grad(set_to_none=True)
        out = theirs(images, tokens)
        loss = sum(their_loss(out["image_features"], out["text_features"], out["logits"], out["labels"],
                              out["logit_scale"]))
        loss.backward()
        return loss.detach()

    def step_ours():
        ours.zero_grad(set_to_none=True)
        out = ours(images, tokens)
        loss = our_loss(*out[:3], caption_nll=out.caption_nll, caption_labels=out.caption_labels)
        loss.backward()
        return loss.detach()

    return {"clipforge": step_ours, "open_clip": step_theirs}, (theirs, ours), tokens


def train_memory(args, impl: str) -> dict:
    """One process's peak memory of a training step (after a warm-up step)."""
    from clipforge.bench.timing import rss_peak_growth

    steps, _, _ = training_steps(args)
    steps[impl]()
    peak = rss_peak_growth()
    steps[impl]()
    return {"impl": impl, "peak_mb": peak()}


def bench_training(args) -> dict:
    steps, (theirs, ours), tokens = training_steps(args)
    losses = {impl: step().item() for impl, step in steps.items()}
    assert abs(losses["clipforge"] - losses["open_clip"]) <= 1e-4 * abs(losses["open_clip"]), losses
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    worst = max(((p.grad - their_grads[n]).abs().max() / their_grads[n].abs().max().clamp_min(1e-12)).item()
                for n, p in ours.named_parameters() if p.grad is not None)
    assert worst <= 1e-3, f"gradients differ (relative {worst:.2e})"
    memory = {}
    for impl in steps:
        command = [sys.executable, __file__, "--train", "--one-train", impl, "--model", args.model,
                   "--batch", str(args.batch)] + (["--data", args.data] if args.data else [])
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[impl] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    labels = tokens[:, 1:] != 0
    return {"losses": losses, "gradients_max_relative_difference": worst,
            "caption_tokens": int(labels.sum()), "caption_positions": int(labels.numel()),
            "step": summary(interleaved(steps, args.repeats), args.batch, "samples_per_s"),
            "peak_mb": memory, "memory_ratio": memory["clipforge"] / memory["open_clip"]}


def bench_captioning(args) -> dict:
    from open_clip import coca_model
    from transformers import TopKLogitsWarper

    if args.beams and not coca_model._has_transformers:
        raise SystemExit("--beams: open_clip's beam search needs transformers 4.x (BeamSearchScorer): run with "
                         "PYTHONPATH=.venv/peers/transformers-4 (the README's test command installs it there)")
    coca_model._has_transformers = True
    coca_model.GENERATION_TYPES["top_k"] = TopKLogitsWarper
    theirs, ours = paired_models(args.model)
    theirs.eval()
    size = ours.image_size
    images = torch.randn(args.batch, 3, size, size)
    beams = {"num_beams": args.beams, "num_beam_groups": args.beam_groups} if args.beams else {}

    def generate_ours():
        return ours.generate(images, max_length=args.length, **beams)

    def generate_theirs():
        if beams:
            return theirs.generate(images, seq_len=args.length, **beams)
        return theirs.generate(images, generation_type="top_k", top_k=1, seq_len=args.length)

    same = torch.equal(generate_ours(), generate_theirs())
    assert same, "captions differ"

    def embed(model):
        def run():
            with torch.no_grad():
                model.encode_image(images)
        return run

    return {"model": args.model, "image_size": size, "batch": args.batch, "length": args.length,
            "decoding": beams or "greedy", "captions_identical": same,
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "generate": summary(interleaved({"clipforge": generate_ours, "open_clip": generate_theirs},
                                            args.repeats), args.batch, "captions_per_s"),
            "image_embed": summary(interleaved({"clipforge": embed(ours), "open_clip": embed(theirs)},
                                               args.repeats), args.batch, "images_per_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="coca_ViT-B-32")
    p.add_argument("--batch", type=int, default=None, help="[8 for captioning, 16 with --train]")
    p.add_argument("--length", type=int, default=30, help="caption length in tokens, start and end included")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--beams", type=int, help="time open_clip's beam search with this many beams instead of greedy")
    p.add_argument("--beam-groups", type=int, default=3, help="with --beams: open_clip's num_beam_groups [3]")
    p.add_argument("--train", action="store_true", help="time a training step instead of captioning")
    p.add_argument("--data", help="--train: the shared data folder, for Flickr8k's captions")
    p.add_argument("--one-train", help=argparse.SUPPRESS)  # a child process's memory measurement
    p.add_argument("--json")
    args = p.parse_args()
    args.batch = args.batch or (16 if args.train else 8)
    if args.train and args.batch < 8:
        p.error("--train --batch below 8: the resident-memory measure cannot see a step that small after its warm-up "
                "(its peak would read as noise, even negative)")
    if args.one_train:
        print(json.dumps(train_memory(args, args.one_train)))
        return
    if args.train:
        result = {"model": args.model, "batch": args.batch, "machine": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "captions": "flickr8k" if args.data else "fallback",
                  **bench_training(args)}
    else:
        result = bench_captioning(args)
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
