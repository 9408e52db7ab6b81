"""The CLIP paper's efficiency claim (its Figure 2) at our scale: zero-shot accuracy against images seen, for the
contrastive objective, for predicting the caption's bag of words and for predicting it word by word, on the same
image tower and data.

    python benchmarks/objectives.py --recipe recipes/flickr8k.yaml --json docs/results/objectives.json \\
        --plot docs/img/objectives.png

Runs (flickr8k/train, the recipe's image tower, augmentation, batch size and step budget; checkpoints along the way):
- contrastive, text tower from scratch (the paper's setting: nothing pretrained);
- contrastive, the recipe's locked pretrained MiniLM text tower;
- bag of words (``--objective bow``): the same image tower and a linear head over the 1000 most frequent caption
  words; zero-shot by the mean log-probability of each class name's words (no prompt), and by the same less the
  words' log-frequency in the training captions (``*_word_prior``: chosen over the plain rule on a cifar10/train
  subset, since the plain rule names the commonest caption word's class for nearly every image).
- word by word (``--objective caption``): the same image tower and a causal decoder the size of the zoo model's
  text tower predicting the caption's words (vocabulary of 5000); zero-shot by the likelihood of each class's prompt
  (``--caption-template``), and by the same less the prompt's mean likelihood over 500 flickr8k/train images
  (``*_prompt_prior``), both chosen with ``--caption-dev`` on a cifar10/train subset, since the plain rule names one
  class for nearly every image.
Zero-shot top-1 on cifar10/test and flowers/test at every checkpoint ("a photo of a {}." for the contrastive runs).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import clipforge
from clipforge import bow, caption_lm
from clipforge.bench.corpora import flickr8k_captions
from clipforge.evaluate.datasets import open_labelled
from clipforge.evaluate.features import embed_labelled
from clipforge.evaluate.metrics import pyplot, topk_accuracy
from clipforge.train import TrainConfig, train
from clipforge.train.checkpoints import checkpoint_dirs
from clipforge.train.cli import read_config
from clipforge.zeroshot import zero_shot_classifier

REPO = Path(__file__).resolve().parents[1]
BOW_VOCAB = 1000  # the bag-of-words head: the 1000 most frequent caption words
CAPTION_VOCAB = 5000  # the word-by-word model's vocabulary: nearly every word of the training captions
CAPTION_TEMPLATES = ("a {}.", "a photo of a {}.", "{}")  # candidates, chosen on development data (--caption-dev)
PRIOR_IMAGES = caption_lm.PRIOR_IMAGES  # flickr8k/train images (training data) the word-by-word prompt prior is averaged over


def runs(recipe: dict) -> dict:
    """name -> the settings that differ from the recipe."""
    scratch_text = {"text_model": None, "lock_text": False, "text_cache": False}  # the zoo model's own text tower
    return {"contrastive, text from scratch": scratch_text,
            "contrastive, locked MiniLM text": {},
            "bag of words": {**scratch_text, "objective": "bow", "bow_vocab": BOW_VOCAB},
            "word by word": {**scratch_text, "objective": "caption", "bow_vocab": CAPTION_VOCAB}}


@torch.no_grad()
def zero_shot(folder: Path, data: Path, training_captions: list[str], template: str = "a {}.") -> dict:
    config = json.loads((folder / "config.json").read_text())["model_cfg"]
    if config.get("objective") == "caption":
        return _caption_zero_shot(folder, data, template, training_captions)
    if config.get("objective") == "bow":
        model, preprocess = bow.load(str(folder))
    else:
        model, preprocess, tokenizer = clipforge.load(str(folder))
    out = {}
    if config.get("objective") == "bow":
        prior = bow.word_log_prior(model.vocabulary, training_captions)
    for name in ("cifar10", "flowers"):
        dataset = open_labelled(data / name, "test")
        if config.get("objective") == "bow":
            images, labels = _images(dataset.source)
            log_probs = torch.cat([model.word_log_probs(torch.stack([preprocess(i) for i in images[s:s + 256]]))
                                   for s in range(0, len(images), 256)])
            logits = bow.zero_shot_logits(log_probs, model.vocabulary, dataset.classnames)
            with_prior = bow.zero_shot_logits(log_probs, model.vocabulary, dataset.classnames, prior=prior)
            out[f"{name}_word_prior"] = topk_accuracy(with_prior, torch.as_tensor(labels))[1]
            out[f"{name}_named_classes"] = sum(bool(i) for i in bow.class_word_indices(model.vocabulary,
                                                                                      dataset.classnames))
        else:
            features, labels = embed_labelled(model, dataset.source, preprocess, progress=False)
            logits = features @ zero_shot_classifier(model, tokenizer, dataset.classnames, ["a photo of a {}."])
        out[name] = topk_accuracy(logits, torch.as_tensor(labels))[1]
    return out


def _caption_embeddings(model, preprocess, source) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw image embeddings, what the word-by-word decoder reads; labels) of a labelled source."""
    images, labels = _images(source)
    embeddings = torch.cat([model.encode_image(torch.stack([preprocess(i) for i in images[s:s + 256]]))
                            for s in range(0, len(images), 256)])
    return embeddings, torch.as_tensor(labels)


