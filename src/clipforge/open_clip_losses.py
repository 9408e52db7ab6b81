"""open_clip's ``CoCaLoss`` and ``DistillClipLoss`` with open_clip's constructor and call signatures, for scripts that
``import clipforge as open_clip`` (clipforge's own training uses ``loss.CoCaLoss`` and ``loss.DistillationLoss``,
which weigh the same terms inside one loss). Both build on ``loss.ClipLoss`` and its open_clip keywords; ``rank``
and ``world_size`` default to what torch.distributed says (open_clip's defaults, 0 and 1, would contradict it
under torchrun)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss import ClipLoss, _soft_cross_entropy


class CoCaLoss(ClipLoss):
    """open_clip's: ``clip_loss_weight`` x the contrastive loss and ``caption_loss_weight`` x the cross-entropy of
    the caption logits against the labels, padding (``pad_id``) ignored; ``forward`` returns both terms (a dict with
    ``output_dict``), as open_clip's."""

    def __init__(self, caption_loss_weight: float, clip_loss_weight: float, pad_id: int = 0, local_loss: bool = False,
                 gather_with_grad: bool = False, cache_labels: bool = False, rank: int | None = None,
                 world_size: int | None = None, use_horovod: bool = False):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod)
        self.caption_loss_weight, self.clip_loss_weight, self.pad_id = caption_loss_weight, clip_loss_weight, pad_id

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, logit_scale: torch.Tensor, output_dict: bool = False):
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss_weight * F.cross_entropy(logits.permute(0, 2, 1), labels,
                                                                  ignore_index=self.pad_id)
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class DistillClipLoss(ClipLoss):
    """open_clip's: the contrastive loss, and the cross-entropy of each row of the student's logits (image to text
    and text to image) against the softmax of the teacher's (``dist_*``) same row, averaged over the two; ``forward``
    returns both terms (a dict with ``output_dict``). The teacher's features take no gradient."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                dist_image_features: torch.Tensor, dist_text_features: torch.Tensor,
                dist_logit_scale: torch.Tensor, output_dict: bool = False):
        contrastive_loss = super().forward(image_features, text_features, logit_scale)
        all_images, all_texts = self.gathered(image_features, text_features)
        with torch.no_grad():
            teacher_images, teacher_texts = self.gathered(dist_image_features, dist_text_features)
        # with local_loss the rows are this rank's own features (their gradient whatever the gathering), as open_clip's
        rows = (image_features, text_features, dist_image_features.detach(), dist_text_features.detach()) \
            if self.local_loss else (all_images, all_texts, teacher_images, teacher_texts)
        teacher_scale = dist_logit_scale.detach()
        distill_loss = (_soft_cross_entropy(rows[0], all_texts, logit_scale, rows[2], teacher_texts, teacher_scale,
                                            self.chunk_size)
                        + _soft_cross_entropy(rows[1], all_images, logit_scale, rows[3], teacher_images,
                                              teacher_scale, self.chunk_size)) / 2
        if output_dict:
            return {"contrastive_loss": contrastive_loss, "distill_loss": distill_loss}
        return contrastive_loss, distill_loss


def create_loss(args):
    """open_clip's ``create_loss(args)``: from its training arguments (``distill``, ``model``, ``siglip``,
    ``local_loss``, ``gather_with_grad``, ``rank``, ``world_size``, ``horovod``, ``coca_*_loss_weight``,
    ``loss_dist_impl``) the loss its training script uses: ``DistillClipLoss``, ``CoCaLoss`` for a CoCa model,
    ``SigLipLoss``, else ``ClipLoss``."""
    from .loss import SigLipLoss

    def arg(name, default=None):
        return getattr(args, name, default)

    world = dict(rank=arg("rank"), world_size=arg("world_size"))
    gathering = dict(local_loss=bool(arg("local_loss", False)), gather_with_grad=bool(arg("gather_with_grad", False)),
                     cache_labels=True, use_horovod=bool(arg("horovod", False)), **world)
    if arg("distill"):
        return DistillClipLoss(**gathering)
    if "coca" in str(arg("model", "")).lower():
        return CoCaLoss(caption_loss_weight=arg("coca_caption_loss_weight", 2.0),
                        clip_loss_weight=arg("coca_contrastive_loss_weight", 1.0), **gathering)
    if arg("siglip"):
        if arg("horovod"):
            raise ValueError("horovod: not supported for SigLIP (nor here at all: run the ranks under torchrun)")
        return SigLipLoss(dist_impl=arg("loss_dist_impl"), **world)
    return ClipLoss(**gathering)
