"""Scoring class prompts by likelihood with the words they share read once, against scoring each prompt whole.

Two scorers, each timed beside its old whole-prompt path in the same run (median seconds per image of
``--repeats``), with the largest score difference between the two and whether they pick the same class:
- LiMBer's ``rank_captions`` on SmolLM2-135M (a random map; a trained one costs the same): the image prefix, prompt
  and "a photo of a" go through the LM once per image and each candidate reads them from the KV cache; the old path
  is ``caption_log_likelihood`` over every (image, caption) pair, 64 per call.
- the word-by-word objective's ``zero_shot_logits`` (``--caption-checkpoint``, from ``benchmarks/objectives.py``) on
  random image embeddings: all prompts as one tree per image (``caption_lm.CaptionTree``); the old path runs each
  prompt through the causal decoder alone (``next_word_logits``).
The candidates are CIFAR-10's ten classes.

  .venv/bin/python benchmarks/prompt_scoring_speed.py \\
      --caption-checkpoint runs/objectives/word-by-word/checkpoints/step-00002400 --json runs/bench/prompt-scoring.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def timed(score, repeats: int, images: int):
    """``(median seconds per image, last scores)``, after a warm-up call (first calls allocate and pick kernels)."""
    score(2)
    times, scores = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        scores = score(images)
        times.append((time.perf_counter() - began) / images)
    return statistics.median(times), scores


def compare(name: str, setting: str, whole, shared, repeats: int, images: int) -> dict:
    whole_s, whole_scores = timed(whole, repeats, images)
    shared_s, shared_scores = timed(shared, repeats, images)
    finite = whole_scores.isfinite()
    run = {"scorer": name, "setting": setting, "s_per_image_whole": whole_s, "s_per_image_shared": shared_s,
           "speedup": whole_s / shared_s,
           "max_abs_score_difference": (whole_scores[finite] - shared_scores[finite]).abs().max().item(),
           "mean_abs_score": whole_scores[finite].abs().mean().item(),
           "same_choice": (whole_scores.argmax(1) == shared_scores.argmax(1)).float().mean().item()}
    print(json.dumps(run))
    return run


def limber_runs(images: int, repeats: int) -> list[dict]:
    from clipforge.captioning.limber import ImageToPrefix, MappingConfig, caption_log_likelihood, \
        load_language_model, rank_captions

    lm, tokenizer = load_language_model("smollm2")
    candidates = [f"a photo of a {c}." for c in CIFAR10]
    runs = []
    for prompt in ("", "A picture of"):
        torch.manual_seed(0)
        mapping = ImageToPrefix(MappingConfig(64, lm.config.hidden_size, 4, prompt=prompt))
        mapping.start_from(lm)
        torch.nn.init.normal_(mapping.proj.weight, std=0.02)
        features = torch.randn(images, 64)

        def whole(n):
            pairs = [(i, c) for i in range(n) for c in range(len(candidates))]
            scores = torch.empty(n, len(candidates))
            for start in range(0, len(pairs), 64):
                rows, columns = zip(*pairs[start:start + 64])
                scores[list(rows), list(columns)] = caption_log_likelihood(
                    mapping, lm, tokenizer, features[list(rows)], [candidates[c] for c in columns])
            return scores

        runs.append(compare("limber rank_captions (SmolLM2-135M)", f"4 prefix tokens, prompt {prompt!r}", whole,
                            lambda n: rank_captions(mapping, lm, tokenizer, features[:n], candidates), repeats,
                            images))
    return runs


def caption_lm_runs(checkpoint: str, images: int, repeats: int) -> list[dict]:
    from clipforge import caption_lm
    from clipforge.prompts import prompt_texts

    model, _ = caption_lm.load(checkpoint)
    torch.manual_seed(0)
    embeddings = torch.randn(images, model.image_to_prefix.in_features)
    runs = []
    for templates in (["a photo of a {}."], ["a {}.", "a photo of a {}.", "{}"]):
        tokens = model.vocabulary(prompt_texts(CIFAR10, templates))

        @torch.no_grad()
        def whole(n):  # each prompt alone through the causal decoder, 256 images at a time
            columns = []
            for row in tokens:
                one = row[: int(row.ne(caption_lm.PAD).sum())][None]
                per_image = []
                for start in range(0, n, 256):
                    batch = embeddings[start:min(n, start + 256)]
                    log_p = torch.log_softmax(model.next_word_logits(batch, one.expand(len(batch), -1)), -1)
                    per_image.append(log_p.gather(-1, one[:, 1:].expand(len(batch), -1)[..., None]).sum(dim=(1, 2)))
                columns.append(torch.cat(per_image))
            return torch.stack(columns, 1).view(n, len(CIFAR10), len(templates)).mean(2)

        runs.append(compare(f"word-by-word zero_shot_logits ({model.decoder.layers} layers, width "
                            f"{model.decoder.width}, {len(model.vocabulary)} words)", f"templates {templates}", whole,
                            lambda n: caption_lm.zero_shot_logits(model, embeddings[:n], CIFAR10, templates), repeats,
                            images))
    return runs


def main() -> None:
    from clipforge.environment import run_environment

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-images", type=int, default=40, help="images for the LiMBer ranking [40]")
    p.add_argument("--caption-checkpoint", help="a word-by-word checkpoint (benchmarks/objectives.py); else skipped")
    p.add_argument("--caption-images", type=int, default=2000, help="image embeddings for the word-by-word model")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    result = {"environment": run_environment(), "runs": limber_runs(args.lm_images, args.repeats)}
    if args.caption_checkpoint:
        result["runs"] += caption_lm_runs(args.caption_checkpoint, args.caption_images, args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