def _training_image_embeddings(model, preprocess, data: Path, n: int = PRIOR_IMAGES) -> torch.Tensor:
    """Image embeddings of the first ``n`` flickr8k/train images: the references for the word-by-word prompt prior
    (training data, so no statistic of an evaluated image enters its own score)."""
    import random
    from collections import Counter
    from itertools import islice

    from clipforge.data.pipeline import decode_sample
    from clipforge.data.sources import open_source

    samples = islice(open_source(str(data / "flickr8k" / "train")).samples(0, 1, 0, 0, Counter()), n)
    images = [preprocess(decode_sample(raw, random.Random(0))[0]) for raw in samples]
    return torch.cat([model.encode_image(torch.stack(images[s:s + 256])) for s in range(0, len(images), 256)])


@torch.no_grad()
def _caption_zero_shot(folder: Path, data: Path, template: str, training_captions: list[str]) -> dict:
    """Zero-shot top-1 of a word-by-word model: each class prompt's likelihood given the image, plainly and less the
    prompt's prior (``*_prompt_prior``, chosen on development data: the plain rule names one class for every image).
    ``*_prompt_prior_bow_classes``: the same on the images of the classes the bag-of-words run can name, choosing
    among those only (its vocabulary names fewer classes; this compares the two on equal terms)."""
    model, preprocess = caption_lm.load(str(folder))
    references = _training_image_embeddings(model, preprocess, data)
    bow_vocabulary = bow.Vocabulary.from_captions(training_captions, BOW_VOCAB)
    out = {}
    for name in ("cifar10", "flowers"):
        dataset = open_labelled(data / name, "test")
        embeddings, labels = _caption_embeddings(model, preprocess, dataset.source)
        logits = caption_lm.zero_shot_logits(model, embeddings, dataset.classnames, [template])
        prior = caption_lm.prompt_log_prior(model, references, dataset.classnames, [template])
        with_prior = logits - prior  # as zero_shot_logits(prior=prior), without scoring every prompt again
        out[name] = topk_accuracy(logits, labels)[1]
        out[f"{name}_prompt_prior"] = topk_accuracy(with_prior, labels)[1]
        shared = torch.tensor([bool(i) for i in bow.class_word_indices(bow_vocabulary, dataset.classnames)])
        if shared.any():
            among = with_prior.masked_fill(~shared, float("-inf"))[shared[labels]]
            out[f"{name}_prompt_prior_bow_classes"] = topk_accuracy(among, labels[shared[labels]])[1]
        out[f"{name}_named_classes"] = int(torch.isfinite(logits[0]).sum())
    return out


