"""``clipforge train``: flags named as open_clip's where the concept is the same; ``--config FILE`` for recipes."""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
from pathlib import Path

from ..files import read_user_text
from .loop import OBJECTIVES, PRECISIONS, TrainConfig
from .optim import SCHEDULES

DESCRIPTION = """Train CLIP image and text encoders with the contrastive loss.

Data (--train-data / --val-data): WebDataset shards ('shards/{000000..000099}.tar', 'pipe:curl -s URL', a folder of
.tar files), a CSV/TSV (image path + caption columns) or a folder of images with sidecar .txt captions. Labelled
data without text (shards of image + .cls with classnames.txt beside the split folder, a CSV with a label column, or
a folder of class folders named for their classes) trains with --label-captions.

Recipes: --config FILE (YAML or JSON) holds any of the settings below by their field names (train_data, lr,
model_cfg, ...); flags given on the command line override it. A run's own run_config.json is such a file, so
`clipforge train --config runs/a/run_config.json --output runs/b` repeats run a.

Several processes or GPUs: torchrun --nproc-per-node 4 -m clipforge.cli train ... (DDP; NCCL on GPU, gloo on CPU).

open_clip's command lines: its flags of the same meaning are read under its names too (--siglip, --grad-clip-norm,
--lr-scheduler cosine|const|const-cooldown, --lr-cooldown-power, --lr-cooldown-end, --log-every-n-steps,
--force-patch-dropout, --force-quick-gelu, --val-num-samples, --delete-previous-checkpoint as --keep 1, --aug-cfg
scale=... color_jitter=... color_jitter_prob=... gray_scale_prob=...); its epoch-counted and logging flags, and the
rest it has no counterpart for, are refused naming what to give instead.

Stopping: Ctrl-C or SIGTERM (a scheduler's preemption) ends the run after the current step with a checkpoint
(under torchrun, at the next --log-every step, where the ranks agree); --resume latest continues it exactly.
A second Ctrl-C quits at once.
"""

