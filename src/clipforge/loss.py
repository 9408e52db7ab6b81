"""Contrastive objectives: CLIP's symmetric cross-entropy and SigLIP's pairwise sigmoid loss.

Both take L2-normalised features of the local batch and, under ``torch.distributed``, gather the other ranks'
features *with* gradient (``gather_with_grad``), so that after DDP averages gradients
they equal those of one process holding the concatenated batch.

- ``ClipLoss(local_loss=False)``: every rank computes the full (N*W) x (N*W) loss; simple, the paper's form.
- ``ClipLoss(local_loss=True)``: each rank computes only its own N rows against all N*W columns (open_clip's
  ``local_loss``); same loss and gradients, W times less logit memory and compute.
- ``chunk_size``: rows are processed in chunks by a custom autograd function that recomputes each chunk's logits
  in the backward pass, so peak memory is O(chunk_size x columns) instead of O(rows x columns).

``DistillationLoss`` adds knowledge distillation from a frozen teacher CLIP to either of them (open_clip's
``DistillClipLoss``): the student's similarity rows matched to the teacher's softmax, row by row.

``CoCaLoss`` adds CoCa's captioning term (the decoder's next-token cross-entropy) to either of them; the model computes
that cross-entropy with ``linear_cross_entropy``, which never holds the [caption tokens x vocabulary] logits whole.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# Newer torch names these *_single and deprecates the older names (with a warning on every call).
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' tensors concatenated along dim 0. Backward: each rank's slice receives the sum over ranks of the
    gradients flowing into it (every rank's loss used it), as DDP then averages."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.contiguous()
        world = dist.get_world_size()
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(out, tensor)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        rank, world = _world()
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            _reduce_scatter_single(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce-scatter: sum everything, keep this rank's slice
        return grad.chunk(world)[rank].clone()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0; gradients flow back to the rank that owns each slice.
    (Our own autograd function: ``torch.distributed.nn.functional.all_gather`` is deprecated.)"""
    rank, world = _world()
    if world == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """mean_i [logsumexp_j(s * a_i . b_j) - s * a_i . b_{label_i}], computed over row chunks.

    Only per-row log-sum-exps are kept for backward; each chunk's logits are recomputed there, so memory never
    holds the full rows x columns matrix.
    """

    @staticmethod
    def forward(ctx, a, b, scale, labels, chunk_size):
        lse = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
        target = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
        for start in range(0, a.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (scale * a[rows] @ b.T).float()
            lse[rows] = torch.logsumexp(logits, dim=1)
            target[rows] = logits.gather(1, labels[rows, None]).squeeze(1)
        ctx.save_for_backward(a, b, scale, labels, lse)
        ctx.chunk_size = chunk_size
        return (lse - target).mean()

    @staticmethod
    def backward(ctx, grad_output):
        a, b, scale, labels, lse = ctx.saved_tensors
        n = a.shape[0]
        grad_a = torch.empty_like(a)
        grad_b = torch.zeros_like(b)
        grad_scale = torch.zeros((), dtype=torch.float32, device=a.device)
        for start in range(0, n, ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            raw = a[rows] @ b.T  # unscaled similarities of this chunk
            grad_logits = torch.exp(scale * raw.float() - lse[rows, None])  # softmax
            grad_logits[torch.arange(grad_logits.shape[0], device=a.device), labels[rows]] -= 1.0
            grad_logits *= grad_output / n
            grad_scale += (grad_logits * raw).sum()
            grad_logits = grad_logits.to(a.dtype)
            grad_a[rows] = scale * grad_logits @ b
            grad_b += scale * grad_logits.T @ a[rows]
        return grad_a, grad_b, grad_scale.to(scale.dtype).reshape(scale.shape), None, None


def cross_entropy_rows(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                       chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the rows of ``scale * a @ b.T`` against ``labels``, dense or chunked."""
    if chunk_size is None or chunk_size >= a.shape[0]:
        return F.cross_entropy(scale * a @ b.T, labels)
    return _ChunkedCrossEntropy.apply(a, b, scale, labels, chunk_size)


def gather_without_grad(tensor: torch.Tensor, keep_own: bool = True) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 without gradient but (``keep_own``) for this rank's own slice,
    as open_clip's ``gather_with_grad=False`` gathers (its ``local_loss`` keeps none: the local rows carry it)."""
    rank, world = _world()
    if world == 1:
        return tensor
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor.detach().contiguous())
    if not keep_own:
        return out
    parts = list(out.chunk(world))
    parts[rank] = tensor
    return torch.cat(parts)


class _OpenClipKeywords:
    """open_clip's loss keywords, read once: ``rank`` / ``world_size`` (clipforge reads torch.distributed; where a
    script gives them they must agree with it), ``cache_labels`` (labels are made per call here: no effect),
    ``use_horovod`` (refused: run under torchrun)."""

    def __init__(self, rank: int | None, world_size: int | None, use_horovod: bool):
        if use_horovod:
            raise ValueError("use_horovod: Horovod is not supported here; run the ranks under torchrun "
                             "(torch.distributed)")
        self.stated_world = (rank, world_size)

    def check_world(self, loss: str) -> None:
        rank, world = self.stated_world
        if rank is None and world is None:
            return
        actual = _world()
        if (rank is not None and rank != actual[0]) or (world is not None and world != actual[1]):
            raise ValueError(f"{loss}(rank={rank}, world_size={world}): torch.distributed says rank {actual[0]} of "
                             f"{actual[1]}")


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over scaled cosine similarities (Radford et al. 2021, Fig. 3).

    Takes open_clip's keywords (``ClipLoss(local_loss, gather_with_grad, cache_labels, rank, world_size)``) and its
    ``forward(..., output_dict=True)``. ``gather_with_grad`` is True by default here: other ranks' features keep their
    gradients, so that DDP's average is the gradient of one process over the whole batch; False gathers them without,
    as open_clip's default does (this rank's own slice keeps its gradient, except under ``local_loss``, where only the
    local rows carry one: a different gradient)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, cache_labels: bool = False,
                 rank: int | None = None, world_size: int | None = None, use_horovod: bool = False, *,
                 chunk_size: int | None = None):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.chunk_size = chunk_size
        self._open_clip = _OpenClipKeywords(rank, world_size, use_horovod)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, output_dict: bool = False) -> torch.Tensor | dict:
        """The loss (a constant ``logit_bias`` would not change it); ``output_dict``: ``{"contrastive_loss": loss}``
        as open_clip's."""
        self._open_clip.check_world(type(self).__name__)
        rank, world = _world()
        n = image_features.shape[0]
        all_images, all_texts = self.gathered(image_features, text_features)
        if self.local_loss:
            # This rank's rows against every column; the positive of local row i is global column rank*n + i.
            labels = torch.arange(n, device=image_features.device) + rank * n
            per_image = cross_entropy_rows(image_features, all_texts, logit_scale, labels, self.chunk_size)
            per_text = cross_entropy_rows(text_features, all_images, logit_scale, labels, self.chunk_size)
        else:
            labels = torch.arange(all_images.shape[0], device=image_features.device)
            per_image = cross_entropy_rows(all_images, all_texts, logit_scale, labels, self.chunk_size)
            per_text = cross_entropy_rows(all_texts, all_images, logit_scale, labels, self.chunk_size)
        loss = (per_image + per_text) / 2
        return {"contrastive_loss": loss} if output_dict else loss

    def gathered(self, image_features: torch.Tensor, text_features: torch.Tensor) -> tuple:
        """Every rank's image and text features (this rank's alone outside torch.distributed), with or without
        their gradients as ``gather_with_grad`` says."""
        if self.gather_with_grad:
            return gather_with_grad(image_features), gather_with_grad(text_features)
        own = not self.local_loss
        return gather_without_grad(image_features, own), gather_without_grad(text_features, own)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al. 2023): every image-text pair is a binary match / no-match decision.

    Normalised by the local batch size, as in the paper's implementation; with DDP's gradient averaging over W
    ranks this equals one process computing the loss over the whole batch.

    Takes open_clip's keywords (``SigLipLoss(cache_labels, rank, world_size, dist_impl)``) and its
    ``forward(..., output_dict=True)``: each of open_clip's ``dist_impl`` ways of passing text features between ranks
    gives the loss and gradients that gathering them all does, which is what this one does.
    """

    def __init__(self, cache_labels: bool = False, rank: int | None = None, world_size: int | None = None,
                 dist_impl: str | None = None, *, chunk_size: int | None = None):
        super().__init__()
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl {dist_impl!r} is not one of open_clip's: bidir, shift, reduce, gather")
        self.chunk_size = chunk_size
        self._open_clip = _OpenClipKeywords(rank, world_size, False)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, output_dict: bool = False) -> torch.Tensor | dict:
        if logit_bias is None:
            raise ValueError("SigLIP needs a learnable logit bias: create the model with init_logit_bias=-10")
        self._open_clip.check_world("SigLipLoss")
        loss = self._sum(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _sum(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
             logit_bias: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        n = image_features.shape[0]
        all_texts = gather_with_grad(text_features)
        chunk = self.chunk_size or n
        total = image_features.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            # Row chunks under checkpoint keep memory at chunk x columns here too.
            rows = image_features[start:start + chunk]
            if chunk < n and torch.is_grad_enabled():
                total = total + torch.utils.checkpoint.checkpoint(
                    _siglip_rows, rows, all_texts, logit_scale, logit_bias, rank * n + start, use_reentrant=False)
            else:
                total = total + _siglip_rows(rows, all_texts, logit_scale, logit_bias, rank * n + start)
        return total / n  # normalised by the local batch size


def _siglip_rows(rows, texts, logit_scale, logit_bias, first_label: int) -> torch.Tensor:
    logits = (logit_scale * rows @ texts.T + logit_bias).float()
    signs = -torch.ones_like(logits)
    index = torch.arange(rows.shape[0], device=rows.device)
    signs[index, index + first_label] = 1.0
    return -F.logsigmoid(signs * logits).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``labels`` under ``states @ weight``, chunk by chunk. Each chunk's gradients are taken
    in the forward pass, while its logits exist (softmax minus one-hot, through the two matmuls): the backward pass
    only scales them, and no logits are kept between the passes."""

    @staticmethod
    def forward(ctx, states, weight, labels, chunk_size):
        want_states, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wide = torch.promote_types(states.dtype, torch.float32)  # bf16 logits widened; float64 kept
        total = torch.zeros((), dtype=wide, device=states.device)
        grad_states = torch.empty_like(states) if want_states else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device) if want_weight else None
        projection = weight.to(states.dtype)  # cast once (bf16 autocast), not per chunk
        for start in range(0, len(states), chunk_size):
            rows, targets = states[start:start + chunk_size], labels[start:start + chunk_size]
            logits = (rows @ projection).to(wide)
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, targets[:, None])[:, 0]).sum()
            grad = logits.sub_(log_norm[:, None]).exp_()  # softmax, in the logits' memory
            grad[torch.arange(len(targets), device=grad.device), targets] -= 1
            grad = grad.to(rows.dtype)
            if want_states:
                grad_states[start:start + chunk_size] = grad @ projection.T
            if want_weight:
                grad_weight += rows.T @ grad
        ctx.save_for_backward(grad_states, grad_weight)
        ctx.weight_dtype, ctx.scaled = weight.dtype, False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # scaled in place: the weight's [width x vocab] gradient is not held twice (hence only one backward)
        if ctx.scaled:
            raise RuntimeError("linear_cross_entropy's gradients were already used: one backward per forward")
        ctx.scaled = True
        grad_states, grad_weight = ctx.saved_tensors
        if grad_states is not None:
            grad_states = grad_states.mul_(grad_total.to(grad_states.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_states, grad_weight, None, None


@torch.compiler.disable  # a loop over data-dependent row counts: eager, as the caption sizes it follows
def linear_cross_entropy(states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int = 512) -> torch.Tensor:
    """``F.cross_entropy(states @ weight, labels, reduction="sum")`` in (at least) float32, ``chunk_size`` rows at a
    time, so that the logits (a CoCa's caption tokens x its 49,408-word vocabulary) never exist whole: peak memory is
    one chunk's logits, not three copies of all of them (logits, log-softmax, their gradient)."""
    if torch.is_grad_enabled() and (states.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(states, weight, labels, chunk_size)
    return token_cross_entropy(states, weight, labels, chunk_size).sum()


def token_cross_entropy(states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk_size: int = 512) -> torch.Tensor:
    """``[rows]``: each label's cross-entropy under ``states @ weight``, in (at least) float32, ``chunk_size`` rows of
    logits at a time. For scoring (no gradient); ``linear_cross_entropy`` is the training loss's form."""
    projection, wide = weight.to(states.dtype), torch.promote_types(states.dtype, torch.float32)
    chunks = [F.cross_entropy((states[i:i + chunk_size] @ projection).to(wide), labels[i:i + chunk_size],
                              reduction="none") for i in range(0, len(states), chunk_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=wide, device=states.device)


class CoCaLoss(nn.Module):
    """CoCa's objective as open_clip's ``CoCaLoss`` weighs it: ``contrastive_weight`` x the contrastive loss +
    ``caption_weight`` x the mean cross-entropy of each caption token (``CoCa.forward``'s caption fields: their
    summed cross-entropy and the tokens).

    ``caption_tokens``: how many tokens the mean is over, when a step is several micro-batches (``train_step``):
    each micro-batch's summed cross-entropy over the whole step's count gives the gradient of one batch's mean.
    Under ``torch.distributed`` the caption term stays per rank, as open_clip's (DDP averages its gradients).
    ``last_caption_term``: the weighted caption term of the last call, detached (what a step over several
    micro-batches adds up to report the whole batch's loss)."""

    def __init__(self, contrastive: nn.Module, caption_weight: float = 2.0, contrastive_weight: float = 1.0):
        super().__init__()
        self.contrastive, self.caption_weight, self.contrastive_weight = contrastive, caption_weight, contrastive_weight
        self.last_caption_term = None

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, caption_nll: torch.Tensor | None = None,
                caption_labels: torch.Tensor | None = None, caption_tokens: int | None = None) -> torch.Tensor:
        loss = self.contrastive_weight * self.contrastive(image_features, text_features, logit_scale, logit_bias)
        if caption_nll is None:
            return loss
        caption = self.caption_weight * caption_nll / max(1, caption_tokens or len(caption_labels))
        self.last_caption_term = caption.detach()
        return loss + caption


class DistillationLoss(nn.Module):
    """The student's own loss (``base``) + ``weight`` x the distillation term of open_clip's ``DistillClipLoss``:
    the cross-entropy of each row of the student's image-to-text (and text-to-image) logits against the softmax of the
    teacher's same row, averaged over rows and the two directions. The teacher's features come without gradient;
    its logit bias (a SigLIP teacher's) would not change a softmax and is left out.

    Rows and columns follow the base loss's ``local_loss`` under ``torch.distributed``, as ``ClipLoss``'s do;
    ``chunk_size`` computes the rows in chunks that are recomputed in backward (memory O(chunk x columns)).
    ``last_distill_term``: the unweighted distillation term of the last call, detached, for the training log."""

    def __init__(self, base: nn.Module, weight: float = 1.0, local_loss: bool = False, chunk_size: int | None = None):
        super().__init__()
        self.base, self.weight, self.local_loss, self.chunk_size = base, weight, local_loss, chunk_size
        self.last_distill_term = None

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, teacher_image_features: torch.Tensor | None = None,
                teacher_text_features: torch.Tensor | None = None,
                teacher_logit_scale: torch.Tensor | None = None) -> torch.Tensor:
        if teacher_image_features is None or teacher_text_features is None or teacher_logit_scale is None:
            raise ValueError("DistillationLoss needs the teacher's image and text features and its logit scale")
        loss = self.base(image_features, text_features, logit_scale, logit_bias)
        rank, _ = _world()
        n = image_features.shape[0]
        all_images, all_texts = gather_with_grad(image_features), gather_with_grad(text_features)
        with torch.no_grad():
            teacher_images = gather_with_grad(teacher_image_features).float()
            teacher_texts = gather_with_grad(teacher_text_features).float()
        start = rank * n if self.local_loss else 0
        rows = slice(start, start + n) if self.local_loss else slice(None)
        scale, teacher_scale = logit_scale, teacher_logit_scale.detach().float()
        distill = (_soft_cross_entropy(all_images[rows], all_texts, scale, teacher_images[rows], teacher_texts,
                                       teacher_scale, self.chunk_size)
                   + _soft_cross_entropy(all_texts[rows], all_images, scale, teacher_texts[rows], teacher_images,
                                         teacher_scale, self.chunk_size)) / 2
        self.last_distill_term = distill.detach()
        return loss + self.weight * distill


def _soft_cross_entropy(rows, columns, scale, teacher_rows, teacher_columns, teacher_scale,
                        chunk_size: int | None) -> torch.Tensor:
    """Mean over rows of -sum_j softmax(teacher logits)_j log softmax(student logits)_j, dense or in row chunks."""
    n = rows.shape[0]
    chunk = chunk_size or n
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        part = (rows[start:start + chunk], columns, scale, teacher_rows[start:start + chunk], teacher_columns,
                teacher_scale)
        if chunk < n and torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_soft_rows, *part, use_reentrant=False)
        else:
            total = total + _soft_rows(*part)
    return total / max(1, n)


def _soft_rows(rows, columns, scale, teacher_rows, teacher_columns, teacher_scale) -> torch.Tensor:
    targets = (teacher_scale * teacher_rows @ teacher_columns.T).softmax(dim=1)
    log_probs = (scale * rows @ columns.T).float().log_softmax(dim=1)
    return -(targets * log_probs).sum()


def create_loss(name: str = "clip", local_loss: bool = False, chunk_size: int | None = None) -> nn.Module:
    if name == "clip":
        return ClipLoss(local_loss=local_loss, chunk_size=chunk_size)
    if name == "siglip":
        return SigLipLoss(chunk_size=chunk_size)
    raise ValueError(f"unknown loss {name!r}; choose 'clip' or 'siglip'")