@torch.no_grad()
def caption_scoring_on_dev(checkpoint: Path, data: Path, every: int = 10) -> dict:
    """Which prompt and rule a word-by-word model scores classes with, decided on development data (every 10th
    cifar10/train image): for each of ``CAPTION_TEMPLATES``, top-1 of the plain likelihood, of the likelihood less
    the prompt prior over flickr8k/train images, and (transductive: reported, not used) less the mean over these
    images themselves; and the share of images given the most predicted class."""
    from collections import Counter

    from flickr8k_dev import EveryNth

    model, preprocess = caption_lm.load(str(checkpoint))
    cifar = open_labelled(data / "cifar10", "train")
    embeddings, labels = _caption_embeddings(model, preprocess, EveryNth(cifar.source, every))
    references = _training_image_embeddings(model, preprocess, data)
    out = {"images": len(labels), "prior_images": len(references)}
    for template in CAPTION_TEMPLATES:
        plain = caption_lm.zero_shot_logits(model, embeddings, cifar.classnames, [template])
        prior = caption_lm.prompt_log_prior(model, references, cifar.classnames, [template])
        rules = {"plain": plain, "less_prompt_prior": plain - prior,
                 "less_mean_over_these_images": plain - plain.mean(0, keepdim=True)}
        out[template] = {rule: {"top1": topk_accuracy(logits, labels)[1],
                                "most_predicted_share": Counter(logits.argmax(1).tolist()).most_common(1)[0][1]
                                / len(labels)} for rule, logits in rules.items()}
    return out


def _images(source):
    import random
    from collections import Counter

    from clipforge.data.pipeline import decode_sample

    images, labels = [], []
    for raw in source.samples(0, 1, 0, 0, Counter()):
        image, _ = decode_sample(dict(raw, txt=b"-"), random.Random(0))
        images.append(image)
        labels.append(int(raw["cls"]))
    return images, labels


@torch.no_grad()
def bow_scoring_on_dev(checkpoint: Path, data: Path, training_captions: list[str], every: int = 10) -> dict:
    """How to score a bag-of-words model zero-shot, decided on development data (every 10th cifar10/train image):
    plain mean log-probability, less the training captions' word prior, or less the mean over the evaluated images
    themselves (transductive: reported, not used)."""
    from collections import Counter

    from flickr8k_dev import EveryNth

    model, preprocess = bow.load(str(checkpoint))
    cifar = open_labelled(data / "cifar10", "train")
    images, labels = _images(EveryNth(cifar.source, every))
    labels = torch.as_tensor(labels)
    log_probs = torch.cat([model.word_log_probs(torch.stack([preprocess(i) for i in images[s:s + 256]]))
                           for s in range(0, len(images), 256)])
    nameable = torch.tensor([bool(i) for i in bow.class_word_indices(model.vocabulary, cifar.classnames)])[labels]
    rules = {"plain": log_probs, "less_word_prior": log_probs - bow.word_log_prior(model.vocabulary, training_captions),
             "less_mean_over_these_images": log_probs - log_probs.mean(0, keepdim=True)}
    out = {"images": len(labels), "images_of_nameable_classes": int(nameable.sum())}
    for rule, scores in rules.items():
        predicted = bow.zero_shot_logits(scores, model.vocabulary, cifar.classnames).argmax(1)
        out[rule] = {"top1": (predicted == labels).float().mean().item(),
                     "top1_nameable_classes": (predicted[nameable] == labels[nameable]).float().mean().item(),
                     "most_predicted_share": Counter(predicted.tolist()).most_common(1)[0][1] / len(labels)}
    return out


def by_objective(results: dict) -> dict:
    """objective -> [(seed, points)], from run names such as "word by word, seed 1" (no suffix: seed 0)."""
    import re

    grouped = {}
    for name, points in results.items():
        objective, seed = re.fullmatch(r"(.*?)(?:, seed (\d+))?", name).groups()
        grouped.setdefault(objective, []).append((int(seed or 0), points))
    return grouped