EXAMPLES = """examples:
  clipforge train --config recipes/flickr8k.yaml                          the published Flickr8k recipe
  clipforge train --config recipes/flickr8k.yaml --seed 1 --output runs/flickr8k-s1
  clipforge train --model ViT-Tiny-64 --train-data ../shared/data/cifar10/train --label-captions default \\
      --val-data ../shared/data/cifar10/test --steps 1000 --output runs/cifar
  clipforge train --resume latest --output runs/cifar ...same flags...     continue after a crash, exactly
  clipforge train --config recipes/flickr8k.yaml --zeroshot-data ../shared/data/cifar10 \\
      --zeroshot-data ../shared/data/flowers --val-every 400    zero-shot transfer tracked during training
  clipforge train --model ViT-Tiny-64 --distill-pretrained runs/flickr8k/checkpoints/step-00002400 \\
      --distill-text-cache --train-data ../shared/data/flickr8k/train --steps 1200 --output runs/student
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to 'not given' (argparse.SUPPRESS), so that a --config file's value is overridden only
    by flags actually typed; the defaults shown come from TrainConfig."""
    p.description, p.epilog = DESCRIPTION, EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.argument_default = argparse.SUPPRESS
    d = TrainConfig()
    p.add_argument("--config", help="a YAML or JSON file of settings (TrainConfig field names); flags override it "
                                    "(--no-hflip, --no-lock-text, ... turn its switches off)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"zoo architecture (clipforge models) [{d.model}]")
    g.add_argument("--model-cfg", type=json.loads, metavar="JSON",
                   help='overrides merged into the architecture, e.g. \'{"vision_cfg": {"image_size": 96}}\'')
    g.add_argument("--pretrained", help="start from these weights: a pretrained tag or a checkpoint path")
    g.add_argument("--force-image-size", type=int, metavar="N",
                   help="train at N pixels: the architecture's image size replaced, --pretrained weights' position "
                        "grid resized to it (bicubic), as open_clip's flag")
    g.add_argument("--text-model", help="a pretrained Hugging Face text encoder as text tower, e.g. all-minilm-l6-v2")
    g.add_argument("--lock-image", action=argparse.BooleanOptionalAction,
                   help="freeze the image tower (LiT); as open_clip's flag, a timm-named tower (ConvNeXt, ViTamin ...) "
                        "freezes its trunk and its projection head outside the trunk trains (see --lock-image-head)")
    g.add_argument("--lock-image-head", action=argparse.BooleanOptionalAction,
                   help="with --lock-image: that projection head freezes too (the whole tower, as LiT locks it)")
    g.add_argument("--lock-image-unlocked-groups", type=int, metavar="N",
                   help="with --lock-image: its last N groups train, as open_clip groups them (a ViT: the embeddings "
                        "with ln_pre, each block, the last block with ln_post, the projection; SigLIP, EVA, PE, "
                        "ViTamin, ConvNeXt and FastViT towers as timm groups them, the projection head in the last "
                        "group; a ResNet is locked whole) [0]")
    g.add_argument("--lock-image-freeze-bn-stats", action=argparse.BooleanOptionalAction,
                   help="with --lock-image-unlocked-groups: the locked groups' batch norms (FastViT's) keep their "
                        "running statistics, as open_clip's flag; a tower locked whole keeps them anyway")
    g.add_argument("--lock-text", action=argparse.BooleanOptionalAction,
                   help="freeze the text tower (a Hugging Face tower keeps its new projection trainable, as in "
                        "open_clip); its features are computed once per distinct caption and cached")
    g.add_argument("--lock-text-unlocked-layers", type=int, metavar="N",
                   help="with --lock-text: its last N layers train (CLIP's tower: the embeddings, each block, the last "
                        "block with ln_final, the projection; a Hugging Face tower: the embeddings and each layer) [0]")
    g.add_argument("--lock-text-freeze-layer-norm", action=argparse.BooleanOptionalAction,
                   help="a locked Hugging Face tower's LayerNorms stay frozen [on]; --no-lock-text-freeze-layer-norm "
                        "trains them (open_clip's default), which rules out --text-cache")
    g.add_argument("--patch-dropout", type=float, help=f"FLIP: fraction of image patches dropped (ViT) [{d.patch_dropout}]")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute each block in backward: least memory, most time")
    g.add_argument("--recompute-activations", action=argparse.BooleanOptionalAction,
                   help="recompute the blocks' LayerNorm, GELU and head-merge outputs in backward instead of keeping "
                        "them, same gradients [on]; off, an H200 step (ViT-B-32, batch 256) is 1.15x faster and "
                        "takes 1.38x the memory above weights and optimiser state")
    g.add_argument("--torchcompile", action=argparse.BooleanOptionalAction, help="compile the model with torch.compile")
    g.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and AdamW state across ranks (PyTorch FSDP2; torchrun for several; "
                        "bf16 compute with fp32 reduction on GPU); checkpoints become sharded folders (DCP) that "
                        "clipforge.load and clipforge convert read")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help=f"contrastive (CLIP; SigLIP with --loss siglip); bow: predict the caption's bag of words from "
                        f"the image, the CLIP paper's baseline; caption: predict the caption word by word (its "
                        f"transformer language-model baseline); labels: the classes of labelled data, or the caption's "
                        f"concrete nouns (multi-label); self-supervised: two augmented views, no language (SimCLR); "
                        f"classify: fine-tune --pretrained (see clipforge finetune) "
                        f"[{d.objective}]")
    g.add_argument("--bow-vocab", type=int, help=f"bow / caption / labels: the N most frequent caption words / nouns "
                        f"[{d.bow_vocab}]")
    g.add_argument("--text-cache", action=argparse.BooleanOptionalAction,
                   help="with --lock-text: compute the frozen text features of every training caption once, before "
                        "training (for a dataset seen for many epochs), kept in the run folder and in "
                        "$CLIPFORGE_CACHE/text-features, where a resume or another run on the same captions and "
                        "frozen tower reads them")
    g = p.add_argument_group("distillation (a frozen teacher CLIP; open_clip's --distill-model)")
    g.add_argument("--distill-model", help="the teacher: a zoo name (with --distill-pretrained) or a checkpoint path; "
                                           "any format clipforge.load reads, with its own tokenizer and image size")
    g.add_argument("--distill-pretrained", help="the teacher's weights: a pretrained tag or a checkpoint path")
    g.add_argument("--distill-weight", type=float,
                   help=f"weight of the distillation term (each similarity row matched to the teacher's softmax) "
                        f"beside the student's loss [{d.distill_weight}]")
    g.add_argument("--distill-text-cache", action=argparse.BooleanOptionalAction,
                   help="compute the teacher's text features of every training caption once, before training")
    g.add_argument("--distill-precision", choices=("fp32", "bf16", "fp16"),
                   help=f"the teacher's weights (bf16: half the memory of a large teacher on a GPU; slow on most "
                        f"CPUs) [{d.distill_precision}]")
    g = p.add_argument_group("data")
    g.add_argument("--train-data", help="training data (shards, CSV or folder)")
    g.add_argument("--val-data", help="held-out data for periodic retrieval R@1/5/10 (every caption of an image "
                                      "counts), and zero-shot top-1/5 when labelled (classnames.txt beside it)")
    g.add_argument("--csv-img-key", metavar="COLUMN",
                   help="a CSV's image path column [the first of filepath, image, path, image_path, file]")
    g.add_argument("--csv-caption-key", metavar="COLUMN", help="a CSV's caption column [title, caption or text]")
    g.add_argument("--csv-separator", metavar="CHAR", type=lambda s: "\t" if s in ("\\t", "tab") else s,
                   help="a CSV's separator ('\\t' or 'tab' for a tab) [a tab for .tsv files and tab-separated "
                        "headers, else a comma]")
    g.add_argument("--zeroshot-data", action="append", metavar="ROOT",
                   help="a labelled data set (a folder clipforge eval reads: CLIP_benchmark shards with "
                        "classnames.txt, class folders or a CSV) whose zero-shot top-1/5 is measured whenever the "
                        "run validates (--val-every, and at the end), as val/<name>/zeroshot_top1; repeat for more; "
                        "--val-samples images of each (open_clip's --imagenet-val)")
    g.add_argument("--zeroshot-split", help=f"the split of each --zeroshot-data root [{d.zeroshot_split}]")
    g.add_argument("--train-num-samples", type=int, help="dataset size, for --epochs on remote shards")
    g.add_argument("--train-data-upsampling-factors", metavar="F1::F2",
                   help="one factor per '::'-separated shard list of --train-data, as open_clip's: each epoch reads "
                        "every shard of a list that many times as often (fractions drawn per epoch), e.g. 1::2")
    g.add_argument("--label-captions", metavar="default|FILE",
                   help="caption labelled samples from class names: 'default' grammar or a file of templates with {}")
    g.add_argument("--exclude-classes", help="comma-separated class names left out of training")
    g.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help=f"random resized crop: fraction of the image area kept [{d.crop_scale[0]} {d.crop_scale[1]}]")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips, with 'left' and 'right' swapped in the caption to match")
    g.add_argument("--color-jitter", type=float, nargs="+", metavar="S",
                   help="colour jitter after the crop, as torchvision's ColorJitter: brightness, contrast, saturation "
                        "[and hue] strengths (one number: the first three), e.g. 0.4 0.4 0.4 0.1; a hue shift can "
                        "contradict a caption's colour words [none]")
    g.add_argument("--color-jitter-prob", type=float, metavar="P",
                   help="how often the jitter applies [0.8 with --color-jitter]")
    g.add_argument("--gray-scale-prob", type=float, metavar="P",
                   help=f"how often the image turns grey [{d.gray_scale_prob}]")
    g.add_argument("--workers", type=int, help=f"DataLoader workers per process [{d.workers}]")
    g.add_argument("--shuffle-buffer", type=int, help=f"shard sample shuffle buffer [{d.shuffle_buffer}]")
    add_optimisation_arguments(p)
    add_run_arguments(p)
    add_open_clip_spellings(p)
    p.set_defaults(func=run)


