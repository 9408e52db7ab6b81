"""Image towers trained without a text encoder (``--objective bow``, ``caption``, ``labels``, ``self-supervised``):
CLIP's image tower plus a head that the objective trains, saved with ``"objective"`` in its config and loaded back
here."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip import build_vision_tower, set_grad_checkpointing
from .inputs import checked_images

OBJECTIVES = ("bow", "caption", "labels", "self-supervised")


class ImageTowerModel(nn.Module):
    """What every such model shares: the tower built from ``config["vision_cfg"]``, its embedding (``encode_image``,
    what later uses see), and grad checkpointing."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.visual = build_vision_tower(config["vision_cfg"], config["embed_dim"], config.get("quick_gelu", False))

    @classmethod
    def from_config(cls, config: dict) -> "ImageTowerModel":
        return cls(config)

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def embed_dim(self) -> int:
        return self.config["embed_dim"]

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        images, empty = checked_images(images, self.embed_dim, next(self.visual.parameters()).dtype)
        if empty is not None:
            return empty
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def zero_shot_logits(self, embeddings: torch.Tensor, classnames: list[str], templates=("a photo of a {}.",),
                         references: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, classes]`` scores of raw image ``embeddings`` (``encode_image``, not normalised) by the objective's
        own zero-shot rule; ``references``: embeddings of training images, for rules that need a prior over them.
        Objectives without one (self-supervised) have no zero-shot classifier: their features are for probes."""
        objective = self.config.get("objective", "self-supervised")
        raise ValueError(f"an image tower trained with --objective {objective} has no zero-shot classifier (no text "
                         "side, no word head): evaluate it with linear-probe or fewshot")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_grad_checkpointing(self.visual, enable)


def load_image_tower(path: str, device: str = "cpu"):
    """``(model, preprocess)`` of a checkpoint written by ``clipforge train --objective
    bow|caption|labels|self-supervised``."""
    from ..bow import BagOfWordsModel
    from ..caption_lm import CaptionLMModel
    from ..checkpoint import CheckpointError, load_into, read_checkpoint
    from ..preprocess import Preprocess
    from ..ssl import SelfSupervisedModel

    state, config = read_checkpoint(path)
    objective = (config or {}).get("objective")
    kinds = {"bow": BagOfWordsModel, "caption": CaptionLMModel, "labels": BagOfWordsModel,
             "self-supervised": SelfSupervisedModel}
    if objective not in kinds:
        raise CheckpointError(f"{path}: not an image-tower checkpoint (--objective {', '.join(OBJECTIVES)})")
    model = kinds[objective].from_config(config)
    load_into(model, state, source=str(path))
    return model.to(device).eval(), Preprocess(model.image_size)
