"""The contrastive training loop: one plain function, from one CPU process to many GPUs under ``torchrun``.

    cfg = TrainConfig(model="ViT-Tiny-64", train_data="shards/{000000..000009}.tar", steps=2000, output="runs/a")
    summary = train(cfg)
    exit_torchrun_rank()  # only under torchrun: see there

A step consumes ``accum_freq`` micro-batches of ``batch_size`` samples on every rank. Checkpoints hold everything
needed to continue exactly (weights, optimizer, schedule, scaler, RNG, data position), so a run killed at any
moment and restarted with ``resume="latest"`` ends with the same weights as one that never stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load_into, read_checkpoint
from ..checkpoint.io import is_sharded_checkpoint, resize_positions
from ..data import ContrastiveStream, make_loader, open_source
from ..data.captions import swap_left_right
from ..data.pipeline import caption_texts, continue_interleaving, stop_workers
from ..data.sources import folder_classnames, source_classnames
from ..environment import run_environment
from ..files import read_json, run_lock, write_json
from ..models import create_model, get_model_config, is_resnet, merge_config
from ..models.feature_cache import fill_kept
from ..preprocess import TrainTransform
from ..prompts import load_templates
from .checkpoints import (checkpoint_dirs, load_train_state, resolve_resume, rng_state, save_checkpoint,
                          set_rng_state)
from .objectives import objective_for
from .optim import SCHEDULES, build_optimizer, lr_schedule
from .step import autocast_for, train_step
from .stop import StopRequest
from .validation import open_validation, open_zero_shot_sets, validate, zero_shot_metrics

PRECISIONS = ("auto", "fp32", "amp", "amp_bf16", "amp_fp16")
OBJECTIVES = ("contrastive", "bow", "caption", "labels", "self-supervised", "classify")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


@dataclass
class TrainConfig:
    model: str = "ViT-Tiny-64"
    model_cfg: dict | None = None  # overrides merged into the zoo architecture, e.g. {"vision_cfg": {"image_size": 96}}
    pretrained: str | None = None
    train_data: str | None = None
    val_data: str | None = None
    csv_img_key: str | None = None  # a CSV's image path column [filepath, image, path ...] (open_clip's flags)
    csv_caption_key: str | None = None  # its caption column [title, caption, text]
    csv_separator: str | None = None  # [a tab for .tsv and tab-separated headers, else a comma]
    train_num_samples: int | None = None
    # one factor per '::'-separated shard list of train_data ("1::2"): open_clip's --train-data-upsampling-factors
    train_data_upsampling_factors: str | None = None
    batch_size: int = 64
    epochs: float = 1.0
    steps: int | None = None
    lr: float = 5e-4
    wd: float = 0.2
    warmup: int | None = None  # default: 5% of the steps
    lr_schedule: str = "cosine"  # or "constant", "constant-cooldown" (train.optim.lr_schedule)
    cooldown: int | None = None  # constant-cooldown: steps of the final decay [10% of the steps]
    lr_end: float = 0.0  # the learning rate the cosine or the cooldown ends at
    cooldown_power: float = 1.0  # constant-cooldown: 1 a linear fall, else (1 - progress) ** power (open_clip's)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = None
    precision: str = "auto"
    accum_freq: int = 1
    loss: str = "clip"
    local_loss: bool = False
    loss_chunk_size: int | None = None
    coca_caption_loss_weight: float = 2.0  # CoCa: open_clip's weights of its captioning and contrastive terms
    coca_contrastive_loss_weight: float = 1.0
    grad_checkpointing: bool = False
    recompute_activations: bool = True  # CLIP.set_activation_recompute: less memory; off is faster on a GPU
    fsdp: bool = False  # shard weights, gradients and optimizer state across ranks (PyTorch FSDP2, clipforge.train.fsdp)
    torchcompile: bool = False
    patch_dropout: float = 0.0
    force_image_size: int | None = None  # train at this size: --pretrained positions resized to it (open_clip's)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0  # a locked tower's last groups left training (open_clip's; CLIP.lock_image_tower)
    lock_image_freeze_bn_stats: bool = False  # with unlocked groups: the locked groups' batch-norm statistics frozen
    lock_image_head: bool = False  # locked whole: a timm-named tower's projection head freezes too (open_clip's trains)
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0  # a locked text tower's last layers left training (CLIP.lock_text_tower)
    lock_text_freeze_layer_norm: bool = True  # False: a locked Hugging Face tower's LayerNorms train (open_clip's default)
    text_cache: bool = False
    objective: str = "contrastive"  # or "bow": predict the caption's words from the image (clipforge.bow);
    bow_vocab: int = 1000           # "caption": word by word (clipforge.caption_lm); "classify": fine-tune
                                    # --pretrained on labelled data (clipforge.finetune)
    templates: list[str] | None = None  # classify: the prompts of the zero-shot head [the default prompt]
    head_only: bool = False  # classify: train the head alone
    text_model: str | None = None
    distill_model: str | None = None  # a frozen teacher CLIP to distill from (train.distill): a zoo name or a path
    distill_pretrained: str | None = None  # its weights (a tag or a checkpoint), as --model / --pretrained elsewhere
    distill_weight: float = 1.0  # the distillation term's weight beside the student's own loss (open_clip's: 1)
    distill_text_cache: bool = False  # the teacher's text features of every training caption computed once
    distill_precision: str = "fp32"  # the teacher's weights: fp32, bf16 or fp16 (inference.inference_dtype)
    label_captions: str | None = None
    exclude_classes: list[str] = field(default_factory=list)
    crop_scale: tuple[float, float] = (0.9, 1.0)
    hflip: bool = False
    # open_clip's colour augmentations (aug_cfg without timm): ColorJitter(brightness, contrast, saturation, hue)
    # with probability color_jitter_prob (None: 0.8 when color_jitter is given), grey scale with gray_scale_prob
    color_jitter: tuple[float, ...] | None = None
    color_jitter_prob: float | None = None
    gray_scale_prob: float = 0.0
    seed: int = 0
    workers: int = 2
    output: str = "runs/clipforge"
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    val_every: int = 0
    val_samples: int = 1000
    zeroshot_data: list[str] = field(default_factory=list)  # labelled data set roots: zero-shot top-1/5 at validation
    zeroshot_split: str = "test"
    resume: str | None = None
    overwrite: bool = False  # start over in an output folder holding an earlier run's checkpoints (deleted first)
    shuffle_buffer: int = 1000
    progress: bool = True
    device: str | None = None

    def csv_keys(self) -> dict:
        """The CSV columns and separator the flags name, for ``open_source``."""
        return {"image_key": self.csv_img_key, "caption_key": self.csv_caption_key, "separator": self.csv_separator}


# ---------------------------------------------------------------------------------------------------- setup steps

def _init_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.fsdp and not dist.is_initialized():  # one process: FSDP still wants a process group
        from .fsdp import init_single_process_group

        init_single_process_group(device)
    return rank, world, device


def exit_torchrun_rank(code: int = 0) -> None:
    """End this process now, with ``code``, without Python's interpreter shutdown: the last line of a script that
    calls ``train()`` (or any collective) under torchrun.

    Gloo's worker threads free each finished collective's tensors, and freeing one that Python also saw takes the
    GIL; a worker doing so while the interpreter finalizes is ended inside a C++ destructor, which aborts the process
    ("terminate called without an active exception", exit -6) after every file was written and closed: about one
    two-rank run in ten on two cores (traced in a core dump). This leaves the process group, flushes logging and the
    standard streams, and exits with ``os._exit``. ``clipforge`` commands do this themselves under torchrun."""
    import logging

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# the least each number may be (None: not set, allowed); a config file bypasses argparse, so they are checked here
_AT_LEAST = {"batch_size": 1, "accum_freq": 1, "log_every": 1, "val_samples": 1, "bow_vocab": 1, "workers": 0,
             "save_every": 0, "keep": 0, "val_every": 0, "shuffle_buffer": 0, "steps": 1, "train_num_samples": 1,
             "loss_chunk_size": 1, "warmup": 0, "cooldown": 1, "lock_image_unlocked_groups": 0,
             "lock_text_unlocked_layers": 0, "force_image_size": 1}


def _check_config(cfg: TrainConfig) -> None:
    """Refuse settings that would fail late, hang (a batch of 0) or divide by zero, naming the flag."""
    def refuse(name: str, value, expected: str):
        raise ValueError(f"--{name.replace('_', '-')} {value}: expected {expected}")

    for name, least in _AT_LEAST.items():
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            refuse(name, value, f"a whole number of at least {least}")
    for name in ("lr", "eps") + (() if cfg.steps else ("epochs",)):
        if not getattr(cfg, name) > 0:
            refuse(name, getattr(cfg, name), "a number above 0")
    if not cfg.wd >= 0:
        refuse("wd", cfg.wd, "a number of at least 0")
    if not cfg.cooldown_power > 0:
        refuse("cooldown_power", cfg.cooldown_power, "a power above 0 (1: a linear fall)")
    if not 0 <= cfg.lr_end <= cfg.lr:
        refuse("lr_end", cfg.lr_end, f"a learning rate from 0 to --lr ({cfg.lr})")
    if cfg.lr_schedule not in SCHEDULES:
        refuse("lr_schedule", cfg.lr_schedule, f"one of {', '.join(SCHEDULES)}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        refuse("grad_clip", cfg.grad_clip, "a norm above 0")
    for name in ("beta1", "beta2", "patch_dropout"):
        if not 0 <= getattr(cfg, name) < 1:
            refuse(name, getattr(cfg, name), "a number from 0 up to (not including) 1")
    if cfg.csv_separator is not None and len(cfg.csv_separator) != 1:
        refuse("csv_separator", repr(cfg.csv_separator), "one character ('\\t' or 'tab' on the command line: a tab)")
    low, high = cfg.crop_scale
    if not 0 < low <= high <= 1:
        refuse("crop_scale", f"{low} {high}", "MIN MAX with 0 < MIN <= MAX <= 1")
    if cfg.color_jitter is not None or cfg.color_jitter_prob or cfg.gray_scale_prob:
        if cfg.objective == "self-supervised":
            raise ValueError("--color-jitter / --gray-scale-prob: the self-supervised objective draws SimCLR's own "
                             "colour changes for each view; leave them out")
        TrainTransform(8, **colour_augmentation(cfg))  # its errors name the setting
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; choose from {', '.join(OBJECTIVES)}")
    if cfg.zeroshot_data and cfg.objective in ("self-supervised", "classify"):
        raise ValueError(f"--zeroshot-data measures zero-shot classification, which --objective {cfg.objective} "
                         "does not give (no text side to name the classes with)")
    if cfg.fsdp and (cfg.objective != "contrastive" or cfg.text_cache or cfg.torchcompile or _distilling(cfg)):
        raise ValueError("--fsdp trains CLIP models with the contrastive or SigLIP loss; it does not combine with "
                         "--objective other than contrastive, --text-cache, --torchcompile or --distill-* (yet)")
    for tower, partial in (("image", cfg.lock_image_unlocked_groups), ("text", cfg.lock_text_unlocked_layers)):
        if partial and not getattr(cfg, f"lock_{tower}"):
            raise ValueError(f"--lock-{tower}-unlocked-{'groups' if tower == 'image' else 'layers'} {partial} leaves "
                             f"part of a locked {tower} tower training: give --lock-{tower} too")
    if cfg.lock_image_head and (not cfg.lock_image or cfg.lock_image_unlocked_groups):
        raise ValueError("--lock-image-head freezes the projection head of an image tower locked whole: give "
                         "--lock-image" + (", not --lock-image-unlocked-groups (the head is in the last group)"
                                           if cfg.lock_image_unlocked_groups else " too"))
    if cfg.text_cache and (cfg.lock_text_unlocked_layers or not cfg.lock_text_freeze_layer_norm):
        raise ValueError("--text-cache keeps a frozen text tower's features; with --lock-text-unlocked-layers or "
                         "--no-lock-text-freeze-layer-norm part of it trains: leave --text-cache out")
    if _distilling(cfg):
        if cfg.objective != "contrastive":
            raise ValueError(f"--distill-model / --distill-pretrained train a CLIP student (objective contrastive), "
                             f"not --objective {cfg.objective}")
        if not cfg.distill_weight > 0:
            refuse("distill_weight", cfg.distill_weight, "a number above 0")
    elif cfg.distill_text_cache:
        raise ValueError("--distill-text-cache caches a teacher's text features: give --distill-model / "
                         "--distill-pretrained")


def colour_augmentation(cfg: TrainConfig) -> dict:
    """TrainTransform's colour arguments from the run's settings."""
    probability = cfg.color_jitter_prob if cfg.color_jitter_prob is not None else \
        0.8 if cfg.color_jitter is not None else 0.0
    return {"color_jitter": cfg.color_jitter, "color_jitter_prob": probability, "gray_scale_prob": cfg.gray_scale_prob}


def _distilling(cfg: TrainConfig) -> bool:
    return bool(cfg.distill_model or cfg.distill_pretrained)


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return "amp_fp16" if precision == "amp" else precision


def model_config_for(cfg: TrainConfig) -> dict:
    config = merge_config(get_model_config(cfg.model), copy.deepcopy(cfg.model_cfg or {}))
    if cfg.patch_dropout:
        config["vision_cfg"]["patch_dropout"] = cfg.patch_dropout
    if cfg.force_image_size:
        config["vision_cfg"]["image_size"] = cfg.force_image_size
    if cfg.text_model:
        context = config["text_cfg"].get("context_length", 77)
        config["text_cfg"] = {"hf_model_name": cfg.text_model, "pooling": "mean", "context_length": context}
    if cfg.loss == "siglip":  # the SigLIP paper's initialisation: temperature 10, bias -10
        config.setdefault("init_logit_scale", math.log(10))
        config.setdefault("init_logit_bias", -10.0)
    return config


def _build_model(cfg: TrainConfig, model_config: dict, device: torch.device, world: int, model=None,
                 precision: str = "fp32"):
    """(the module the steps run: DDP- or FSDP- and compile-wrapped as asked, the bare model)."""
    if model is None:
        model = create_model(model_config)
    if cfg.pretrained and cfg.objective != "classify":  # (a classifier is built from its --pretrained)
        from .. import read_model_weights

        # the weights go straight into the model built above (no second model to copy them from); at another image
        # size or context length (--force-image-size, --model-cfg) their positions are resized as open_clip does
        _, state, normalisation, _ = read_model_weights(cfg.model, pretrained=cfg.pretrained)
        load_into(model, resize_positions(state, model), source=cfg.pretrained)
        model.normalisation = normalisation  # its image mean/std: training and validation use them
    if cfg.lock_image:
        model.lock_image_tower(cfg.lock_image_unlocked_groups, cfg.lock_image_freeze_bn_stats, cfg.lock_image_head)
    if cfg.lock_text:
        model.lock_text_tower(cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_layer_norm)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if not cfg.recompute_activations and hasattr(model, "set_activation_recompute"):
        model.set_activation_recompute(False)
    model.to(device)
    if device.type == "cuda" and is_resnet(model_config):
        model.to(memory_format=torch.channels_last)  # ResNet convolutions run faster channels-last
    core = model
    if cfg.fsdp:  # sharded in place: the module the steps run is the model itself
        from .fsdp import shard_model

        return shard_model(model, bf16=device.type == "cuda" and precision == "amp_bf16"), model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(model_config["vision_cfg"].get("patch_dropout")))
    if cfg.torchcompile:
        model = torch.compile(model)
    return model, core


class _Labels:
    """Class names, caption templates and excluded labels for training on labelled shards."""

    def __init__(self, cfg: TrainConfig, source):
        self.classnames, self.templates, self.exclude = None, None, set()
        if cfg.objective == "classify":  # labels are the targets; no captions are made
            self.classnames = source_classnames(source, needed_for="fine-tuning")
            return
        if cfg.objective == "self-supervised":
            return
        if cfg.objective == "labels" and not cfg.label_captions:  # labelled data: its classes; else caption nouns
            self.classnames = source_classnames(source)
            return
        if not cfg.label_captions:
            if cfg.exclude_classes:
                raise ValueError("--exclude-classes needs labelled data and --label-captions")
            return
        self.classnames = source_classnames(source, needed_for="--label-captions")
        if cfg.label_captions != "default":
            self.templates = load_templates(cfg.label_captions)
        unknown = [c for c in cfg.exclude_classes if c not in self.classnames]
        if unknown:
            raise ValueError(f"--exclude-classes: {unknown} not among the class names {self.classnames}")
        self.exclude = {self.classnames.index(c) for c in cfg.exclude_classes}


def _check_captioned(source, name, peek: int = 64) -> None:
    """Fail before training, with the fix, when the data has no captions to train on (else every sample would be
    skipped inside the loader workers, after minutes of start-up)."""
    samples, stream = [], iter(source.samples(0, 1, 0, 0, Counter()))
    for raw in stream:
        samples.append(raw)
        if len(samples) == peek or "txt" in raw:
            break
    getattr(stream, "close", lambda: None)()  # release the shard (or a pipe's process) now, not at collection
    if not samples:
        raise ValueError(f"training data {name}: no samples found")
    if not any("txt" in raw for raw in samples):
        hint = ("; its samples carry class labels (.cls): caption them from the class names with "
                "--label-captions default") if any("cls" in raw for raw in samples) else ""
        raise ValueError(f"training data {name}: the first {len(samples)} samples have no caption (.txt){hint}")


def _wants_labels(cfg: TrainConfig) -> bool:
    """Whether the run trains from class labels (so a folder of class folders is read as labelled)."""
    return cfg.objective in ("classify", "labels") or bool(cfg.label_captions)


def _open_training_data(cfg: TrainConfig, train_source=None):
    """(source, its labels) with the data checked usable before any training starts."""
    source = train_source if train_source is not None else \
        open_source(cfg.train_data, cfg.shuffle_buffer, csv_keys=cfg.csv_keys(),
                    upsampling=cfg.train_data_upsampling_factors,
                    classnames=folder_classnames(cfg.train_data, wanted=_wants_labels(cfg)))
    labels = _Labels(cfg, source)
    if not labels.classnames and cfg.objective != "self-supervised":  # images alone need no captions
        _check_captioned(source, cfg.train_data or source)
    return source, labels


TEXT_FEATURES = "text_features.safetensors"  # a run's --text-cache table, kept in its folder for a resume
TEACHER_TEXT_FEATURES = "teacher_text_features.safetensors"  # --distill-text-cache's


def _cache_text_features(cfg: TrainConfig, core, source, tokenizer, labels: _Labels, output: Path,
                         rank: int) -> None:
    """Every training caption through the frozen text tower once, before the first step (``--text-cache``). The
    table is kept in the run's folder and in the cache (``$CLIPFORGE_CACHE/text-features``, by its fingerprint: the
    frozen weights and the token rows); a resumed run, or another run on the same captions with the same frozen
    tower (another seed, another image-side setting), reads it back instead: the same values, without the minutes
    of computing them."""
    if not cfg.lock_text:
        raise ValueError("--text-cache needs --lock-text: only a frozen text tower's features can be cached")
    if labels.classnames:
        raise ValueError("--text-cache takes captioned data; label captions are drawn from a grammar, not a list")
    if hasattr(core, "caption_states"):  # a CoCa (as validation tells one)
        raise ValueError("--text-cache keeps each caption's pooled features; a CoCa's decoder reads every token's "
                         "states from the text tower, so it runs the tower each step: leave --text-cache out")
    tokens = tokenizer(_training_captions(cfg, source)).to(next(core.parameters()).device)
    fill_kept(core.text.cache_features(), core.text, tokens, output / TEXT_FEATURES, rank == 0, cfg.progress)


def _training_captions(cfg: TrainConfig, source) -> list[str]:
    """Every distinct caption training can pair an image with (with their mirrored forms under --hflip)."""
    texts = sorted(set(caption_texts(source, cfg.seed)))
    if cfg.hflip:  # mirrored images come with their captions' left and right exchanged
        texts = sorted(set(texts) | {swap_left_right(t) for t in texts})
    return texts


def _distillation(cfg: TrainConfig, core, model_config: dict, loss_fn, source, labels: _Labels, device,
                  student_transform: TrainTransform, output: Path, rank: int):
    """(teacher, the loss with its distillation term) for --distill-*; (None, the loss) otherwise. The teacher's
    text-feature table (--distill-text-cache) is kept in ``output`` (written by ``rank`` 0)."""
    if not _distilling(cfg):
        return None, loss_fn
    from ..loss import CoCaLoss, DistillationLoss
    from .distill import load_teacher

    if "multimodal_cfg" in model_config or isinstance(loss_fn, CoCaLoss):
        raise ValueError("--distill-*: a CoCa student is not distilled here (its captioning loss has no teacher term); "
                         "distill into a CLIP")
    with torch.random.fork_rng(devices=[]):  # building the teacher draws random numbers; the run's draws stay as without
        teacher = load_teacher(cfg.distill_model, cfg.distill_pretrained, device, student_transform,
                               precision=cfg.distill_precision)
    if cfg.distill_text_cache:
        if labels.classnames:
            raise ValueError("--distill-text-cache takes captioned data; label captions are drawn from a grammar, "
                             "not a list")
        teacher.cache_text_features(_training_captions(cfg, source), output / TEACHER_TEXT_FEATURES, rank == 0,
                                    progress=cfg.progress)
    return teacher, DistillationLoss(loss_fn, cfg.distill_weight, cfg.local_loss, cfg.loss_chunk_size)


def _schedule_length(cfg: TrainConfig, source, samples_per_step: int) -> tuple[int, int]:
    """(total steps, warmup steps)."""
    if cfg.steps:
        total = cfg.steps
    else:
        n = cfg.train_num_samples or len(source)
        total = max(1, math.ceil(cfg.epochs * n / samples_per_step))
    return total, cfg.warmup if cfg.warmup is not None else max(1, total // 20)


@dataclass
class _Position:
    """Where a run stands: the step, the data position of every part, the RNG state to restore before the loop."""

    step: int = 0
    data: dict = field(default_factory=dict)
    rng: dict | None = None


def _full(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value, also when FSDP holds it as a sharded DTensor (a collective: every rank calls)."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def _check_earlier_run(cfg: TrainConfig, output: Path, rank: int) -> None:
    """A run started (no --resume) in a folder holding an earlier run's checkpoints wrote over them step by step and
    dropped its metrics, and a later ``--resume latest`` could pick one of the earlier run's steps: refused, unless
    ``overwrite``, which deletes them first."""
    earlier = [] if cfg.resume else checkpoint_dirs(output)
    if not earlier:
        return
    if not cfg.overwrite:
        raise ValueError(f"{output} holds an earlier run's checkpoints (up to {earlier[-1].name}): --resume latest "
                         "continues it, --overwrite starts over (deleting them), or give another --output")
    if rank == 0:
        shutil.rmtree(output / "checkpoints")
        print(f"--overwrite: deleted the earlier run's {len(earlier)} checkpoint(s) in {output}", file=sys.stderr)


# settings a resumed run may change without changing what it computes (or that are checked on their own)
_RESUMABLE_CHANGES = {"resume", "overwrite", "output", "progress", "device", "log_every", "val_every", "val_samples",
                      "save_every", "keep", "steps", "epochs", "workers", "val_data", "zeroshot_data",
                      "zeroshot_split"}


def _warn_changed_settings(cfg: TrainConfig, output: Path) -> None:
    """Say which settings a resumed run changes from those its folder's ``run_config.json`` records (a batch size, a
    learning rate): allowed, as open_clip allows it, but the result is no longer what the run would have given."""
    try:
        before = read_json(output / "run_config.json")["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as recorded: tuples as lists
    changed = [f"--{key.replace('_', '-')} {before[key]!r} -> {now[key]!r}" for key in now
               if key in before and key not in _RESUMABLE_CHANGES and before[key] != now[key]]
    if changed:
        print(f"warning: resuming with settings other than the run's: {'; '.join(changed)} (the result is no longer "
              "the one the uninterrupted run would give)", file=sys.stderr)


def _resume(cfg: TrainConfig, output: Path, core, optimizer, scheduler, scaler, rank: int, world: int) -> _Position:
    from .fsdp import load_sharded_checkpoint

    checkpoint = resolve_resume(cfg.resume, output) if cfg.resume else None
    if world > 1 and cfg.resume:  # every rank resumes from rank 0's choice, even if the folder changes meanwhile
        chosen = [str(checkpoint) if checkpoint else None]
        dist.broadcast_object_list(chosen, src=0)
        checkpoint = Path(chosen[0]) if chosen[0] else None
    if checkpoint is None:
        if cfg.resume and rank == 0:  # "latest" on a new run: say so, a mistyped --output looks the same
            print(f"--resume {cfg.resume}: no checkpoint in {output} yet, starting at step 0", file=sys.stderr)
        return _Position()
    train_state = load_train_state(checkpoint)
    if cfg.fsdp != is_sharded_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is {'a sharded' if not cfg.fsdp else 'an unsharded'} checkpoint: resume it "
                         f"{'with' if not cfg.fsdp else 'without'} --fsdp")
    if cfg.fsdp:
        load_sharded_checkpoint(checkpoint, core, optimizer)
    else:
        state, _ = read_checkpoint(checkpoint)
        load_into(core, state, source=str(checkpoint))
        try:
            optimizer.load_state_dict(train_state["optimizer"])
        except ValueError:  # torch's "parameter group that doesn't match the size" names no setting
            saved = sum(len(group["params"]) for group in train_state["optimizer"]["param_groups"])
            now = sum(len(group["params"]) for group in optimizer.param_groups)
            raise ValueError(f"{checkpoint}: its optimizer state holds {saved} trained parameter tensors, this run "
                             f"trains {now}: resume with the locking settings that wrote it (--lock-image, "
                             f"--lock-image-head, --lock-image-unlocked-groups, --lock-text ...). Runs made before "
                             f"--lock-image-head existed froze a timm-named image tower's projection head (ConvNeXt, "
                             f"ViTamin ...) with --lock-image: give --lock-image-head for such a run") from None
    scheduler.load_state_dict(train_state["scheduler"])
    scaler.load_state_dict(train_state["scaler"])
    if train_state.get("world_size", 1) != world or train_state.get("workers") != cfg.workers:
        raise ValueError(f"{checkpoint} was written with world size {train_state.get('world_size')} and "
                         f"{train_state.get('workers')} workers; resume with the same to continue exactly")
    if rank == 0:
        print(f"resuming from {checkpoint} at step {int(train_state['step'])}", file=sys.stderr)
        _warn_changed_settings(cfg, output)
    return _Position(int(train_state["step"]), {int(k): v for k, v in train_state["data"].items()},
                     train_state["rng"][rank])


class _RunLog:
    """``run_config.json``, ``metrics.jsonl`` (lines past a resumed step dropped: they are redone) and TensorBoard
    when installed; rank 0 writes, other ranks log nothing."""

    def __init__(self, output: Path, rank: int, run_config: dict, resumed_step: int):
        self.metrics_file = self.tb = None
        if rank != 0:
            return
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / "run_config.json", run_config)
        path = output / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.metrics_file = open(path, "a")
        self.tb = _tensorboard(output)

    def __call__(self, record: dict) -> None:
        if self.metrics_file is None:
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        for handle in (self.metrics_file, self.tb):
            if handle is not None:
                handle.close()


# ---------------------------------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, train_source=None, val_source=None, model=None, loss_fn=None) -> dict:
    """Train and return a summary (steps, last loss, checkpoint path, skipped samples, validation metrics).

    A SIGTERM or a first Ctrl-C (also in a notebook) ends the run early at a step boundary, with a checkpoint to
    ``--resume`` from; the summary's ``stopped_by`` then names the signal.

    ``train_source``/``val_source`` replace ``cfg.train_data``/``cfg.val_data`` with source objects (e.g.
    ``ShapesSource``). ``model`` and ``loss_fn`` replace the zoo model and the configured loss: any module whose
    forward returns a ``CLIPOutput`` and that has ``encode_image``/``encode_text``/``image_size`` will do.

    A second run given the same ``output`` while this one writes there stops at once, naming this one
    (``files.run_lock``).
    """
    _check_config(cfg)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))  # torchrun's, before init
    with run_lock(cfg.output, "train", enabled=rank == 0):
        return _train(cfg, train_source, val_source, model, loss_fn)


def _train(cfg: TrainConfig, train_source, val_source, model, loss_fn) -> dict:
    rank, world, device = _init_distributed(cfg)
    precision = _resolve_precision(cfg.precision, device)
    output = Path(cfg.output)
    _check_earlier_run(cfg, output, rank)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    source, labels = _open_training_data(cfg, train_source)
    objective = objective_for(cfg, source, labels, model_config_for(cfg), model, loss_fn)
    model_config, tokenizer, loss_fn = objective.model_config, objective.tokenizer, objective.loss_fn
    model, core = _build_model(cfg, model_config, device, world, objective.model, precision)
    if cfg.text_cache:
        _cache_text_features(cfg, core, source, tokenizer, labels, output, rank)
    samples_per_step = cfg.batch_size * world * cfg.accum_freq
    total_steps, warmup = _schedule_length(cfg, source, samples_per_step)
    optimizer = build_optimizer(core, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps)
    cooldown = cfg.cooldown if cfg.cooldown is not None else max(1, total_steps // 10)
    scheduler = lr_schedule(optimizer, cfg.lr_schedule, warmup, total_steps, cfg.lr_end / cfg.lr,
                            cooldown if cfg.lr_schedule == "constant-cooldown" else 0, cfg.cooldown_power)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp_fp16")
    position = _resume(cfg, output, core, optimizer, scheduler, scaler, rank, world)
    # a --pretrained model's own image normalisation (0.5 for some LAION tags), as open_clip trains it
    normalisation = {k: v for k, v in (getattr(core, "normalisation", None) or {}).items() if k in ("mean", "std")}
    transform = TrainTransform(core.image_size, scale=tuple(cfg.crop_scale), **normalisation,
                               **colour_augmentation(cfg))
    teacher, loss_fn = _distillation(cfg, core, model_config, loss_fn, source, labels, device, transform, output,
                                     rank)
    stream = ContrastiveStream(source, transform, tokenizer,
                               cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                               classnames=labels.classnames, caption_templates=labels.templates,
                               label_captions=bool(labels.classnames), exclude_labels=labels.exclude,
                               resume=position.data, hflip=cfg.hflip, targets=objective.targets,
                               teacher=teacher.inputs if teacher else None)
    # (sharded towers run collectively: under FSDP every rank validates, rank 0 logs)
    val_set, zero_shot_templates = open_validation(cfg, val_source, core.image_size, labels.templates, source,
                                                   labels, getattr(core, "normalisation", None)) \
        if rank == 0 or cfg.fsdp else (None, None)
    zero_shot_sets = open_zero_shot_sets(cfg, core.image_size, getattr(core, "normalisation", None), source, labels,
                                         val_set) if rank == 0 or cfg.fsdp else []
    log = _RunLog(output, rank, {"train": dataclasses.asdict(cfg), "model_cfg": model_config, "world_size": world,
                                 "total_steps": total_steps, "environment": run_environment() if rank == 0 else None},
                  position.step)
    if position.rng is not None:
        set_rng_state(position.rng)  # last, after everything that draws random numbers during setup

    model.train()
    autocast = autocast_for(precision, device)
    bar = _progress(total_steps, position.step, enabled=cfg.progress and rank == 0)
    losses = _LossMeter(device, output)
    distill_terms = _LossMeter(device, output) if teacher else None
    last_loss, last_path, val_metrics = float("nan"), None, {}
    interval_start, interval_samples = time.perf_counter(), 0
    stop = StopRequest(world, device)
    # the worker processes start here, and the finally below ends them whatever happens
    loader = iter(make_loader(stream, cfg.workers, pin_memory=device.type == "cuda"))
    batches = continue_interleaving(loader, cfg.workers, position.step * cfg.accum_freq)
    try:
        stop.install()
        while position.step < total_steps:
            micro = [next(batches) for _ in range(cfg.accum_freq)]
            for batch in micro:
                position.data[batch["state"]["part"]] = batch["state"]
            losses.add(train_step(model, micro, loss_fn, optimizer, scaler, autocast, device, cfg, teacher))
            if distill_terms is not None:
                distill_terms.add(loss_fn.last_distill_term.float())
            scheduler.step()
            position.step += 1
            step = position.step
            interval_samples += samples_per_step
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                last_loss = losses.mean(step)
                elapsed = time.perf_counter() - interval_start
                record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": interval_samples / elapsed, "logit_scale": _full(core.logit_scale).exp().item(),
                          "skipped_samples": sum(_skipped_total(position, world).values())}
                if distill_terms is not None:  # its unweighted value; "loss" includes it, weighted
                    record["distill_loss"] = distill_terms.mean(step)
                log(record)
                bar.set_postfix(loss=f"{last_loss:.3f}", samples_s=f"{record['samples_per_s']:.0f}",
                                lr=f"{record['lr']:.2e}", skipped=record["skipped_samples"])
                interval_start, interval_samples = time.perf_counter(), 0
            stopping = stop.agreed(step, cfg.log_every)
            if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps or stopping:
                last_loss = losses.mean(step) if losses.count else last_loss
                # before validation, so that nothing trained is lost if validation fails
                last_path = _save_checkpoint(output, position, core, model_config, optimizer, scheduler, scaler, cfg,
                                             rank, world)
            if (val_set is not None or zero_shot_sets) and \
                    ((cfg.val_every and step % cfg.val_every == 0) or step == total_steps):
                val_metrics = validate(core, tokenizer, val_set, device, autocast, zero_shot_templates) \
                    if val_set is not None else {}
                val_metrics.update(zero_shot_metrics(core, tokenizer, zero_shot_sets, device, autocast))
                log({"step": step, **{f"val/{k}": v for k, v in val_metrics.items()}})
            if stopping:
                break
    finally:
        stop_workers(loader)  # also after an error: the workers ignore SIGTERM, and exit would wait on them
        stop.restore()
        bar.close()
        log.close()
    skipped = _skipped_total(position, world)
    if rank == 0 and skipped:
        print(f"skipped samples: {skipped}")
    return {"steps": position.step, "loss": last_loss, "checkpoint": str(last_path) if last_path else None,
            "skipped": skipped, "val": val_metrics, "output": str(output), "model": core, "rank": rank,
            "total_steps": total_steps, "stopped_by": stop.signal if position.step < total_steps else None}


class _LossMeter:
    """The mean training loss between reports, summed on the device (no sync per step); a non-finite mean stops the
    run with the way out in the message."""

    def __init__(self, device: torch.device, output: Path):
        self.device, self.output = device, output
        self.total, self.count = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.count += 1

    def mean(self, step: int) -> float:
        mean = (self.total / max(1, self.count)).item()
        self.total, self.count = torch.zeros((), device=self.device), 0
        if not math.isfinite(mean):
            good = resolve_resume("latest", self.output)
            raise TrainingDiverged(f"loss became {mean} by step {step}; stopped without saving. Last good "
                                   f"checkpoint: {good or 'none'}. Try a lower --lr, more --warmup, --grad-clip 1, "
                                   "or fp32.")
        return mean


def _skipped_total(position: _Position, world: int) -> dict:
    """Skipped-sample counts by reason, over every part of every rank."""
    counts = Counter()
    for part in _gather_objects(position.data, world):
        for state in part.values():
            counts.update(state.get("skipped", {}))
    return {k: v for k, v in counts.items() if v}


def _save_checkpoint(output: Path, position: _Position, core, model_config: dict, optimizer, scheduler, scaler,
                     cfg: TrainConfig, rank: int, world: int) -> Path | None:
    """Every rank's data position and RNG state gathered; rank 0 writes the step folder."""
    data = {}
    for part in _gather_objects(position.data, world):
        data.update(part)
    rngs = _gather_objects(rng_state(), world)
    if cfg.fsdp:  # every rank writes its shard of weights and optimizer state
        from .fsdp import save_sharded_checkpoint

        return save_sharded_checkpoint(output, position.step, core, optimizer, model_config, {
            "step": position.step, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
            "data": data, "world_size": world, "workers": cfg.workers}, rank, cfg.keep)
    path = None
    if rank == 0:
        path = save_checkpoint(output, position.step, core, model_config, {
            "step": position.step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rngs, "data": data, "world_size": world,
            "workers": cfg.workers}, keep=cfg.keep)
    if world > 1:
        dist.barrier()
    return path


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="training", smoothing=0.1)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"))