# open_clip_train's flags with no exact counterpart here, and what to give instead
OPEN_CLIP_INSTEAD = {
    "--save-frequency": "clipforge counts steps: --save-every N",
    "--val-frequency": "clipforge counts steps: --val-every N",
    "--zeroshot-frequency": "clipforge counts steps: --val-every N, with --zeroshot-data ROOT for each labelled set",
    "--imagenet-val": "give --zeroshot-data ROOT (class folders, or shards with classnames.txt beside them)",
    "--imagenet-v2": "give --zeroshot-data ROOT (class folders, or shards with classnames.txt beside them)",
    "--epochs-cooldown": "clipforge counts steps: --lr-schedule constant-cooldown --cooldown N",
    "--logs": "give the run's own folder as --output FOLDER",
    "--name": "give the run's own folder as --output FOLDER",
    "--report-to": "metrics go to OUTPUT/metrics.jsonl, and to OUTPUT/tensorboard when tensorboard is installed",
    "--dataset-type": "the kind of data is read from --train-data itself (a .csv/.tsv, shards, a folder)",
    "--dataset-resampled": "not needed: each process reads its shards as an endless stream, so uneven shards never "
                           "leave a rank without data",
    "--gather-with-grad": "not needed: clipforge's loss always gathers the other ranks' features with gradients",
    "--horovod": "run several processes under torchrun",
    "--opt": "clipforge trains with AdamW (--beta1, --beta2, --eps, --wd)",
    "--momentum": "clipforge trains with AdamW (--beta1, --beta2, --eps, --wd)",
    "--skip-scheduler": "give --lr-schedule constant --warmup 0",
    "--save-most-recent": "not needed: every checkpoint is whole, --resume latest finds the newest and --keep N bounds "
                          "how many stay",
    "--torchscript": "export a trained model with `clipforge export onnx CHECKPOINT OUT`",
    "--trace": "export a trained model with `clipforge export onnx CHECKPOINT OUT`",
    "--pretrained-image": "timm's hub weights are not fetched here: give --pretrained TAG_OR_CHECKPOINT",
    "--force-custom-text": "not needed: clipforge reads and writes both of open_clip's text-tower layouts",
    "--use-bn-sync": "not built: a ResNet tower's batch norms keep per-process statistics under DDP",
    "--use-bnb-linear": "not built: bitsandbytes' int8 linear layers",
    "--loss-dist-impl": "not needed: the loss gathers the other ranks' features itself (--local-loss)",
    "--ddp-static-graph": "not needed: torchrun and DDP are set up by clipforge",
    "--no-set-device-rank": "not needed: each torchrun process takes the GPU of its LOCAL_RANK",
    "--dist-url": "torchrun sets the rendezvous (--master-addr, --master-port)",
    "--dist-backend": "not needed: NCCL on GPUs, gloo on CPUs",
    "--remote-sync": "copy OUTPUT yourself: checkpoints are written atomically, whole, one folder per step",
    "--remote-sync-frequency": "copy OUTPUT yourself: checkpoints are written atomically, whole, one folder per step",
    "--remote-sync-protocol": "copy OUTPUT yourself: checkpoints are written atomically, whole, one folder per step",
    "--wandb-project-name": "metrics go to OUTPUT/metrics.jsonl, and to OUTPUT/tensorboard when tensorboard is "
                            "installed",
    "--wandb-notes": "metrics go to OUTPUT/metrics.jsonl, and to OUTPUT/tensorboard when tensorboard is installed",
    "--copy-codebase": "not needed: OUTPUT/run_config.json records the run's settings",
    "--log-local": "give the run's own folder as --output FOLDER",
    "--debug": "give the run's own folder as --output FOLDER (metrics.jsonl logs every --log-every steps)",
    "--cache-dir": "nothing is downloaded here: give --pretrained a local checkpoint or an installed tag",
}


