"""Zero-shot classification: class embeddings from prompt templates (prompt ensembling, Radford et al. 2021 §3.1.4).

Each class is the renormalised mean of its L2-normalised prompt embeddings; an image's class probabilities are the
softmax of its cosine similarities to them, scaled by the model's learned temperature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.clip import LOGIT_SCALE_MAX
from .prompts import DEFAULT_TEMPLATES, prompt_texts


def class_weights(prompt_features: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``[n_classes * n_templates, D]`` prompt features, class-major (as ``prompts.prompt_texts`` orders them) ->
    classifier weights ``[D, n_classes]``: each class the renormalised mean of its normalised prompt embeddings."""
    per_prompt = F.normalize(prompt_features.float(), dim=-1).view(n_classes, -1, prompt_features.shape[-1])
    return F.normalize(per_prompt.mean(dim=1), dim=-1).T


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, templates=DEFAULT_TEMPLATES, device=None,
                         batch_size: int = 256) -> torch.Tensor:
    """Classifier weights ``[embed_dim, n_classes]`` for ``classnames`` from ``templates``."""
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    device = device or next(model.parameters()).device
    texts = prompt_texts(classnames, templates)
    features = [model.encode_text(tokenizer(texts[start:start + batch_size]).to(device)).float()
                for start in range(0, len(texts), batch_size)]
    return class_weights(torch.cat(features), len(classnames))


def temperature(model) -> float:
    """The model's logit scale as its forward pass applies it: learned, exponentiated, clamped (where the model
    clamps it: SigLIP's does not)."""
    scale = float(model.logit_scale.detach().exp())
    ceiling = getattr(model, "logit_scale_max", LOGIT_SCALE_MAX)
    return scale if ceiling is None else min(scale, ceiling)


def class_probabilities(model, image_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per image, each class's probability from the scaled cosine similarities (``image_features`` L2-normalised
    ``[N, D]``): a softmax over classes for CLIP; for a model with a logit bias (SigLIP, trained with a sigmoid per
    pair), each class's own sigmoid, as Hugging Face's zero-shot pipeline gives them (they need not sum to 1)."""
    logits = temperature(model) * image_features.float() @ weights.float()
    bias = getattr(model, "logit_bias", None)
    if bias is None:
        return logits.softmax(dim=-1)
    return (logits + float(bias.detach())).sigmoid()
