"""Self-supervised image towers: no language at all (``clipforge train --objective self-supervised``).

SimCLR-style (Chen et al. 2020): two independent augmentations of each image (random resized crop, flip, colour
jitter, grey scale) pass through the same tower and a small projection head, and the symmetric InfoNCE loss asks
each view to pick out its partner among the batch's other images (cross-view negatives, as CLIP's loss pairs an image
with its caption). Chosen over masked-image modelling (MAE, BEiT) because it reuses the contrastive machinery and
the data pipeline as they are and trains a ViT or a ResNet alike; MAE would need a pixel decoder and far more steps
than a CPU budget allows. The tower's embedding (before the projection head, as in SimCLR) is what later uses see.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch import nn

from .models.clip import CLIPOutput
from .models.image_tower import ImageTowerModel, load_image_tower

TEMPERATURE = 0.1


def colour_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """SimCLR's appearance changes: a random flip, brightness/contrast/saturation jitter (0.6-1.4, p 0.8) and grey
    scale (p 0.2)."""
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.2:
        image = ImageOps.grayscale(image).convert("RGB")
    return image


class SelfSupervisedModel(ImageTowerModel):
    """CLIP's image tower plus a two-layer projection head; ``forward(view_a, view_b)`` speaks the training loop's
    interface (a CLIPOutput of the two views' normalised projections, at SimCLR's temperature)."""

    def __init__(self, config: dict):
        super().__init__(config)
        dim = config["embed_dim"]
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.register_buffer("logit_scale", torch.tensor(math.log(1 / TEMPERATURE)), persistent=False)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> CLIPOutput:
        a = F.normalize(self.head(self.visual(view_a)), dim=-1)
        b = F.normalize(self.head(self.visual(view_b)), dim=-1)
        return CLIPOutput(a, b, self.logit_scale.exp())



def load(path: str, device: str = "cpu"):
    """``(model, preprocess)`` of a checkpoint written by ``clipforge train --objective self-supervised``."""
    return load_image_tower(path, device)