class _OpenClipAugCfg(argparse.Action):
    """open_clip's ``--aug-cfg KEY=VALUE ...`` (its non-timm training transform) read as clipforge's settings:
    ``scale`` -> --crop-scale, ``color_jitter``, ``color_jitter_prob``, ``gray_scale_prob``; the rest refused."""

    TAKEN = {"scale": "crop_scale", "color_jitter": "color_jitter", "color_jitter_prob": "color_jitter_prob",
             "gray_scale_prob": "gray_scale_prob"}

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="+", help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        import ast

        settings = {}
        for item in values:
            key, _, text = item.partition("=")
            try:
                settings[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                parser.error(f"--aug-cfg {item}: expected KEY=VALUE with a Python literal value, e.g. "
                             "color_jitter='(0.4, 0.4, 0.4, 0.1)' color_jitter_prob=0.8")
        others = sorted(set(settings) - set(self.TAKEN))
        if others:
            parser.error(f"--aug-cfg {', '.join(others)}: only open_clip's own (non-timm) transform is built here: "
                         f"{', '.join(self.TAKEN)} (ratio is 3/4 to 4/3 as in open_clip's crop; timm's RandAugment "
                         "and random erasing are not built)")
        if "color_jitter" in settings and not settings.get("color_jitter_prob"):
            parser.error("--aug-cfg color_jitter without color_jitter_prob: open_clip leaves the jitter unused; "
                         "give color_jitter_prob=P too")
        for key, value in settings.items():
            setattr(namespace, self.TAKEN[key], tuple(value) if isinstance(value, (list, tuple)) else value)


class _OpenClipOnly(argparse.Action):
    """An open_clip flag without an exact counterpart: the command stops and names what to give instead."""

    def __init__(self, option_strings, dest, instead: str = "", **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", help=argparse.SUPPRESS)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is open_clip's; {self.instead}")


def add_open_clip_spellings(p: argparse.ArgumentParser) -> None:
    """open_clip's names for settings clipforge has under its own (hidden from --help; the description lists them),
    and its flags that have no exact counterpart (``OPEN_CLIP_INSTEAD``)."""
    hidden = argparse.SUPPRESS
    schedules = {"cosine": "cosine", "const": "constant", "const-cooldown": "constant-cooldown"}

    def open_clip_schedule(name: str) -> str:
        if name not in schedules:
            raise argparse.ArgumentTypeError(f"{name!r}: open_clip's schedules are {', '.join(schedules)}")
        return schedules[name]

    p.add_argument("--siglip", dest="loss", action="store_const", const="siglip", help=hidden)
    p.add_argument("--grad-clip-norm", dest="grad_clip", type=float, help=hidden)
    p.add_argument("--lr-scheduler", dest="lr_schedule", type=open_clip_schedule, help=hidden)
    p.add_argument("--log-every-n-steps", dest="log_every", type=int, help=hidden)
    p.add_argument("--force-patch-dropout", dest="patch_dropout", type=float, help=hidden)
    p.add_argument("--delete-previous-checkpoint", dest="keep", action="store_const", const=1, help=hidden)
    p.add_argument("--lr-cooldown-power", dest="cooldown_power", type=float, help=hidden)
    p.add_argument("--val-num-samples", dest="val_samples", type=int, help=hidden)
    p.add_argument("--force-quick-gelu", action="store_true", help=hidden)
    p.add_argument("--lr-cooldown-end", dest="lr_end", type=float, help=hidden)
    p.add_argument("--aug-cfg", action=_OpenClipAugCfg)
    for flag, instead in OPEN_CLIP_INSTEAD.items():
        p.add_argument(flag, action=_OpenClipOnly, instead=instead)


def add_optimisation_arguments(p: argparse.ArgumentParser) -> None:
    """The optimiser, schedule, precision and loss flags (also ``clipforge finetune``'s)."""
    d = TrainConfig()
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help=f"per process [{d.batch_size}]")
    g.add_argument("--epochs", type=float, help=f"passes over the data [{d.epochs}]")
    g.add_argument("--steps", type=int, help="total optimiser steps (overrides --epochs)")
    g.add_argument("--lr", type=float, help=f"peak learning rate [{d.lr}]")
    g.add_argument("--wd", type=float, help=f"AdamW weight decay (not on gains/biases/embeddings) [{d.wd}]")
    g.add_argument("--warmup", type=int, help="linear warmup steps [5%% of the steps]")
    g.add_argument("--lr-schedule", choices=SCHEDULES,
                   help="after warmup: cosine decay to --lr-end (CLIP's); constant; or constant-cooldown, constant "
                        f"then a fall to --lr-end over the last --cooldown steps [{d.lr_schedule}]")
    g.add_argument("--cooldown", type=int, help="constant-cooldown: steps of the final decay [10%% of the steps]")
    g.add_argument("--cooldown-power", type=float,
                   help=f"constant-cooldown: the fall's shape, (1 - progress) ** power; 1 is linear "
                        f"[{d.cooldown_power}]")
    g.add_argument("--lr-end", type=float, help=f"the learning rate the schedule ends at [{d.lr_end}]")
    g.add_argument("--beta1", type=float, help=f"[{d.beta1}]")
    g.add_argument("--beta2", type=float, help=f"[{d.beta2}]")
    g.add_argument("--eps", type=float, help=f"[{d.eps}]")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="auto: bf16 autocast on GPU, fp32 on CPU; amp = fp16 autocast with a grad scaler [auto]")
    g.add_argument("--accum-freq", type=int,
                   help=f"micro-batches per step (exact for the contrastive loss) [{d.accum_freq}]")
    g.add_argument("--loss", choices=["clip", "siglip"], help=f"[{d.loss}]")
    g.add_argument("--local-loss", action=argparse.BooleanOptionalAction,
                   help="each rank computes only its rows (less memory)")
    g.add_argument("--loss-chunk-size", type=int, help="compute the loss in row chunks: memory linear in batch size")
    g.add_argument("--coca-caption-loss-weight", type=float,
                   help=f"a CoCa model (coca_*): weight of its captioning loss [{d.coca_caption_loss_weight}]")
    g.add_argument("--coca-contrastive-loss-weight", type=float,
                   help=f"a CoCa model: weight of its contrastive loss [{d.coca_contrastive_loss_weight}]")
    g.add_argument("--seed", type=int, help=f"[{d.seed}]")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Run folder, checkpoints, logging, validation and device flags (also ``clipforge finetune``'s)."""
    d = TrainConfig()
    g = p.add_argument_group("run")
    g.add_argument("--output", help=f"run folder: checkpoints/, metrics.jsonl, run_config.json [{d.output}]")
    g.add_argument("--resume", help="'latest' or a checkpoint step folder")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="start over in an --output folder that holds an earlier run's checkpoints, deleting them "
                   "(refused without it)")
    g.add_argument("--save-every", type=int, help=f"checkpoint every N steps [{d.save_every}]")
    g.add_argument("--keep", type=int, help=f"checkpoints kept [{d.keep}]")
    g.add_argument("--log-every", type=int, help=f"[{d.log_every}]")
    g.add_argument("--val-every", type=int, help=f"validate every N steps (and at the end) [{d.val_every}]")
    g.add_argument("--val-samples", type=int, help=f"validation images [{d.val_samples}]")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... [GPU if available]")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def read_config(path: str | Path) -> dict:
    """Settings from a YAML or JSON file: TrainConfig's fields, or a run's ``run_config.json`` (its ``train``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = read_user_text(path, "--config")
    try:  # JSON by its own rules (YAML 1.1 would read 1e-06 as a string); anything else as YAML
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    data = data.get("train", data) if isinstance(data.get("train"), dict) else data  # a run_config.json
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return {key: _typed(key, value, path) for key, value in data.items()}


def _typed(key: str, value, path: Path):
    """YAML 1.1 reads ``1e-3`` as a string: numbers for numeric settings, with the setting named if it is not one."""
    kind = str(next(f.type for f in dataclasses.fields(TrainConfig) if f.name == key))
    if isinstance(value, str) and kind.split(" | ")[0] in ("float", "int"):
        try:
            return float(value) if kind.startswith("float") else int(value)
        except ValueError:
            raise ValueError(f"--config {path}: {key} should be a number, got {value!r}") from None
    return value


def config_from_args(args) -> TrainConfig:
    """TrainConfig's defaults, then the --config file, then the flags given."""
    values = read_config(args.config) if getattr(args, "config", None) else {}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if isinstance(flags.get("exclude_classes"), str):
        flags["exclude_classes"] = [c.strip() for c in flags["exclude_classes"].split(",") if c.strip()]
    values.update(flags)
    if getattr(args, "force_quick_gelu", False):  # open_clip's flag: OpenAI's activation in a config without it
        values["model_cfg"] = {**(values.get("model_cfg") or {}), "quick_gelu": True}
    if isinstance(values.get("zeroshot_data"), str):  # one root in a config file
        values["zeroshot_data"] = [values["zeroshot_data"]]
    for key in ("crop_scale", "color_jitter"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return TrainConfig(**values)


def run(args) -> int:
    from .loop import train

    cfg = config_from_args(args)
    if not cfg.train_data:
        raise ValueError("--train-data is required (or a --config that names it; or run `clipforge demo` for "
                         "generated data)")
    try:
        summary = train(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # also on failure; a finished torchrun rank then leaves as cli.main says
            dist.destroy_process_group()
    return report(summary)


def report(summary: dict) -> int:
    """Print how a run of ``train()`` ended; the command's exit code."""
    if summary["stopped_by"]:  # by a signal, with a checkpoint: the run is not done, so not a success either
        if summary["rank"] == 0:
            print(f"stopped by {summary['stopped_by']} at step {summary['steps']} of {summary['total_steps']}, "
                  f"checkpoint {summary['checkpoint']}; continue with the same command and --resume latest")
        return 128 + signal.Signals[summary["stopped_by"]].value
    if summary["rank"] == 0:  # under torchrun, one report: rank 0 holds the checkpoint and the validation
        print(f"done: {summary['steps']} steps, loss {summary['loss']:.4f}, checkpoint {summary['checkpoint']}")
        if summary["val"]:
            print("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["val"].items()))
    return 0
