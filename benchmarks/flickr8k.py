"""The Flickr8k recipe's figures: clipforge beside open_clip's model + loss through the same loop, data and seeds.

    python benchmarks/flickr8k.py --recipe recipes/flickr8k.yaml --seeds 0 1 2 --json runs/bench/flickr8k.json
    python benchmarks/flickr8k.py --recipe recipes/flickr8k.yaml --seeds 0 --impls clipforge --skip-probe
    python benchmarks/flickr8k.py --impls open_clip-cached --json runs/bench/flickr8k.json   (adds the peer's rows)
    python benchmarks/flickr8k.py --speed 120 --rounds 2   (training samples/s only, side by side, same session)
    python benchmarks/flickr8k.py --evaluate runs/flickr8k/checkpoints/step-00002400 --skip-probe   (a trained model)

For each (implementation, seed): train with the recipe (``--seed`` and ``--output`` replaced), then measure
- Flickr8k test retrieval (1,000 images, 5,000 captions; image->text hits when any of the image's 5 captions ranks
  in the top k, text->image when its own image does), R@1/5/10 both ways;
- zero-shot top-1 on cifar10/test (10,000) and flowers/test (1,000), classes never trained on, with bare class names,
  "a photo of a {}." and the paper's template ensemble (CIFAR-10's 18; for flowers the Flowers102 set);
- a linear probe on CIFAR-10 (L-BFGS logistic regression on cifar10/train features, L2 chosen on a held-out part of
  train) and the few-shot curve k = 1, 2, 4, 8, 16 per class: CIFAR-10 examples drawn from cifar10/train, tested on
  cifar10/test; flowers (test only) split in two halves by index parity: examples drawn from the even half, tested
  on the odd half, where its zero-shot accuracy is also reported.

open_clip's peer is its own ``CLIP`` (``CustomTextCLIP`` for a Hugging Face text tower) and ``ClipLoss`` built from
the recipe's architecture with clipforge's initial weights, locked as open_clip locks towers. ``open_clip`` runs it
as open_clip does: dropout stays on in a locked Hugging Face tower, so the text tower runs every step (about 2 hours a
seed here). ``open_clip-cached`` gives it the recipe's text-feature cache (the frozen transformer's features computed
once, dropout-free, as clipforge's locked tower computes them): the same model and loss, the same training regime.
``--speed N`` compares training speed alone: each implementation trains N steps of the recipe on the first training
shard (a short cache fill), in alternating order for ``--rounds``, so both meet the same box in the same state;
samples/s of runs from different sessions are not comparable (the same box type runs 75-195 GFLOP/s).
Nothing here is chosen on a test split: the recipe was chosen on flickr8k/dev and cifar10/train (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import clipforge
from clipforge.bench.peers import OpenClipForTraining, OpenClipLoss
from clipforge.data import evaluation_set, open_source
from clipforge.evaluate.datasets import open_labelled
from clipforge.evaluate.features import embed_labelled
from clipforge.evaluate.linear_probe import few_shot, linear_probe
from clipforge.evaluate.metrics import topk_accuracy
from clipforge.evaluate.retrieval import embed_pairs, retrieval_metrics
from clipforge.models.layers import ResidualAttentionBlock
from clipforge.prompts import DEFAULT_TEMPLATES
from clipforge.train import TrainConfig, train
from clipforge.train.cli import read_config
from clipforge.train.loop import model_config_for
from clipforge.zeroshot import zero_shot_classifier

REPO = Path(__file__).resolve().parents[1]
SHOTS = (1, 2, 4, 8, 16)


def peer_model(cfg: TrainConfig, impl: str, seed: int):
    """open_clip's model and loss with clipforge's initial weights for this seed; (None, None) for clipforge, whose
    loop builds its own."""
    if impl not in ("open_clip", "open_clip-cached"):
        return None, None
    torch.manual_seed(seed)  # the same initial weights as clipforge's run with this seed
    ours = clipforge.create_model(model_config_for(cfg))
    ours.config = model_config_for(cfg)
    return OpenClipForTraining(ours), OpenClipLoss()


def train_one(recipe: dict, impl: str, seed: int, output: Path) -> tuple[torch.nn.Module, dict]:
    cfg = TrainConfig(**{**recipe, "seed": seed, "output": str(output), "progress": False})
    model, loss = peer_model(cfg, impl, seed)
    cfg.text_cache = cfg.text_cache and impl != "open_clip"  # open_clip as shipped runs its locked tower each step
    start = time.perf_counter()
    summary = train(cfg, model=model, loss_fn=loss)
    return summary["model"].eval(), {"train_seconds": time.perf_counter() - start, "steps": summary["steps"],
                                     "final_loss": summary["loss"], "val": summary["val"]}


@torch.no_grad()
def evaluate(model, tokenizer, data: Path, probe: bool = True) -> dict:
    preprocess = clipforge.Preprocess(model.image_size)
    result = {}
    pairs = evaluation_set(open_source(str(data / "flickr8k" / "test"), shuffle_buffer=0), preprocess, compact=True)
    images, texts = embed_pairs(model, tokenizer, pairs.images, pairs.captions)
    result["flickr8k_test"] = {**retrieval_metrics(images, texts, pairs.caption_images),
                               "images": len(pairs.images), "captions": len(pairs.captions)}
    for name in ("cifar10", "flowers"):
        dataset = open_labelled(data / name, "test")
        features, labels = embed_labelled(model, dataset.source, preprocess, progress=False)
        row = {}
        for prompt, templates in (("bare", ["{}"]), ("photo", list(DEFAULT_TEMPLATES)), ("ensemble", dataset.templates)):
            weights = zero_shot_classifier(model, tokenizer, dataset.classnames, templates)
            row[prompt] = topk_accuracy(features @ weights.cpu(), labels)[1]
        result[f"{name}_zeroshot"] = row
        if not probe:
            continue
        weights = zero_shot_classifier(model, tokenizer, dataset.classnames, dataset.templates)
        if name == "cifar10":
            train_set = open_labelled(data / name, "train")
            train_x, train_y = embed_labelled(model, train_set.source, preprocess, progress=False)
            logits, info = linear_probe(train_x, train_y, features, len(dataset.classnames))
            result["cifar10_linear_probe"] = {"acc1": topk_accuracy(logits, labels)[1], "l2": info["l2"]}
            pool_x, pool_y, test_x, test_y = train_x, train_y, features, labels
        else:  # flowers has a test split only: examples from the even half, accuracy on the odd half
            pool_x, pool_y, test_x, test_y = features[0::2], labels[0::2], features[1::2], labels[1::2]
        curve = few_shot(pool_x, pool_y, test_x, test_y, len(dataset.classnames), SHOTS, (0, 1, 2))
        result[f"{name}_fewshot"] = {"curve": {str(k): v for k, v in curve.items()},
                                     "zeroshot_same_test": topk_accuracy(test_x @ weights.cpu(), test_y)[1]}
    return result


def speed(recipe: dict, impls: list[str], steps: int, rounds: int, data: Path, output: Path) -> dict:
    """Median logged samples/s of ``steps`` training steps per implementation and round (the first two logged
    intervals, warm-up, left out), implementations alternating; and each run's final loss, which must agree."""
    short = {**recipe, "train_data": str(data / "flickr8k" / "train" / "train-000000.tar"), "steps": steps,
             "val_data": None, "save_every": steps, "log_every": 10}
    rates, losses = {impl: [] for impl in impls}, {impl: [] for impl in impls}
    for round_ in range(rounds):
        for impl in impls:
            folder = output / f"speed-{impl}-round{round_}"
            shutil.rmtree(folder, ignore_errors=True)  # a fresh run, never a resume
            _, info = train_one(short, impl, 0, folder)
            logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            rates[impl].append(statistics.median(r["samples_per_s"] for r in logged if "samples_per_s" in r and
                                                 r["step"] > 2 * short["log_every"]))
            losses[impl].append(info["final_loss"])
            print(f"round {round_} {impl}: {rates[impl][-1]:.1f} samples/s, final loss {info['final_loss']:.6f}",
                  flush=True)
    return {"steps": steps, "rounds": rounds, "samples_per_s": rates, "final_loss": losses,
            "median_samples_per_s": {impl: statistics.median(v) for impl, v in rates.items()},
            "image_tower": image_tower_speed(recipe, impls)}


