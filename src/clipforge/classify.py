"""``clipforge classify``: zero-shot labels for images from the command line, the first thing most people do with a
CLIP model (openai/CLIP's README example): class names become prompts ("a photo of a {}."), several templates are
averaged per class (prompt ensembling, ``zeroshot``), and each image gets its top-k classes with probabilities."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import textwrap
from pathlib import Path

from .argtypes import non_negative_int, positive_int
from .inference import add_decode_argument, add_model_arguments

EXAMPLES = """examples:
  clipforge classify photo.jpg --labels "a dog,a cat,a car" --pretrained runs/flickr8k/checkpoints/step-00002400
  clipforge classify photos/ --dataset cifar10 --pretrained CKPT     CIFAR-10's classes and the paper's 18 prompts
  clipforge classify photos/ --labels classes.txt --templates "a blurry photo of a {}." -k 1 --json > labels.jsonl
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = textwrap.fill(
        "Zero-shot classification of image files, folders of images (searched recursively), CSV/TSV tables or "
        "WebDataset shards among the classes you name. Prints each image's top -k classes with their probabilities "
        "(softmax over the classes given, at the model's own temperature; a SigLIP model's are each class's own "
        "sigmoid, with its learned bias, so they need not sum to 1). Unreadable images are named on stderr and "
        "skipped.", 110)  # the raw formatter keeps the examples' columns, and so wraps nothing itself
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("images", nargs="+", help="image files, image folders, CSV/TSV files or shards")
    p.add_argument("--labels", help="class names, comma-separated, or a file with one per line")
    p.add_argument("--dataset", help="a shipped class list and its prompts instead of --labels (cifar10, cifar100, "
                                     "imagenet1k, ...)")
    p.add_argument("--templates", help="prompt templates: one with {} where the class goes, a file (one per line), "
                                       "a shipped set name, or 'none' for bare class names [--dataset's own, else "
                                       "'a photo of a {}.']")
    p.add_argument("-k", type=positive_int, default=3, help="classes shown per image [3]")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=0, help="processes decoding images [0]")
    add_decode_argument(p)
    add_model_arguments(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def class_list(labels: str | None, dataset: str | None) -> list[str]:
    """The classes ``--labels`` or ``--dataset`` name."""
    from .data.sources import read_classnames
    from .prompts import shipped_classnames

    if (labels is None) == (dataset is None):
        raise ValueError("name the classes with --labels 'a,b,c' (or a file, one per line) or --dataset NAME")
    if dataset is not None:
        names = shipped_classnames(dataset)
        if names is None:
            raise ValueError(f"--dataset {dataset!r}: no shipped class list by that name")
        return names
    if os.path.isfile(labels):
        names = read_classnames(labels)
    else:
        names = [name.strip() for name in labels.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--labels {labels!r}: no class names (comma-separated, or a file with one per line)")
    if len(set(names)) != len(names):  # two rows of one name would split its probability between them
        raise ValueError(f"--labels: {sorted({n for n in names if names.count(n) > 1})} given more than once")
    return names


def image_items(specs: list[str]) -> list[dict]:
    """Every image the arguments name, as catalogue items (``retrieval.collection.load_item`` reads them)."""
    from .data.sources import IMAGE_EXTENSIONS, open_source

    items = []
    for spec in specs:
        # a file named on its own is an image unless it is a table or a shard, whatever its suffix says (.JPG_large,
        # a photo saved without one): an unreadable one is named and skipped like any other
        if os.path.isfile(spec) and (Path(spec).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS or not (
                spec.lower().endswith((".csv", ".tsv")) or tarfile.is_tarfile(spec))):
            items.append({"path": spec, "caption": ""})
        else:
            items.extend(open_source(spec, shuffle_buffer=0).catalogue())
    return items


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from .inference import decoding_from_args, load_from_args
    from .preprocess import image_batch
    from .prompts import resolve_templates, shipped_templates
    from .retrieval.collection import item_path, unreadable_reason
    from .retrieval.embed import decoded_batches
    from .zeroshot import class_probabilities, zero_shot_classifier

    # everything that can be wrong with the arguments fails before the model loads or an image is read
    names = class_list(args.labels, args.dataset)
    templates = resolve_templates(args.templates, shipped_templates(args.dataset) if args.dataset else None)
    items = image_items(args.images)
    model, preprocess, tokenizer = load_from_args(args)
    if tokenizer is None:
        raise ValueError(f"{args.pretrained or args.model} has no text tower to turn class names into a classifier")
    device = next(model.parameters()).device
    weights = zero_shot_classifier(model, tokenizer, names, templates).to(device)
    k = min(args.k, len(names))
    unreadable = []
    bar = tqdm(total=len(items), desc="classifying", unit="img", disable=not args.progress, file=sys.stderr)
    done = 0
    with torch.no_grad():
        for batch in decoded_batches(items, preprocess, args.batch_size, args.workers,
                                     decoding=decoding_from_args(args, preprocess)):
            good = [(done + i, sample) for i, sample in enumerate(batch) if sample is not None]
            unreadable += [items[done + i] for i, sample in enumerate(batch) if sample is None]
            done += len(batch)
            bar.update(len(batch))
            if not good:
                continue
            images = image_batch([tensor for _, (tensor, _) in good], device)
            probabilities = class_probabilities(model, model.encode_image(images, normalize=True), weights)
            top = probabilities.topk(k, dim=-1)
            for (index, _), values, classes in zip(good, top.values.tolist(), top.indices.tolist()):
                ranked = [(names[c], p) for c, p in zip(classes, values)]
                path = item_path(items[index])
                if args.json:
                    print(json.dumps({"image": path, "labels": [{"label": n, "probability": round(p, 6)}
                                                                for n, p in ranked]}))
                else:
                    print(path + "  " + "  ".join(f"{n} {p:.3f}" for n, p in ranked))
    bar.close()
    for item in unreadable[:10]:  # read again for the reason (a worker's error does not travel with the batch)
        print(f"warning: {unreadable_reason(item)}, skipped", file=sys.stderr)
    if len(unreadable) > 10:
        print(f"warning: {len(unreadable) - 10} more unreadable images skipped", file=sys.stderr)
    if len(unreadable) == len(items):
        raise ValueError("no readable images among the inputs")
    return 0
