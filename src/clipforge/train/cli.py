"""``clipforge train``: flags named as open_clip's where the concept is the same."""
from __future__ import annotations

import argparse
import dataclasses

from .loop import PRECISIONS, TrainConfig

DESCRIPTION = """Train CLIP image and text encoders with the contrastive loss.

Data (--train-data / --val-data): WebDataset shards ('shards/{000000..000099}.tar', 'pipe:curl -s URL', a folder of
.tar files), a CSV/TSV (image path + caption columns) or a folder of images with sidecar .txt captions. Labelled
shards without text (image + .cls, classnames.txt beside the split folder) train with --label-captions.

Several processes or GPUs: torchrun --nproc-per-node 4 -m clipforge.cli train ... (DDP; NCCL on GPU, gloo on CPU).
"""

EXAMPLES = """examples:
  clipforge train --model ViT-Tiny-64 --train-data ../shared/data/cifar10/train --label-captions default \\
      --val-data ../shared/data/cifar10/test --steps 1000 --output runs/cifar
  clipforge train --resume latest --output runs/cifar ...same flags...     continue after a crash, exactly
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.epilog = DESCRIPTION, EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"zoo architecture (clipforge models) [{d.model}]")
    g.add_argument("--pretrained", help="start from these weights: a pretrained tag or a checkpoint path")
    g.add_argument("--text-model", help="a pretrained Hugging Face text encoder as text tower, e.g. all-minilm-l6-v2")
    g.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT)")
    g.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    g.add_argument("--patch-dropout", type=float, default=d.patch_dropout,
                   help="FLIP: fraction of image patches dropped (ViT)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory, more time")
    g.add_argument("--torchcompile", action="store_true", help="compile the model with torch.compile")
    g = p.add_argument_group("data")
    g.add_argument("--train-data", help="training data (shards, CSV or folder)")
    g.add_argument("--val-data", help="held-out data for periodic retrieval R@1/5/10, and zero-shot top-1/5 "
                                      "when labelled (classnames.txt beside it)")
    g.add_argument("--train-num-samples", type=int, help="dataset size, for --epochs on remote shards")
    g.add_argument("--label-captions", metavar="default|FILE",
                   help="caption labelled samples from class names: 'default' grammar or a file of templates with {}")
    g.add_argument("--exclude-classes", default="", help="comma-separated class names left out of training")
    g.add_argument("--workers", type=int, default=d.workers, help=f"DataLoader workers per process [{d.workers}]")
    g.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="shard sample shuffle buffer")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"per process [{d.batch_size}]")
    g.add_argument("--epochs", type=float, default=d.epochs, help=f"passes over the data [{d.epochs}]")
    g.add_argument("--steps", type=int, help="total optimiser steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate [{d.lr}]")
    g.add_argument("--wd", type=float, default=d.wd, help=f"AdamW weight decay (not on gains/biases/embeddings) [{d.wd}]")
    g.add_argument("--warmup", type=int, help="linear warmup steps [5%% of the steps]")
    g.add_argument("--beta1", type=float, default=d.beta1)
    g.add_argument("--beta2", type=float, default=d.beta2)
    g.add_argument("--eps", type=float, default=d.eps)
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 autocast on GPU, fp32 on CPU; amp = fp16 autocast with a grad scaler")
    g.add_argument("--accum-freq", type=int, default=d.accum_freq,
                   help="micro-batches per step (exact for the contrastive loss)")
    g.add_argument("--loss", choices=["clip", "siglip"], default=d.loss)
    g.add_argument("--local-loss", action="store_true", help="each rank computes only its rows (less memory)")
    g.add_argument("--loss-chunk-size", type=int, help="compute the loss in row chunks: memory linear in batch size")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("run")
    g.add_argument("--output", default=d.output, help=f"run folder: checkpoints/, metrics.jsonl [{d.output}]")
    g.add_argument("--resume", help="'latest' or a checkpoint step folder")
    g.add_argument("--save-every", type=int, default=d.save_every, help=f"checkpoint every N steps [{d.save_every}]")
    g.add_argument("--keep", type=int, default=d.keep, help=f"checkpoints kept [{d.keep}]")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--val-every", type=int, default=d.val_every, help="validate every N steps (and at the end)")
    g.add_argument("--val-samples", type=int, default=d.val_samples)
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... [GPU if available]")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values["exclude_classes"] = [c.strip() for c in (args.exclude_classes or "").split(",") if c.strip()]
    return TrainConfig(**values)


def run(args) -> int:
    from .loop import train

    cfg = config_from_args(args)
    if not cfg.train_data:
        raise ValueError("--train-data is required (or run `clipforge demo` for generated data)")
    summary = train(cfg)
    if summary["rank"] != 0:  # under torchrun, one report: rank 0 holds the checkpoint and the validation
        return 0
    print(f"done: {summary['steps']} steps, loss {summary['loss']:.4f}, checkpoint {summary['checkpoint']}")
    if summary["val"]:
        print("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["val"].items()))
    return 0
