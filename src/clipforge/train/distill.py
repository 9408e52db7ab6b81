"""Knowledge distillation: a frozen teacher CLIP whose similarities the student learns to match (``--distill-model``).

open_clip's ``--distill-model/--distill-pretrained`` feeds the teacher the student's own images and tokens, so the
teacher must share the student's tokenizer and image transform, and it trains without gradient accumulation. Here
the teacher is any model ``clipforge.load`` reads (a zoo tag, an open_clip, OpenAI or Hugging Face checkpoint, a run
of ours) and gets its own inputs from the data pipeline: each caption tokenized by its tokenizer, and each image at
its size and normalisation, cut from the same random crop the student sees (``ContrastiveStream``'s ``teacher``).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from ..models.feature_cache import fill_kept
from ..preprocess import TrainTransform


@dataclass
class TeacherInputs:
    """What the data pipeline makes for the teacher from each sample: its image view (``transform``; None when the
    student's tensor is exactly what the teacher takes) and its tokens (``tokenizer``)."""

    transform: TrainTransform | None
    tokenizer: object


class Teacher:
    """A frozen CLIP in eval mode: ``features(batch)`` gives its normalised image and text features and its
    temperature for a batch of the data pipeline (``teacher_images`` / ``teacher_tokens``)."""

    def __init__(self, model, inputs: TeacherInputs):
        self.model, self.inputs = model, inputs

    @torch.no_grad()
    def features(self, batch: dict, device: torch.device, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = batch.get("teacher_images", batch["images"]).to(device, non_blocking=True)
        tokens = batch["teacher_tokens"].to(device, non_blocking=True)
        with autocast:
            out = self.model(images, tokens)
        return out.image_features, out.text_features, out.logit_scale

    def cache_text_features(self, texts: list[str], kept, write: bool = True, progress: bool = False) -> None:
        """Every training caption through the teacher's text tower once, before the first step
        (``--distill-text-cache``): its features then cost nothing per step. The table is kept at ``kept`` (the run's
        folder) and in the cache, as ``--text-cache``'s is (``feature_cache.fill_kept``)."""
        device = next(self.model.parameters()).device
        if hasattr(self.model, "lock_text_tower"):
            self.model.lock_text_tower()  # what the towers' caches ask for (it is frozen already)
        self.model.requires_grad_(False)
        if not hasattr(self.model.text, "cache_features"):
            raise ValueError("--distill-text-cache: this teacher's text tower keeps no feature cache; leave it out")
        tokens = self.inputs.tokenizer(texts).to(device)
        fill_kept(self.model.text.cache_features(), self.model.text, tokens, kept, write, progress)


def load_teacher(model: str | None, pretrained: str | None, device: torch.device, student: TrainTransform,
                 trust_pickle: bool = False, precision: str = "fp32") -> Teacher:
    """The teacher named by ``--distill-model`` / ``--distill-pretrained`` (as ``--model`` / ``--pretrained`` of the
    inference commands), frozen on ``device`` with weights of ``precision`` (``--distill-precision``: bf16 halves a
    large teacher's memory on a GPU), with the inputs the pipeline makes for it beside the student's training
    transform ``student`` (the same random crop and colour changes, the teacher's size and normalisation)."""
    from ..inference import load_for_inference
    from ..models import is_naflex

    if model is None and pretrained is None:
        raise ValueError("distillation needs a teacher: give --distill-model NAME (with --distill-pretrained TAG) or "
                         "--distill-pretrained CHECKPOINT")
    if model and not pretrained and not os.path.exists(model) and not model.startswith("hf-hub:"):
        raise ValueError(f"--distill-model {model} without --distill-pretrained would be a teacher with random "
                         "weights: give --distill-pretrained TAG_OR_CHECKPOINT")
    name = f"{model or ''}{' ' if model and pretrained else ''}{pretrained or ''}"
    teacher, _, tokenizer = load_for_inference(model, pretrained, device=str(device), trust_pickle=trust_pickle,
                                               backend="torch", precision=precision)
    config = getattr(teacher, "config", {}) or {}
    if not all(hasattr(teacher, a) for a in ("encode_image", "encode_text", "logit_scale")) or tokenizer is None \
            or config.get("objective", "contrastive") != "contrastive":
        raise ValueError(f"distillation teacher {name}: not a CLIP model (it has no image and text towers with a "
                         "temperature to distill from)")
    if is_naflex(config):
        raise ValueError(f"distillation teacher {name}: a SigLIP 2 NaFlex model takes each image at its own aspect "
                         "ratio, which the training crops do not give; distill from a fixed-resolution model")
    teacher.requires_grad_(False)
    teacher.eval()
    normalisation = {k: tuple(v) for k, v in (getattr(teacher, "normalisation", None) or {}).items()
                     if k in ("mean", "std")}
    transform = TrainTransform(teacher.image_size, **student.augmentation(), **normalisation)
    same = (transform.image_size, transform.mean, transform.std) == (student.image_size, student.mean, student.std)
    view = "the student's own" if same else "cut from the student's crops"
    dtype = str(next(teacher.parameters()).dtype).removeprefix("torch.")
    print(f"distilling from {name}: {teacher.image_size} px images ({view}), its own tokenizer, {dtype} weights",
          file=sys.stderr)
    return Teacher(teacher, TeacherInputs(None if same else transform, tokenizer))
