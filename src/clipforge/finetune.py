"""Fine-tuning CLIP on a labelled dataset, and WiSE-FT (Wortsman et al. 2022): weight-space ensembles of the
zero-shot and fine-tuned models.

The classifier is a linear head on the L2-normalised image features, initialised from the zero-shot classifier
(class prompt embeddings times the model's temperature), so at step 0 the fine-tuned model *is* the zero-shot model;
cross-entropy then trains the image tower and the head (or the head alone). A fine-tuned checkpoint is a CLIP
checkpoint with one more tensor (``classifier``, [classes, embed_dim]) and the class names in its config: it loads
with ``clipforge.load`` like any CLIP model, and ``model.classify(images)`` gives its logits.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .models.clip import CLIP, CLIPOutput

# Config keys a classifier checkpoint carries besides the CLIP architecture.
CLASSIFIER_KEYS = ("objective", "classnames", "templates")


class CLIPClassifier(CLIP):
    """CLIP plus a zero-shot-initialised linear head over its normalised image features."""

    def __init__(self, classnames: list[str], templates: list[str], **clip_config):
        super().__init__(**clip_config)
        self.classnames, self.templates = list(classnames), list(templates)
        self.classifier = nn.Parameter(torch.zeros(len(classnames), self.embed_dim))

    @classmethod
    def from_config(cls, config: dict) -> "CLIPClassifier":
        model = cls(config["classnames"], config["templates"],
                    **{k: v for k, v in config.items() if k not in CLASSIFIER_KEYS})
        model.config = config
        return model

    @classmethod
    def from_zero_shot(cls, clip: CLIP, classnames: list[str], templates: list[str], tokenizer) -> "CLIPClassifier":
        """``clip``'s weights, with the head set to its zero-shot classifier for ``classnames``."""
        config = {**clip.config, "objective": "classify", "classnames": list(classnames), "templates": list(templates)}
        model = cls.from_config(config)
        model.load_state_dict({**clip.state_dict(), "classifier": zero_shot_head(clip, tokenizer, classnames,
                                                                                 templates)})
        return model

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, classes]``."""
        return self.encode_image(images, normalize=True) @ self.classifier.T

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> CLIPOutput:  # the training loop's interface
        return CLIPOutput(self.classify(images), labels, self.logit_scale.exp())

    def lock_all_but_head(self) -> None:
        """Head-only fine-tuning: the image tower, text tower and temperature stay as they are."""
        for name, param in self.named_parameters():
            param.requires_grad_(name == "classifier")
        self.lock_image_tower()
        self.lock_text_tower()


@torch.no_grad()
def zero_shot_head(clip, tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[classes, embed_dim]: the zero-shot classifier with the temperature folded in, so that
    ``normalize(image features) @ head.T`` are exactly the zero-shot logits."""
    from .zeroshot import temperature, zero_shot_classifier

    device = next(clip.parameters()).device
    return (temperature(clip) * zero_shot_classifier(clip, tokenizer, classnames, templates, device=device).T).float()


class ClassificationLoss(nn.Module):
    """Cross-entropy, behind the training loop's loss signature."""

    def forward(self, logits, labels, logit_scale=None, logit_bias=None) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def wise_ft(zeroshot: CLIPClassifier, finetuned: CLIPClassifier, alpha: float) -> CLIPClassifier:
    """``(1 - alpha) * zero-shot + alpha * fine-tuned``, tensor by tensor (alpha 0 and 1 give the endpoints
    exactly). The two must share architecture and classes."""
    if zeroshot.classnames != finetuned.classnames:
        raise ValueError("WiSE-FT needs the same classes in both models: "
                         f"{zeroshot.classnames[:3]}... vs {finetuned.classnames[:3]}...")
    a, b = zeroshot.state_dict(), finetuned.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("WiSE-FT needs two models of the same architecture")
    mixed = {k: a[k] if not a[k].is_floating_point() else (1 - alpha) * a[k] + alpha * b[k] for k in a}
    model = CLIPClassifier.from_config(finetuned.config)
    model.load_state_dict(mixed)
    return model.eval()


def parse_alphas(spec: str) -> list[float]:
    """``"0.5"``, ``"0,0.5,1"`` or ``"0:1:0.1"`` (start:stop:step, stop included) -> mixing coefficients in [0, 1]."""
    try:
        if ":" in spec:
            start, stop, step = (float(v) for v in spec.split(":"))
        else:
            values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:  # a word, or a sweep without its three parts
        raise ValueError(f"--alphas {spec!r}: expected numbers such as '0,0.5,1' or a sweep start:stop:step "
                         f"such as 0:1:0.1") from None
    if ":" in spec:
        if step <= 0 or stop < start:
            raise ValueError(f"--alphas {spec!r}: a sweep goes up from start to stop by a positive step")
        count = int(round((stop - start) / step)) + 1
        values = [round(start + i * step, 10) for i in range(count)]
    bad = [v for v in values if not 0 <= v <= 1]
    if not values or bad:
        raise ValueError(f"--alphas {spec!r}: coefficients between 0 (zero-shot) and 1 (fine-tuned), got {bad or 'none'}")
    return values


def load_classifier(path: str | Path, classnames=None, templates=None, device: str = "cpu") -> CLIPClassifier:
    """A fine-tuned checkpoint as it is; any other CLIP checkpoint with its zero-shot head for ``classnames``."""
    from . import load
    from .tokenizer import get_tokenizer

    model, _, tokenizer = load(str(path), device=device)
    if isinstance(model, CLIPClassifier):
        return model
    if classnames is None or templates is None:
        raise ValueError(f"{path} is not a fine-tuned classifier; the class names and templates to build its "
                         "zero-shot head are needed")
    return CLIPClassifier.from_zero_shot(model, classnames, templates, tokenizer or get_tokenizer(model.config)).eval()
