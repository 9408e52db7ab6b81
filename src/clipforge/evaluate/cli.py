"""``clipforge eval zeroshot|retrieval|linear-probe|fewshot|robustness|caption-selection``, with flags like
CLIP_benchmark's, and ``clipforge eval table`` to read a sweep's results back side by side (CLIP_benchmark's
``build``).

Results go to ``--output`` as JSON in CLIP_benchmark's format (``dataset``, ``model``, ``pretrained``, ``task``,
``metrics``, ``language``), with extra keys for what CLIP_benchmark does not report (per-class table, sweep, curve).
Several ``--dataset-root`` are evaluated in turn with one model load, and several ``--pretrained`` one after
another, ``--output`` naming each file by its {placeholders}. Image features are cached (``--cache-dir``) so
that a sweep, a few-shot curve or a second template set does not re-embed the images.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path

import torch

from ..argtypes import positive_int
from ..inference import add_model_arguments, load_from_args, weights_dtype
from ..caption_lm import PRIOR_IMAGES

TASKS = ("zeroshot", "retrieval", "linear-probe", "fewshot", "robustness", "caption-selection", "table")
CB_TASK = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "linear-probe": "linear_probe",
           "fewshot": "fewshot_linear_probe", "robustness": "robustness_common_corruptions",
           "caption-selection": "image_caption_selection"}

EXAMPLES = """examples:
  clipforge eval zeroshot --pretrained runs/cifar/checkpoints/step-00001000 --dataset-root ../shared/data/cifar10
  clipforge eval zeroshot --model ViT-B-32 --pretrained openai --dataset-root imagenet --dataset imagenet1k
  clipforge eval zeroshot --pretrained CKPT --dataset-root photos      photos/<class>/*.jpg, no split folder
  clipforge eval zeroshot ... --templates 'a photo of a {}.'        a single prompt (or a file, or a set name)
  clipforge eval retrieval --pretrained CKPT --dataset-root ../shared/data/coco-mini
  clipforge eval linear-probe --pretrained CKPT --dataset-root ../shared/data/cifar10 --train-split train
  clipforge eval fewshot --pretrained CKPT --dataset-root ../shared/data/cifar10 --train-split train
  clipforge eval robustness --pretrained CKPT --dataset-root ../shared/data/cifar10 --max-images 2000 --plot r.png
  clipforge eval robustness ... --corruptions gaussian_noise,fog --severities 1..5 --probe linear
  clipforge eval zeroshot --pretrained CKPT --dataset-root ../shared/data/cifar10 ../shared/data/flowers \
      --output 'evals/{dataset}_{pretrained}_{task}.json'      several datasets, one model load
  clipforge eval zeroshot --pretrained runs/a/checkpoints/step-* --dataset-root ../shared/data/flowers \
      --output 'evals/{dataset}_{pretrained}_{task}.json'      every checkpoint of a run, one after another
  clipforge eval caption-selection --pretrained CKPT --dataset-root sugar_crepe/swap_obj.json --images val2017
      true caption against hard negatives (SugarCrepe's JSON files; several --dataset-root, one result each)
  clipforge eval caption-selection --pretrained CKPT --dataset-root winoground/examples.jsonl --images winoground/images
      two images, two captions (Winoground): text, image and group scores as CLIP_benchmark's text_acc, image_acc, acc
  clipforge eval table evals/ --csv evals.csv      every result JSON as Markdown tables (per task) and one CSV
  clipforge eval table evals/ --metric acc1        one metric: a model x dataset matrix with each model's mean
  clipforge eval zeroshot --pretrained runs/bow/checkpoints/step-00002400 --dataset-root ../shared/data/cifar10
      an image tower trained with --objective bow or labels: its word head, less the training captions' word prior
  clipforge eval zeroshot --pretrained runs/caption/checkpoints/step-00002400 --dataset-root ../shared/data/cifar10 \
      --templates 'a photo of a {}.' --prior-data ../shared/data/flickr8k/train
      --objective caption: prompt likelihoods, less their mean over training images (without it one class wins)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.epilog = __doc__, EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("task", choices=TASKS)
    p.add_argument("results", nargs="*", metavar="RESULT", help="table: result JSON files or folders of them")
    add_model_arguments(p, several=True)
    p.add_argument("--dataset-root", nargs="+", help="dataset folder (CLIP_benchmark layout, class folders "
                   "or CSV; for retrieval: shards with image + multi-line .txt captions; for caption-selection: a "
                   "SugarCrepe-style JSON file or a Winoground-style .jsonl); several are evaluated in turn with one "
                   "model load")
    p.add_argument("--images", help="caption-selection: the folder the set's images are in [the set file's folder]")
    p.add_argument("--dataset", help="dataset name for the shipped class names/templates (cifar10, imagenet1k...) "
                   "[the folder name]")
    p.add_argument("--split", default="test")
    p.add_argument("--train-split", default="train", help="features to fit linear/few-shot probes on")
    p.add_argument("--templates", help="prompt templates: a file (one per line, with {}), a shipped set name, "
                   "a single template containing {}, or 'none' for bare class names [the dataset's set]")
    p.add_argument("--prior-data", help="--objective caption checkpoints, zero-shot: training images (shards or a "
                   f"folder); each prompt's mean likelihood over {PRIOR_IMAGES} of them (a seeded draw) is "
                   "subtracted [none: the plain likelihood, which names one class for nearly every image]")
    p.add_argument("--max-images", type=positive_int,
                   help="the first N images of --split only (robustness embeds each 1 + 5 x 14 times; retrieval ranks "
                        "against these only, so recall reads higher than on all) [all]")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--output", help="result JSON; {dataset}, {task}, {model} and {pretrained} are replaced "
                   "(paths with '/' as '_') [{dataset}_{task}.json]")
    p.add_argument("--plot", help="PNG: confusion matrix (zeroshot, linear-probe) or accuracy vs k (fewshot); "
                   "the same {placeholders} as --output")
    p.add_argument("--csv", help="table: also write every metric of every result here, one row each")
    p.add_argument("--metric", help="table: instead, one metric (e.g. acc1, image_retrieval_recall@5) as a "
                   "model x dataset matrix with each model's mean")
    p.add_argument("--recall-k", type=positive_int, nargs="+", default=[1, 5, 10],
                   help="retrieval: the k of recall@k, as CLIP_benchmark's --recall_k [1 5 10]")
    p.add_argument("--shots", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=positive_int, default=3, help="few-shot draws per k")
    g = p.add_argument_group("robustness (common corruptions, applied at the images' own resolution)")
    g.add_argument("--corruptions", default="all", help="'all' or a comma-separated list of gaussian_noise, "
                   "shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, fog, "
                   "brightness, contrast, elastic_transform, pixelate, jpeg_compression [all]")
    g.add_argument("--severities", default="1..5", help="'1..5', '3' or '1,3,5' [1..5]")
    g.add_argument("--probe", choices=["zeroshot", "linear", "head"], default="zeroshot",
                   help="the classifier: zero-shot prompts, a linear probe fit on clean --train-split features, or "
                        "the head of a fine-tuned model (clipforge finetune / wise-ft)")
    g.add_argument("--corruption-seed", type=int, default=0, help="the corruptions' random draws [0]")
    p.add_argument("--cache-dir", help="image feature cache, and for robustness the corrupted images "
                   "[$CLIPFORGE_CACHE/features, $CLIPFORGE_CACHE/corruptions]")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _model_key(args, model) -> str:
    ident = [args.model or "", args.pretrained or ""]
    for path in ident:
        if path and os.path.exists(path):
            target = Path(path) / "model.safetensors" if os.path.isdir(path) else Path(path)
            if target.exists():
                stat = target.stat()
                ident.append(f"{target.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    hub = any(p.startswith("hf-hub:") for p in ident[:2])  # a named repo: the same weights every time
    if not any(os.path.exists(p) for p in ident[:2] if p) and args.pretrained is None and not hub:
        # a randomly initialised zoo model: features are only meaningful within this process
        ident.append(f"random:{id(model)}")
    return "|".join(ident)


def cached_features(args, model, dataset, split: str, preprocess, raw: bool = False, limit: int | None = None):
    """(image features, labels) of a split's first ``limit`` images (all: None), L2-normalised, or with ``raw`` as
    ``encode_image`` gives them (what an image tower's own zero-shot rule reads); kept in the feature cache."""
    from ..pretrained import cache_dir
    from ..preprocess import Preprocess
    from .features import embed_labelled

    dtype = weights_dtype(model)  # features at another precision are other features (fp32's key is unchanged)
    # and so are features of images preprocessed otherwise (a tag's own mean/std or resize; OpenAI's keeps its key)
    custom = preprocess.settings != Preprocess(preprocess.image_size).settings
    key = hashlib.sha256(f"{_model_key(args, model)}|{Path(args.dataset_root).resolve()}|{split}|"
                         f"{model.image_size}{'|raw' if raw else ''}{f'|first {limit}' if limit else ''}"
                         f"{'' if dtype == torch.float32 else f'|{dtype}'}{f'|{preprocess!r}' if custom else ''}"
                         .encode()).hexdigest()[:20]
    folder = Path(args.cache_dir) if args.cache_dir else cache_dir() / "features"
    path = folder / f"{dataset.name}-{split}-{key}.pt"
    if not args.no_cache and path.exists():
        cached = torch.load(path, weights_only=True)
        return cached["features"], cached["labels"]
    features, labels = embed_labelled(model, dataset.source, preprocess, args.batch_size, progress=not args.quiet,
                                      desc=f"embedding {dataset.name}/{split}", normalize=not raw, limit=limit)
    if not args.no_cache:
        from ..files import atomic_path

        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"features": features, "labels": labels}, tmp)
    return features, labels


def run(args) -> int:
    if args.task == "table":
        return _table(args)
    if args.results:
        raise ValueError(f"eval {args.task} takes no result files ({' '.join(args.results)}): those are for "
                         "`clipforge eval table`")
    if not args.dataset_root:
        raise ValueError(f"eval {args.task} needs --dataset-root")
    if args.csv or args.metric:
        raise ValueError("--csv and --metric are for `clipforge eval table`, which reads the results back")
    if args.dataset and len(args.dataset_root) > 1:
        raise ValueError("--dataset names one dataset's class names and templates: give it with one --dataset-root")
    for root in args.dataset_root:
        if not os.path.exists(root):
            raise ValueError(f"--dataset-root {root}: no such file or folder")
    sweep = []  # (one model's settings, its runs: one per dataset)
    for pretrained in args.pretrained or [None]:
        model_args = argparse.Namespace(**vars(args))
        model_args.pretrained = pretrained
        runs = []
        for root in args.dataset_root:
            one = argparse.Namespace(**vars(model_args))
            one.dataset_root, name = root, _dataset_name(args, root)
            one.output = fill_placeholders(args.output or "{dataset}_{task}.json", model_args, name)
            one.plot = args.plot and fill_placeholders(args.plot, model_args, name)
            runs.append(one)
        sweep.append((model_args, runs))
    for flag in ("output", "plot"):  # no two evaluations may write the same file
        paths = [getattr(one, flag) for _, runs in sweep for one in runs if getattr(one, flag)]
        if len(set(map(os.path.abspath, paths))) < len(paths):
            template = getattr(args, flag) or "{dataset}_{task}.json"
            missing = [p for p, needed in (("{dataset}", len(args.dataset_root) > 1),
                                           ("{pretrained}", len(sweep) > 1)) if needed and p not in template]
            hint = (f"put {' and '.join(missing)} in it" if missing else
                    "two of them have the same name: evaluate them one at a time")
            raise ValueError(f"--{flag} {template}: two evaluations would write the same file; {hint}")
    caches: dict = {}  # the text feature caches of the sweep's last few frozen text towers, by fingerprint
    for model_args, runs in sweep:
        model, preprocess, tokenizer = _load(model_args)
        cache = _share_text_features(model, caches) if len(sweep) > 1 else None
        for one in runs:
            _evaluate(one, model, preprocess, tokenizer)
        if cache is not None:
            cache.compute = None  # the table outlives its model; a model that takes it over computes with its own
        del model
    return 0


def _share_text_features(model, caches: dict, keep: int = 4):
    """In a sweep, models whose text towers give the same features (one frozen transformer: the checkpoints and seeds
    of a locked-text run such as the Flickr8k recipe) compute each caption and prompt once: the tower is frozen
    (evaluation trains nothing) and caches its features, and a model with the frozen weights of one of the last
    ``keep`` towers (``caches``: fingerprint -> cache, updated here) takes over its cache, also after models with other
    towers in between. A text is computed in the first batch it comes in, as without the cache, and a repeat reads that
    value: each checkpoint's results are the ones it gets alone (tested; compared on four recipe checkpoints).
    Returns the model's cache, or None where it has no cacheable text tower."""
    from ..models.feature_cache import FeatureCache

    text = getattr(model, "text", None)
    if not hasattr(text, "cache_features") or not hasattr(model, "lock_text_tower"):
        return None
    model.lock_text_tower()
    fingerprint = FeatureCache.fingerprint(text)
    cache = caches[fingerprint] = text.cache_features(caches.pop(fingerprint, None))
    while len(caches) > keep:
        caches.pop(next(iter(caches)))  # the least recently used
    return cache


def _dataset_name(args, root: str) -> str:
    """--dataset, or the folder's name (a JSON file's stem: a caption-selection set)."""
    return args.dataset or (Path(root).stem if Path(root).is_file() else Path(root).name)


def fill_placeholders(template: str, args, dataset: str) -> str:
    """``template`` with {dataset}, {task}, {model} and {pretrained} filled in, as CLIP_benchmark's --output is
    (a path's separators become '_', so each fills one file name)."""
    def slug(value) -> str:
        return re.sub(r"[\\/:]+", "_", str(value or "")).strip("_.") or "none"

    try:
        return template.format(dataset=slug(dataset), task=args.task, model=slug(args.model),
                               pretrained=slug(args.pretrained))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{template}: only {{dataset}}, {{task}}, {{model}} and {{pretrained}} can be filled in "
                         f"({type(exc).__name__}: {exc})") from None


def _table(args) -> int:
    from .table import load_results, markdown_tables, metric_matrix, write_csv

    if not args.results:
        raise ValueError("eval table needs result JSON files or folders, e.g. `clipforge eval table evals/`")
    if args.dataset_root:
        raise ValueError("eval table reads result files; --dataset-root is for the evaluations that write them")
    results = load_results(args.results)
    print(metric_matrix(results, args.metric) if args.metric else markdown_tables(results))
    if args.csv:
        write_csv(results, args.csv)
        print(f"wrote {args.csv} ({len(results)} results)")
    return 0


def _evaluate(args, model, preprocess, tokenizer) -> None:
    """Evaluate a loaded model on ``args.dataset_root`` (one of them) and write its result."""
    from .datasets import check_distinct_splits, open_labelled
    from .metrics import check_labels, classification_metrics, confusion_png, fewshot_png, per_class_table

    result = {"dataset": _dataset_name(args, args.dataset_root), "model": args.model,
              "pretrained": args.pretrained, "task": CB_TASK[args.task], "language": "en",
              **({"image_size": model.image_size} if getattr(args, "force_image_size", None) else {})}
    if args.prior_data and (tokenizer is not None or model.config.get("objective") != "caption"):
        raise ValueError("--prior-data is for checkpoints of --objective caption; "
                         f"{args.pretrained or args.model} is not one")
    needs_text = args.task in ("retrieval", "caption-selection") or (args.task == "robustness" and
                                                                      args.probe == "zeroshot")
    if tokenizer is None and needs_text:
        raise ValueError(f"{args.pretrained or args.model}: an image tower trained with --objective "
                         f"{model.config.get('objective')} has no text tower for {args.task}"
                         f"{' --probe zeroshot' if args.task == 'robustness' else ''}; its image features can be "
                         "evaluated with linear-probe, fewshot or robustness --probe linear")
    text_tasks = {"retrieval": _retrieval, "caption-selection": _caption_selection}
    if args.task in text_tasks:
        result["metrics"] = text_tasks[args.task](args, model, preprocess, tokenizer)
        _report(args, result)
        return
    dataset = open_labelled(args.dataset_root, args.split, args.dataset)
    if args.task == "robustness":
        result.update(_robustness(args, model, preprocess, tokenizer, dataset))
        _report(args, result)
        return
    if args.task in ("zeroshot", "fewshot"):  # a bad --templates fails before the images are embedded
        from ..prompts import resolve_templates

        templates = resolve_templates(args.templates, dataset.templates)
    test_x, test_y = cached_features(args, model, dataset, args.split, preprocess, limit=args.max_images)
    check_labels(test_y, len(dataset.classnames), f"split {args.split!r}: ")
    if args.task in ("zeroshot", "fewshot"):
        from ..zeroshot import zero_shot_classifier

        if tokenizer is None:  # an image tower: its objective's own rule on its raw embeddings
            logits = _image_tower_zero_shot(args, model, preprocess, dataset, templates, result)
        else:
            with torch.no_grad():
                logits = test_x @ zero_shot_classifier(model, tokenizer, dataset.classnames, templates).cpu()
        zs = classification_metrics(logits, test_y, dataset.classnames)
        result["templates"] = templates
    if args.task == "zeroshot":
        metrics = zs
    else:
        from .linear_probe import few_shot, linear_probe

        train_set = open_labelled(args.dataset_root, args.train_split, args.dataset)
        check_distinct_splits(train_set, dataset, args.train_split, args.split)
        train_x, train_y = cached_features(args, model, train_set, args.train_split, preprocess)
        check_labels(train_y, len(dataset.classnames), f"split {args.train_split!r}: ")
        n = len(dataset.classnames)
        if args.task == "linear-probe":
            logits, info = linear_probe(train_x, train_y, test_x, n)
            metrics = {f"lp_{k}" if k in ("acc1", "acc5", "mean_per_class_recall") else k: v
                       for k, v in classification_metrics(logits, test_y, dataset.classnames).items()}
            result.update(info)
        else:
            curve = few_shot(train_x, train_y, test_x, test_y, n, tuple(args.shots), tuple(range(args.seeds)))
            metrics = {f"{k}_shot_acc1": sum(v) / len(v) for k, v in curve.items()}
            metrics["zeroshot_acc1"] = zs["acc1"]
            result["curve"] = {str(k): v for k, v in curve.items()}
    per_class, confusion = metrics.pop("per_class", None), metrics.pop("confusion_matrix", None)
    result["metrics"] = {**metrics, "n_images": len(test_y)}  # a --max-images run reads apart from a full one
    if per_class:
        result["per_class"], result["confusion_matrix"] = per_class, confusion
        if not args.quiet:
            print(per_class_table({"per_class": per_class}))
    if args.plot:
        if args.task == "fewshot":
            fewshot_png({int(k): v for k, v in result["curve"].items()}, zs["acc1"], args.plot, result["dataset"])
        else:
            confusion_png(confusion, dataset.classnames, args.plot, f"{result['dataset']} {args.task}")
    _report(args, result)


def _load(args):
    """``(model, preprocess, tokenizer)``; an image tower trained without a text encoder (``--objective bow|caption|
    labels|self-supervised``) comes back with tokenizer None."""
    from ..checkpoint import ImageTowerCheckpointError

    try:
        return load_from_args(args)
    except ImageTowerCheckpointError:
        from ..inference import default_device
        from ..models.image_tower import load_image_tower

        model, preprocess = load_image_tower(args.pretrained or args.model, default_device(args.device))
        return model, preprocess, None


@torch.no_grad()
def _image_tower_zero_shot(args, model, preprocess, dataset, templates: list[str], result: dict) -> torch.Tensor:
    """Zero-shot logits of an image tower by its objective's rule (``model.zero_shot_logits``); for --objective
    caption with --prior-data, less each prompt's mean likelihood over those training images. ``result`` gets the
    rule used."""
    from ..caption_lm import CaptionLMModel

    raw_x, _ = cached_features(args, model, dataset, args.split, preprocess, raw=True, limit=args.max_images)
    device = next(model.parameters()).device
    references = None
    if isinstance(model, CaptionLMModel):
        if args.prior_data:
            from ..data import evaluation_set, open_source
            from .features import embed_images

            # a seeded shuffle (shards sorted by class would otherwise give one class's images), as the study drew them
            images = evaluation_set(open_source(args.prior_data), lambda image: image, PRIOR_IMAGES).images
            if not images:
                raise ValueError(f"--prior-data {args.prior_data}: no usable images")
            references = embed_images(model, images, preprocess, args.batch_size).to(device)
            result["zero_shot_rule"] = f"prompt likelihood less its mean over {len(images)} --prior-data images"
        else:
            result["zero_shot_rule"] = "plain prompt likelihood (no --prior-data)"
            print("note: without --prior-data a word-by-word model's likeliest prompt tends to win for nearly every "
                  "image; pass training images to subtract each prompt's prior")
    elif model.config.get("objective") in ("bow", "labels"):
        result["zero_shot_rule"] = ("mean class-word log-probability" +
                                    (" less the training captions' word prior" if model.word_log_prior is not None
                                     else ""))
    # in one call: the rule batches its own work, and the word-by-word prior is scored once, not once per chunk
    return model.zero_shot_logits(raw_x.to(device), dataset.classnames, templates, references).float().cpu()


def _retrieval(args, model, preprocess, tokenizer) -> dict:
    from ..data import open_source
    from .features import warn_skipped
    from .retrieval import embed_retrieval_set, retrieval_metrics

    root = Path(args.dataset_root)
    split = root / args.split if (root / args.split).exists() else root
    # every caption of every image (of the first --max-images)
    image_features, text_features, caption_images, skipped = embed_retrieval_set(
        model, tokenizer, open_source(str(split), shuffle_buffer=0), preprocess, args.max_images, args.batch_size,
        progress=not args.quiet)
    if not len(image_features):
        tables = sorted(split.glob("*.csv")) + sorted(split.glob("*.tsv")) if split.is_dir() else []
        hint = (f"; a folder's images are captioned by .txt files beside them: for the captions in {tables[0].name}, "
                f"give --dataset-root {tables[0]}") if tables else ""
        raise ValueError(f"{split}: no samples with an image and a caption (skipped: {dict(skipped) or 'none'})"
                         + hint)
    warn_skipped(f"retrieval on {split}", skipped)
    ks = sorted(set(args.recall_k))
    ours = retrieval_metrics(image_features, text_features, caption_images, ks=ks)
    metrics = {}
    for k in ks:  # CLIP_benchmark's names: "image retrieval" = text->image
        metrics[f"image_retrieval_recall@{k}"] = ours[f"text_to_image_R@{k}"]
        metrics[f"text_retrieval_recall@{k}"] = ours[f"image_to_text_R@{k}"]
    metrics.update(n_images=len(image_features), n_captions=len(text_features))
    return metrics


def _caption_selection(args, model, preprocess, tokenizer) -> dict:
    from .caption_selection import caption_selection, load_selection_set

    samples = load_selection_set(args.dataset_root, args.images)[:args.max_images]
    return caption_selection(model, preprocess, tokenizer, samples, args.batch_size, next(model.parameters()).device,
                             progress=not args.quiet)


def _robustness(args, model, preprocess, tokenizer, dataset) -> dict:
    from ..prompts import resolve_templates
    from ..zeroshot import zero_shot_classifier
    from .corruptions import resolve
    from ..pretrained import cache_dir
    from .robustness import ShiftedSets, parse_severities, robustness, severity_png

    corruptions, severities = resolve(args.corruptions), parse_severities(args.severities)  # errors before work
    if args.probe == "head":
        if not hasattr(model, "classify"):
            raise ValueError("--probe head needs a fine-tuned model (clipforge finetune or wise-ft)")
        if list(model.classnames) != list(dataset.classnames):
            raise ValueError(f"the model's head classifies {model.classnames[:4]}..., not this dataset's classes")
        head = model.classifier.detach().float().cpu()
        classify, extra = (lambda features: features @ head.T), {"classnames": model.classnames}
    elif args.probe == "zeroshot":
        templates = resolve_templates(args.templates, dataset.templates)
        with torch.no_grad():
            weights = zero_shot_classifier(model, tokenizer, dataset.classnames, templates).cpu()
        classify, extra = (lambda features: features @ weights), {"templates": templates}
    else:
        from .datasets import check_distinct_splits, open_labelled
        from .linear_probe import fit_linear_probe

        train_set = open_labelled(args.dataset_root, args.train_split, args.dataset)
        check_distinct_splits(train_set, dataset, args.train_split, args.split)
        train_x, train_y = cached_features(args, model, train_set, args.train_split, preprocess)
        classify, info = fit_linear_probe(train_x, train_y, len(dataset.classnames))
        extra = {"l2": info["l2"]}
    store = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else cache_dir() / "corruptions"
    sets = ShiftedSets(dataset, args.max_images, args.corruption_seed, store, progress=not args.quiet)
    metrics = robustness(model, sets, preprocess, classify, corruptions, severities, args.batch_size)
    if args.plot:
        severity_png(metrics, args.plot, f"{Path(args.dataset_root).name} {args.probe}: clean "
                                        f"{metrics['clean']:.1%}, mean corrupted {metrics['mean_corrupted']:.1%}")
    summary = {"clean_acc1": metrics["clean"], "mean_corrupted_acc1": metrics["mean_corrupted"],
               "images": metrics["images"]}
    return {"metrics": summary, "probe": args.probe, "corruptions": metrics["corruptions"],
            "mean_per_corruption": metrics["mean_per_corruption"], **extra}


def _report(args, result: dict) -> None:
    output = Path(args.output)
    from ..files import write_json

    write_json(output, result)
    summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["metrics"].items())
    print(f"{result['dataset']} {args.task}: {summary}\nwrote {output}")
