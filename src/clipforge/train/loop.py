"""The contrastive training loop: one plain function, from one CPU process to many GPUs under ``torchrun``.

    cfg = TrainConfig(model="ViT-Tiny-64", train_data="shards/{000000..000009}.tar", steps=2000, output="runs/a")
    summary = train(cfg)

A step consumes ``accum_freq`` micro-batches of ``batch_size`` samples on every rank. Checkpoints hold everything
needed to continue exactly (weights, optimizer, schedule, scaler, RNG, data position), so a run killed at any
moment and restarted with ``resume="latest"`` ends with the same weights as one that never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load_into, write_json
from ..data import (ContrastiveStream, evaluation_set, find_classnames, load_caption_templates, make_loader,
                    open_source, read_classnames)
from ..loss import create_loss
from ..models import create_model, get_model_config
from ..preprocess import Preprocess, TrainTransform
from ..tokenizer import get_tokenizer
from ..zeroshot import DEFAULT_TEMPLATES, accuracy, zero_shot_classifier
from .checkpoints import (load_train_state, resolve_resume, rng_state, save_checkpoint, set_rng_state)
from .optim import build_optimizer, cosine_with_warmup

PRECISIONS = ("auto", "fp32", "amp", "amp_bf16", "amp_fp16")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


@dataclass
class TrainConfig:
    model: str = "ViT-Tiny-64"
    pretrained: str | None = None
    train_data: str | None = None
    val_data: str | None = None
    train_num_samples: int | None = None
    batch_size: int = 64
    epochs: float = 1.0
    steps: int | None = None
    lr: float = 5e-4
    wd: float = 0.2
    warmup: int | None = None  # default: 5% of the steps
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = None
    precision: str = "auto"
    accum_freq: int = 1
    loss: str = "clip"
    local_loss: bool = False
    loss_chunk_size: int | None = None
    grad_checkpointing: bool = False
    torchcompile: bool = False
    patch_dropout: float = 0.0
    lock_image: bool = False
    lock_text: bool = False
    text_model: str | None = None
    label_captions: str | None = None
    exclude_classes: list[str] = field(default_factory=list)
    seed: int = 0
    workers: int = 2
    output: str = "runs/clipforge"
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    val_every: int = 0
    val_samples: int = 1000
    resume: str | None = None
    shuffle_buffer: int = 1000
    progress: bool = True
    device: str | None = None


# ---------------------------------------------------------------------------------------------------- setup helpers

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
    return rank, world, device


def model_config_for(cfg: TrainConfig) -> dict:
    config = get_model_config(cfg.model)
    if cfg.patch_dropout:
        config["vision_cfg"]["patch_dropout"] = cfg.patch_dropout
    if cfg.text_model:
        context = config["text_cfg"].get("context_length", 77)
        config["text_cfg"] = {"hf_model_name": cfg.text_model, "pooling": "mean", "context_length": context}
    if cfg.loss == "siglip":  # the SigLIP paper's initialisation: temperature 10, bias -10
        config.setdefault("init_logit_scale", math.log(10))
        config.setdefault("init_logit_bias", -10.0)
    return config


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


class _Labels:
    """Class names, caption templates and excluded labels for training on labelled shards."""

    def __init__(self, cfg: TrainConfig, source):
        self.classnames, self.templates, self.exclude = None, None, set()
        if not cfg.label_captions:
            if cfg.exclude_classes:
                raise ValueError("--exclude-classes needs labelled data and --label-captions")
            return
        urls = getattr(source, "urls", None)
        path = find_classnames(urls[0]) if urls else None
        if path is None:
            raise ValueError("--label-captions needs classnames.txt beside the shard folder (CLIP_benchmark layout)")
        self.classnames = read_classnames(path)
        if cfg.label_captions != "default":
            self.templates = load_caption_templates(cfg.label_captions)
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


# ---------------------------------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, train_source=None, val_source=None, model=None, loss_fn=None) -> dict:
    """Train and return a summary (steps, last loss, checkpoint path, skipped samples, validation metrics).

    ``train_source``/``val_source`` replace ``cfg.train_data``/``cfg.val_data`` with source objects (e.g.
    ``ShapesSource``). ``model`` and ``loss_fn`` replace the zoo model and the configured loss: any module whose
    forward returns a ``CLIPOutput`` and that has ``encode_image``/``encode_text``/``image_size`` will do.
    """
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; choose from {', '.join(PRECISIONS)}")
    rank, world, device = _init_distributed(cfg)
    precision = cfg.precision
    if precision == "auto":
        precision = "amp_bf16" if device.type == "cuda" else "fp32"
    elif precision == "amp":
        precision = "amp_fp16"
    output = Path(cfg.output)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    # ---- model
    model_config = model_config_for(cfg)
    if model is None:
        model = create_model(model_config)
    if cfg.pretrained:
        from .. import load_model

        load_into(model, load_model(cfg.model, pretrained=cfg.pretrained).state_dict(), source=cfg.pretrained)
    if cfg.lock_image:
        model.lock_image_tower()
    if cfg.lock_text:
        model.lock_text_tower()
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if device.type == "cuda" and "layers" in model_config["vision_cfg"] and \
            isinstance(model_config["vision_cfg"]["layers"], list):
        model.to(memory_format=torch.channels_last)  # ResNet convolutions run faster channels-last
    core = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(model_config["vision_cfg"].get("patch_dropout")))
    if cfg.torchcompile:
        model = torch.compile(model)
    loss_fn = loss_fn or create_loss(cfg.loss, local_loss=cfg.local_loss, chunk_size=cfg.loss_chunk_size)

    # ---- data
    source = train_source if train_source is not None else open_source(cfg.train_data, cfg.shuffle_buffer)
    labels = _Labels(cfg, source)
    if not labels.classnames:
        _check_captioned(source, cfg.train_data or source)
    tokenizer = get_tokenizer(model_config)
    samples_per_step = cfg.batch_size * world * cfg.accum_freq
    if cfg.steps:
        total_steps = cfg.steps
    else:
        n = cfg.train_num_samples or len(source)
        total_steps = max(1, math.ceil(cfg.epochs * n / samples_per_step))
    warmup = cfg.warmup if cfg.warmup is not None else max(1, total_steps // 20)

    # ---- optimisation
    optimizer = build_optimizer(core, cfg.lr, cfg.wd, (cfg.beta1, cfg.beta2), cfg.eps)
    scheduler = cosine_with_warmup(optimizer, warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp_fp16")

    # ---- resume
    step, data_state, resumed_rng = 0, {}, None
    checkpoint = resolve_resume(cfg.resume, output) if cfg.resume else None
    if checkpoint is not None:
        from ..checkpoint import read_checkpoint

        state, _ = read_checkpoint(checkpoint)
        load_into(core, state, source=str(checkpoint))
        train_state = load_train_state(checkpoint)
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        scaler.load_state_dict(train_state["scaler"])
        step = int(train_state["step"])
        data_state = {int(k): v for k, v in train_state["data"].items()}
        if train_state.get("world_size", 1) != world or train_state.get("workers") != cfg.workers:
            raise ValueError(f"{checkpoint} was written with world size {train_state.get('world_size')} and "
                             f"{train_state.get('workers')} workers; resume with the same to continue exactly")
        resumed_rng = train_state["rng"][rank]

    stream = ContrastiveStream(source, TrainTransform(core.image_size), tokenizer, cfg.batch_size, seed=cfg.seed,
                               rank=rank, world_size=world, classnames=labels.classnames,
                               caption_templates=labels.templates, label_captions=bool(labels.classnames),
                               exclude_labels=labels.exclude, resume=data_state)
    batches = iter(make_loader(stream, cfg.workers, pin_memory=device.type == "cuda"))

    # ---- validation data (rank 0 only)
    val_set, zero_shot_templates = None, None
    if rank == 0 and (val_source is not None or cfg.val_data):
        vsource = val_source if val_source is not None else open_source(cfg.val_data, shuffle_buffer=0)
        # Labelled validation data (classnames.txt beside the shards) gets zero-shot accuracy besides retrieval,
        # whether or not training uses label captions; samples without text are captioned from their label.
        vurls = getattr(vsource, "urls", None)
        vnames_path = find_classnames(vurls[0]) if vurls else None
        vclassnames = read_classnames(vnames_path) if vnames_path else None
        vtemplates = labels.templates  # --label-captions FILE: the same prompts caption and classify
        val_set = evaluation_set(vsource, Preprocess(core.image_size), cfg.val_samples, vclassnames, vtemplates,
                                 bool(cfg.label_captions and vclassnames), seed=cfg.seed)
        if not val_set.images:
            raise ValueError(f"validation data {cfg.val_data or vsource!r} has no usable samples "
                             f"(skipped: {dict(val_set.skipped) or 'none'}); labelled shards need classnames.txt "
                             "beside the split folder")
        zero_shot_templates = vtemplates or list(DEFAULT_TEMPLATES)

    # ---- logging
    metrics_file = None
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / "run_config.json", {"train": dataclasses.asdict(cfg), "model_cfg": model_config,
                                                "world_size": world, "total_steps": total_steps})
        metrics_path = output / "metrics.jsonl"
        if metrics_path.exists():  # drop lines past the resumed step: they are about to be redone
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
        metrics_file = open(metrics_path, "a")
    tb = _tensorboard(output) if rank == 0 else None

    def log(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if tb is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "step":
                        tb.add_scalar(key, value, record["step"])

    def skipped_total() -> dict:
        counts = Counter()
        for part in _gather_objects(data_state, world):
            for state in part.values():
                counts.update(state.get("skipped", {}))
        return {k: v for k, v in counts.items() if v}

    def save(at_step: int) -> Path | None:
        all_data = {}
        for part in _gather_objects(data_state, world):
            all_data.update(part)
        rngs = _gather_objects(rng_state(), world)
        path = None
        if rank == 0:
            path = save_checkpoint(output, at_step, core, model_config, {
                "step": at_step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs, "data": all_data, "world_size": world,
                "workers": cfg.workers}, keep=cfg.keep)
        if world > 1:
            dist.barrier()
        return path

    if resumed_rng is not None:
        set_rng_state(resumed_rng)  # last, after everything that draws random numbers during setup
    model.train()
    autocast = _autocast(precision, device)
    bar = _progress(total_steps, step, enabled=cfg.progress and rank == 0)
    loss_sum, loss_count, last_loss, last_path, val_metrics = torch.zeros((), device=device), 0, float("nan"), None, {}
    interval_start, interval_samples = time.perf_counter(), 0

    def check_finite() -> float:
        nonlocal loss_sum, loss_count
        mean = (loss_sum / max(1, loss_count)).item()
        loss_sum, loss_count = torch.zeros((), device=device), 0
        if not math.isfinite(mean):
            good = resolve_resume("latest", output)
            raise TrainingDiverged(f"loss became {mean} by step {step}; stopped without saving. Last good checkpoint: "
                                   f"{good or 'none'}. Try a lower --lr, more --warmup, --grad-clip 1, or fp32.")
        return mean

    try:
        while step < total_steps:
            micro = [next(batches) for _ in range(cfg.accum_freq)]
            for batch in micro:
                data_state[batch["state"]["part"]] = batch["state"]
            loss = _train_step(model, micro, loss_fn, optimizer, scaler, autocast, device, cfg)
            scheduler.step()
            step += 1
            loss_sum += loss
            loss_count += 1
            interval_samples += samples_per_step
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                last_loss = check_finite()
                elapsed = time.perf_counter() - interval_start
                record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": interval_samples / elapsed, "logit_scale": core.logit_scale.exp().item(),
                          "skipped_samples": sum(skipped_total().values())}
                log(record)
                bar.set_postfix(loss=f"{last_loss:.3f}", samples_s=f"{record['samples_per_s']:.0f}",
                                lr=f"{record['lr']:.2e}", skipped=record["skipped_samples"])
                interval_start, interval_samples = time.perf_counter(), 0
            if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps:
                if loss_count:
                    last_loss = check_finite()
                last_path = save(step)  # before validation, so that nothing trained is lost if validation fails
            if val_set is not None and ((cfg.val_every and step % cfg.val_every == 0) or step == total_steps):
                val_metrics = validate(core, tokenizer, val_set, device, autocast, zero_shot_templates)
                log({"step": step, **{f"val/{k}": v for k, v in val_metrics.items()}})
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if tb is not None:
            tb.close()
    skipped = skipped_total()
    if rank == 0 and skipped:
        print(f"skipped samples: {skipped}")
    return {"steps": step, "loss": last_loss, "checkpoint": str(last_path) if last_path else None,
            "skipped": skipped, "val": val_metrics, "output": str(output), "model": core, "rank": rank}


def _train_step(model, micro, loss_fn, optimizer, scaler, autocast, device, cfg) -> torch.Tensor:
    """One optimiser step over ``len(micro)`` micro-batches, exact for the contrastive loss.

    With accumulation, features of every micro-batch are first computed without gradient; then each micro-batch is
    recomputed with gradient and the loss taken over all of them (its own fresh features plus the others' cached
    ones), as open_clip's ``accum_freq``. The summed gradients equal those of one step on the whole batch.
    """
    optimizer.zero_grad(set_to_none=True)
    inputs = [(b["images"].to(device, non_blocking=True), b["tokens"].to(device, non_blocking=True)) for b in micro]
    if len(inputs) == 1:
        with autocast:
            out = model(*inputs[0])
            loss = loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
        scaler.scale(loss).backward()
        total = loss.detach()
    else:
        rng_before, cached_images, cached_texts = [], [], []
        with torch.no_grad(), autocast:
            for images, tokens in inputs:
                rng_before.append(_device_rng(device))
                out = model(images, tokens)
                cached_images.append(out.image_features)
                cached_texts.append(out.text_features)
        rng_after = _device_rng(device)
        total = None
        for j, (images, tokens) in enumerate(inputs):
            _set_device_rng(device, rng_before[j])  # same patch-dropout masks as in the cached pass
            sync = nullcontext() if j == len(inputs) - 1 or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast:
                    out = model(images, tokens)
                    image_features = torch.cat(cached_images[:j] + [out.image_features] + cached_images[j + 1:])
                    text_features = torch.cat(cached_texts[:j] + [out.text_features] + cached_texts[j + 1:])
                    # the temperature (and bias) enter every pass's loss: let only one pass give them gradient
                    last = j == len(inputs) - 1
                    scale = out.logit_scale if last else out.logit_scale.detach()
                    bias = out.logit_bias if last or out.logit_bias is None else out.logit_bias.detach()
                    loss = loss_fn(image_features, text_features, scale, bias)
                scaler.scale(loss).backward()
            total = loss.detach()
        _set_device_rng(device, rng_after)
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return total.float()


def _device_rng(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_device_rng(device, state):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@torch.no_grad()
def validate(model, tokenizer, val_set, device, autocast=nullcontext(), templates=DEFAULT_TEMPLATES) -> dict:
    """Retrieval recall@1/5/10 both ways over ``val_set``'s pairs (``class_*``: by class, when the captions were made
    from class names), and zero-shot top-1/top-5 when it is labelled."""
    from ..evaluate.retrieval import embed_pairs, retrieval_metrics

    was_training = model.training
    model.eval()
    with autocast:
        images, texts = embed_pairs(model, tokenizer, val_set.images, val_set.captions, device=device)
        if val_set.captions_from_labels:  # "a photo of a cat" describes every cat: any same-class item is a hit
            same_class = val_set.labels[:, None] == val_set.labels[None, :]
            metrics = {f"class_{k}": v for k, v in retrieval_metrics(images, texts, None, positives=same_class).items()}
        else:
            metrics = retrieval_metrics(images, texts, torch.arange(len(val_set.captions)))
        if val_set.labels is not None:
            weights = zero_shot_classifier(model, tokenizer, val_set.classnames, templates, device=device)
            logits = images @ weights.float().cpu()
            metrics.update({f"zeroshot_{k}": v for k, v in accuracy(logits, val_set.labels, topk=(1, 5)).items()})
    model.train(was_training)
    return metrics


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
