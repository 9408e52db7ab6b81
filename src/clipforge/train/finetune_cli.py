"""``clipforge finetune`` and ``clipforge wise-ft``: fine-tune a CLIP model on a labelled dataset from its zero-shot
classifier, and interpolate zero-shot and fine-tuned weights (WiSE-FT)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import add_optimisation_arguments, add_run_arguments, config_from_args, report

FINETUNE = """Fine-tune a CLIP model on a labelled dataset, in any layout clipforge eval reads: CLIP_benchmark's
(<root>/<split>/*.tar with .cls, <root>/classnames.txt), class folders (<root>/<split>/<class>/*.jpg, or
<root>/<class>/*.jpg for the training split alone) or <root>/<split>.csv (filepath, label). The classifier head
starts as the zero-shot classifier (the class prompts' embeddings times the temperature), so step 0 predicts exactly
what zero-shot does; cross-entropy then trains the image tower and the head (or --head-only). Checkpoints, --resume
latest and progress as in clipforge train. The result loads with clipforge.load like any CLIP model
(model.classify(images) gives the head's logits) and feeds clipforge wise-ft.
"""

FINETUNE_EXAMPLES = """examples:
  clipforge finetune --pretrained runs/flickr8k/checkpoints/step-00002800 --dataset-root ../shared/data/cifar10 \\
      --val-split test --steps 500 --output runs/ft-cifar
  clipforge finetune ... --head-only                    the image tower stays as it is
"""

WISE_FT = """WiSE-FT (Wortsman et al. 2022): theta = (1 - alpha) * theta_zero-shot + alpha * theta_fine-tuned, tensor by
tensor, the zero-shot model taken with its zero-shot head for the fine-tuned model's classes (and prompts). Writes
one checkpoint per alpha: alpha 0 is the zero-shot model, alpha 1 the fine-tuned one, exactly.
"""


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.epilog = FINETUNE, FINETUNE_EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.argument_default = argparse.SUPPRESS
    p.add_argument("--pretrained", required=True, help="the CLIP model to fine-tune: a checkpoint, or a tag with --model")
    p.add_argument("--model", help="zoo architecture, when --pretrained is a tag")
    p.add_argument("--dataset-root", required=True, help="labelled dataset folder (CLIP_benchmark layout)")
    p.add_argument("--dataset", help="name of a shipped class name / template set [the folder name]")
    p.add_argument("--train-split", default="train", help="[train]")
    p.add_argument("--val-split", help="split to report top-1/top-5 on during training (e.g. test)")
    p.add_argument("--templates", help="prompts of the zero-shot head: a file, a shipped set, or one template with {} "
                                       "[the dataset's shipped set, else 'a photo of a {}.']")
    p.add_argument("--head-only", action="store_true", help="train the classifier head only")
    p.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="random resized crop [0.9 1.0]")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips")
    p.add_argument("--workers", type=int, help="DataLoader workers per process [2]")
    add_optimisation_arguments(p)
    add_run_arguments(p)
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    from ..data import open_source
    from ..evaluate.datasets import check_distinct_splits, open_labelled
    from ..prompts import resolve_templates
    from .loop import train

    root = Path(args.dataset_root)
    dataset = open_labelled(root, args.train_split, getattr(args, "dataset", None))  # checks layout and classnames
    args.templates = resolve_templates(getattr(args, "templates", None), dataset.templates)
    args.train_data, val_set = dataset.spec, None
    if getattr(args, "val_split", None):
        val_set = open_labelled(root, args.val_split, getattr(args, "dataset", None))
        check_distinct_splits(dataset, val_set, args.train_split, args.val_split)
        args.val_data = val_set.spec
    args.objective = "classify"
    cfg = config_from_args(args)
    if cfg.output == "runs/clipforge":
        cfg.output = "runs/finetune"
    # opened with the class names found here: class folders named for their classes need no classnames.txt
    train_source = open_source(dataset.spec, cfg.shuffle_buffer, classnames=dataset.classnames)
    return report(train(cfg, train_source, val_set.source if val_set else None))


def add_wise_ft_arguments(p: argparse.ArgumentParser) -> None:
    p.description = WISE_FT
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--zeroshot", required=True, help="the CLIP model before fine-tuning (a checkpoint)")
    p.add_argument("--finetuned", required=True, help="the fine-tuned checkpoint (clipforge finetune)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--alpha", type=float, help="one mixing coefficient: 0 = zero-shot, 1 = fine-tuned")
    g.add_argument("--alphas", help="several: '0,0.5,1' or a sweep 'start:stop:step' such as 0:1:0.1")
    p.add_argument("--output", required=True, help="folder: one checkpoint per alpha, alpha-0.50/ ...")
    p.set_defaults(func=run_wise_ft)


def run_wise_ft(args) -> int:
    from ..checkpoint import save_pretrained
    from ..finetune import load_classifier, parse_alphas, wise_ft

    alphas = parse_alphas(args.alphas if args.alphas is not None else str(0.5 if args.alpha is None else args.alpha))
    finetuned = load_classifier(args.finetuned)
    zeroshot = load_classifier(args.zeroshot, finetuned.classnames, finetuned.templates)
    for alpha in alphas:
        model = wise_ft(zeroshot, finetuned, alpha)
        path = save_pretrained(model, Path(args.output) / f"alpha-{alpha:.2f}", model.config)
        print(f"alpha {alpha:.2f}: {path}")
    return 0