def reported_rule(point: dict, dataset: str) -> tuple[str, str]:
    """(result key, its description) of the rule each objective is reported under: less its prior where measured."""
    for prior, rule in (("word_prior", ", less the word prior"), ("prompt_prior", ", less the prompt prior")):
        if f"{dataset}_{prior}" in point:
            return f"{dataset}_{prior}", rule
    return dataset, ""


def _summary_value(point: dict, row: str) -> float:
    """One checkpoint's figure for a row of ``seed_summary``: a dataset under the reported rule, or "bow_classes"."""
    if row != "bow_classes":
        return point[reported_rule(point, row)[0]]
    if "cifar10_word_prior" in point:
        return 2 * point["cifar10_word_prior"]
    return point["cifar10_prompt_prior_bow_classes"]


def seed_summary(results: dict) -> str:
    """A markdown table: per objective and point, the median top-1 across seeds and their range (%), under each
    objective's reported rule; and CIFAR-10 on the 5 classes the bag of words can name (choosing among those 5). The
    bag of words' figure there is twice its 10-class one, exactly: it scores a class it cannot name -inf, so it only
    ever picks among the 5, and CIFAR-10/test holds 1,000 images per class."""
    import numpy as np

    grouped = by_objective(results)
    seen = sorted({p["images_seen"] for runs_ in grouped.values() for _, points in runs_ for p in points})
    lines = ["| objective, dataset: median across seeds (range) | " + " | ".join(f"{x:,}" for x in seen) + " |",
             "|---" * (len(seen) + 1) + "|"]
    for objective, runs_ in grouped.items():
        rows = [("CIFAR-10", "cifar10"), ("flowers", "flowers")]
        if "bag of words" in objective or "word by word" in objective:
            rows.append(("CIFAR-10, the 5 classes the bag of words names", "bow_classes"))
        rule = reported_rule(runs_[0][1][0], "cifar10")[1]
        seeds = ", ".join(str(seed) for seed, _ in runs_)
        for label, row in rows:
            cells = []
            for x in seen:
                values = 100 * np.array([_summary_value(p, row) for _, points in runs_ for p in points
                                         if p["images_seen"] == x])
                cells.append("-" if not len(values) else f"{np.median(values):.1f}" if len(values) == 1 else
                             f"{np.median(values):.1f} ({values.min():.1f}-{values.max():.1f})")
            lines.append(f"| {objective}{rule}, {label} (seed{'s' * (len(runs_) > 1)} {seeds}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Zero-shot top-1 against images seen, one panel per dataset: each objective under the rule reported for it
    (the bag of words and word by word less their prior, where measured), one colour each; with several seeds, the
    median across seeds drawn solid over the band from the lowest to the highest seed and each seed faintly."""
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, dataset in zip(axes, ("cifar10", "flowers")):
        for colour, (objective, runs_) in enumerate(by_objective(results).items()):
            key, rule = reported_rule(runs_[0][1][0], dataset)
            if len(runs_) == 1:
                seed, points = runs_[0]
                ax.plot([p["images_seen"] for p in points], [p[key] for p in points], color=f"C{colour}",
                        marker="o", label=f"{objective}{rule}, seed {seed}")
                continue
            seen = sorted(set.intersection(*({p["images_seen"] for p in points} for _, points in runs_)))
            values = np.array([[next(p[key] for p in points if p["images_seen"] == x) for x in seen]
                               for _, points in runs_])
            for row in values:
                ax.plot(seen, row, color=f"C{colour}", alpha=0.3, linewidth=0.8)
            ax.fill_between(seen, values.min(0), values.max(0), color=f"C{colour}", alpha=0.12)
            ax.plot(seen, np.median(values, 0), color=f"C{colour}", marker="o",
                    label=f"{objective}{rule}, median of {len(runs_)} seeds (band: their range)")
        ax.axhline(1 / (10 if dataset == "cifar10" else 5), color="grey", linestyle=":", label="chance")
        ax.set_xlabel("images seen (training samples)")
        ax.set_ylabel("zero-shot top-1")
        ax.set_title(f"{dataset}/test zero-shot")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "flickr8k.yaml")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "objectives")
    parser.add_argument("--checkpoints", type=int, default=4, help="evaluated points along each run [4]")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--seed", type=int, help="train with this seed instead of the recipe's; runs are named "
                                                 "and stored with it (\"word by word, seed 1\")")
    parser.add_argument("--runs", nargs="+", help="train / evaluate only these runs (names as in the JSON); the "
                                                   "others' results already in --json are kept")
    parser.add_argument("--train-only", action="store_true", help="train the runs, evaluate nothing (choose the "
                                                                  "word-by-word prompt with --caption-dev first)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the checkpoints the runs have, train "
                                                                 "nothing (for a run stopped part-way)")
    parser.add_argument("--caption-dev", action="store_true",
                        help="only print the word-by-word model's prompt candidates compared on development data (its "
                             "last checkpoint; every 10th cifar10/train image)")
    parser.add_argument("--caption-template", default="a {}.",
                        help="the prompt the word-by-word model is scored with on test (choose with --caption-dev)")
    parser.add_argument("--plot-only", action="store_true", help="redraw --plot from --json; train and evaluate "
                                                                  "nothing")
    parser.add_argument("--bow-dev", action="store_true",
                        help="only print the bag-of-words scoring rules compared on development data (its last "
                             "checkpoint; every 10th cifar10/train image)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipe = read_config(args.recipe)
    steps, batch = recipe["steps"], recipe.get("batch_size", 64)
    if args.seed is not None:
        recipe["seed"] = args.seed
    seeded = "" if args.seed is None else f", seed {args.seed}"
    training_captions = flickr8k_captions(args.data, n=10**9)  # the recipe's training data
    if args.bow_dev:
        last = checkpoint_dirs(args.output / "bag-of-words")[-1]
        print(last, json.dumps(bow_scoring_on_dev(last, args.data, training_captions), indent=1))
        return
    if args.caption_dev:
        last = checkpoint_dirs(args.output / "word-by-word")[-1]
        print(last, json.dumps(caption_scoring_on_dev(last, args.data), indent=1))
        return
    saved = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results = saved.get("results", {})  # other runs' points (and any note on them) are kept as they are
    chosen = runs(recipe)
    unknown = set(args.runs or ()) - set(chosen)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {sorted(chosen)}")
    for name, changes in chosen.items():
        if args.plot_only or (args.runs and name not in args.runs):
            continue
        folder = args.output / (name + seeded).replace(", ", "-").replace(" ", "-")
        if not args.eval_only and (not checkpoint_dirs(folder) or
                                   int(checkpoint_dirs(folder)[-1].name.split("-")[1]) < steps):
            settings = {**recipe, **changes, "output": str(folder), "progress": False, "resume": "latest",
                        "save_every": steps // args.checkpoints, "keep": args.checkpoints}  # a stopped run continues
            train(TrainConfig(**settings))
        if args.train_only:
            continue
        name += seeded
        results[name] = []
        for checkpoint in checkpoint_dirs(folder):
            step = int(checkpoint.name.split("-")[1])
            scores = zero_shot(checkpoint, args.data, training_captions, args.caption_template)
            results[name].append({"step": step, "images_seen": step * batch, **scores})
            print(name, json.dumps(results[name][-1]), flush=True)
    if args.train_only:
        return
    if args.json and not args.plot_only:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        recipe_name = args.recipe.resolve()
        recipe_name = recipe_name.relative_to(REPO) if recipe_name.is_relative_to(REPO) else recipe_name.name
        args.json.write_text(json.dumps({**saved, "recipe": str(recipe_name), "results": results,
                                         "caption_template": args.caption_template}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)
    print(seed_summary(results))
    for name, points in results.items():
        print(name, [(p["images_seen"], *(round(v, 3) for k, v in p.items() if k.startswith(("cifar10", "flowers"))
                                             and "named" not in k)) for p in points])


if __name__ == "__main__":
    main()
