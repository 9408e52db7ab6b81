"""One optimiser step over the micro-batches of a step, exact for the contrastive loss under accumulation."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..loss import CoCaLoss


def train_step(model, micro, loss_fn, optimizer, scaler, autocast, device, cfg, teacher=None) -> torch.Tensor:
    """One optimiser step over ``len(micro)`` micro-batches, exact for the contrastive loss.

    With accumulation, features of every micro-batch are first computed without gradient; then each micro-batch is
    recomputed with gradient and the loss taken over all of them (its own fresh features plus the others' cached
    ones), as open_clip's ``accum_freq``. The summed gradients equal those of one step on the whole batch; CoCa's
    captioning term too (each micro-batch's cross-entropy summed, over the whole step's caption token count).
    ``teacher``: a distillation teacher (``train.distill.Teacher``), whose features of the whole step, computed once,
    enter every pass's loss (``loss.DistillationLoss``): exact under accumulation too.
    """
    optimizer.zero_grad(set_to_none=True)
    inputs = [(b["images"].to(device, non_blocking=True), b["tokens"].to(device, non_blocking=True)) for b in micro]
    distill = _teacher_terms(teacher, micro, device, autocast)
    if len(inputs) == 1:
        with autocast:
            out = model(*inputs[0])
            loss = loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias,
                           **_caption_terms(loss_fn, out), **distill)
        scaler.scale(loss).backward()
        total = loss.detach()
    else:
        rng_before, cached_images, cached_texts, caption_tokens = [], [], [], 0
        with torch.no_grad(), autocast:
            for images, tokens in inputs:
                rng_before.append(_device_rng(device))
                out = model(images, tokens)
                cached_images.append(out.image_features)
                cached_texts.append(out.text_features)
                caption_labels = getattr(out, "caption_labels", None)
                caption_tokens += 0 if caption_labels is None else len(caption_labels)
        rng_after = _device_rng(device)
        total, earlier_captions = None, 0.0  # each pass's loss holds the whole contrastive loss, its own caption share
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
                    captions = _caption_terms(loss_fn, out, caption_tokens)
                    loss = loss_fn(image_features, text_features, scale, bias, **captions, **distill)
                scaler.scale(loss).backward()
            if captions and not last:
                earlier_captions = earlier_captions + loss_fn.last_caption_term
            total = loss.detach() + earlier_captions
        _set_device_rng(device, rng_after)
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return total.float()


def _teacher_terms(teacher, micro, device, autocast) -> dict:
    """The teacher's features of every micro-batch of the step, for ``DistillationLoss``; nothing without one."""
    if teacher is None:
        return {}
    images, texts, scale = zip(*(teacher.features(batch, device, autocast) for batch in micro))
    return {"teacher_image_features": torch.cat(images), "teacher_text_features": torch.cat(texts),
            "teacher_logit_scale": scale[0]}


def _caption_terms(loss_fn, out, caption_tokens: int | None = None) -> dict:
    """A CoCa's caption fields, for a loss that takes them (``CoCaLoss``); nothing for other models or losses."""
    if getattr(out, "caption_nll", None) is None or not isinstance(loss_fn, CoCaLoss):
        return {}
    return {"caption_nll": out.caption_nll, "caption_labels": out.caption_labels,
            "caption_tokens": caption_tokens}


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _device_rng(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_device_rng(device, state):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