@contextlib.contextmanager
def _last_block_unpooled():
    """clipforge's image tower as a plain ViT computes it: the last block on every token, the class token taken after
    (``ResidualAttentionBlock`` otherwise computes only the class token's query, projection and MLP there). Same
    output to float rounding: the ablation that says how much of the gap to open_clip is that one block."""
    pooled = ResidualAttentionBlock.forward

    def every_token(self, x, causal=False, pool_index=None, lean=False):
        out = pooled(self, x, causal, None, lean)
        return out if pool_index is None else out[torch.arange(x.shape[0], device=x.device), pool_index]

    ResidualAttentionBlock.forward = every_token
    try:
        yield
    finally:
        ResidualAttentionBlock.forward = pooled


def image_tower_speed(recipe: dict, impls: list[str], repeats: int = 5, profiled: int = 3) -> dict:
    """Where a loop step's time differs: each implementation's image tower alone, forward + backward of one recipe
    batch (median of ``repeats``, implementations alternating), the floating-point operations of one such step
    (``torch.utils.flop_counter``: what each computes, independent of the machine) and the self CPU seconds of its
    matrix multiplies and copies over ``profiled`` more steps. With clipforge, also ``clipforge-unpooled``: the same
    weights with the last block run on every token (``_last_block_unpooled``)."""
    cfg = TrainConfig(**{**recipe, "progress": False})
    variants = {}  # name -> (model, context it runs in)
    for impl in impls:
        model = peer_model(cfg, impl, 0)[0]
        if model is None:
            torch.manual_seed(0)
            model = clipforge.create_model(model_config_for(cfg))
        variants[impl] = (model.train(), contextlib.nullcontext)
        if impl == "clipforge":
            variants["clipforge-unpooled"] = (model, _last_block_unpooled)
    size = variants[impls[0]][0].image_size
    images = torch.randn(cfg.batch_size, 3, size, size)

    def step(variant):
        model, context = variants[variant]
        with context():
            model.zero_grad(set_to_none=True)
            model.encode_image(images).square().mean().backward()

    seconds = {variant: [] for variant in variants}
    for variant in variants:
        step(variant)  # warm-up
    for _ in range(repeats):
        for variant in variants:
            start = time.perf_counter()
            step(variant)
            seconds[variant].append(time.perf_counter() - start)
    result = {}
    for variant in variants:
        with FlopCounterMode(display=False) as counter:
            step(variant)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(profiled):
                step(variant)
        ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()
               if e.key in ("aten::mm", "aten::addmm", "aten::copy_")}
        result[variant] = {"fwd_bwd_s": statistics.median(seconds[variant]), "gflop": counter.get_total_flops() / 1e9,
                           f"self_cpu_s_over_{profiled}_steps": ops}
        print(f"image tower {variant}: forward + backward {result[variant]['fwd_bwd_s']:.3f} s, "
              f"{result[variant]['gflop']:.1f} GFLOP, {ops}", flush=True)
    return result


def median_table(runs: list[dict]) -> str:
    def cell(values):
        return f"{100 * statistics.median(values):.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"

    lines = []
    for impl in sorted({r["impl"] for r in runs}):
        mine = [r for r in runs if r["impl"] == impl]
        get = lambda key, sub: [r[key][sub] for r in mine]  # noqa: E731
        lines.append(f"{impl} ({len(mine)} seeds, median (min-max) %):")
        for k in (1, 5, 10):
            lines.append(f"  flickr8k test R@{k}: text->image {cell(get('flickr8k_test', f'text_to_image_R@{k}'))}, "
                         f"image->text {cell(get('flickr8k_test', f'image_to_text_R@{k}'))}")
        for name in ("cifar10", "flowers"):
            lines.append(f"  {name} zero-shot: " + ", ".join(
                f"{p} {cell(get(f'{name}_zeroshot', p))}" for p in ("bare", "photo", "ensemble")))
        if "cifar10_linear_probe" in mine[0]:
            lines.append(f"  cifar10 linear probe {cell(get('cifar10_linear_probe', 'acc1'))}")
        lines.append(f"  training minutes: {statistics.median(r['train_seconds'] for r in mine) / 60:.1f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "flickr8k.yaml")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "flickr8k-study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--impls", nargs="+", default=["clipforge", "open_clip-cached"],
                        choices=["clipforge", "open_clip", "open_clip-cached"])
    parser.add_argument("--skip-probe", action="store_true", help="no linear probe / few-shot curve (faster)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--speed", type=int, metavar="STEPS",
                        help="only compare training samples/s: STEPS steps per implementation on the first shard")
    parser.add_argument("--rounds", type=int, default=2, help="with --speed: rounds of alternating runs")
    parser.add_argument("--evaluate", metavar="CHECKPOINT", help="only measure this trained model (no training)")
    parser.add_argument("--image-size", type=int, help="with --evaluate: at this image size, its positions resized")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.evaluate:
        model, _, tokenizer = clipforge.load(args.evaluate, force_image_size=args.image_size)
        result = {"checkpoint": args.evaluate, "image_size": model.image_size,
                  **evaluate(model.eval(), tokenizer, args.data, probe=not args.skip_probe)}
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), **result},
                                            indent=1))
        return
    recipe = read_config(args.recipe)
    if args.speed:
        result = speed(recipe, args.impls, args.speed, args.rounds, args.data, args.output)
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), **result}, indent=1))
        return
    runs = json.loads(args.json.read_text())["runs"] if args.json and args.json.exists() else []
    done = {(r["impl"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for impl in args.impls:
            if (impl, seed) in done:  # a re-run continues where it stopped
                continue
            model, info = train_one(recipe, impl, seed, args.output / f"{impl}-seed{seed}")
            tokenizer = clipforge.get_tokenizer(model_config_for(TrainConfig(**recipe)))
            runs.append({"impl": impl, "seed": seed, **info, **evaluate(model, tokenizer, args.data,
                                                                     probe=not args.skip_probe)})
            print(json.dumps(runs[-1]), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                 "recipe": str(args.recipe), "runs": runs}, indent=1))
    print(median_table(runs))


if __name__ == "__main__":
    main()
