"""Transformer building blocks shared by the vision and text towers.

Parameter names follow OpenAI CLIP's ``model.py`` (``in_proj_weight``, ``out_proj``, ``c_fc``, ``c_proj``,
``ln_1``, ``ln_2``) so that OpenAI and open_clip state dicts load without renaming.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .intermediates import take_indices


@contextlib.contextmanager
def recomputed_for_backward(tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]):
    """Within this block, autograd does not keep ``tensor`` (or a view of it) for the backward pass: it keeps a note,
    and calls ``recompute()`` when backward needs the values.

    For activations that are cheap to recompute from tensors autograd keeps anyway: a LayerNorm output (its input is
    kept by the LayerNorm), a GELU output (its input is kept by the GELU), a head-merging copy (its source is kept by
    attention). ``recompute`` repeats the same operation on the same inputs, so gradients are bit-for-bit those of
    the plain graph, while a transformer block keeps 10 of its 17 activation widths per token instead of 17.
    """
    if not tensor.requires_grad:  # inference, or a frozen tower: nothing is saved anyway
        yield
        return
    storage, dtype = tensor.untyped_storage().data_ptr(), tensor.dtype

    def pack(saved: torch.Tensor):
        if saved.dtype == dtype and saved.untyped_storage().data_ptr() == storage:
            return saved.size(), saved.stride(), saved.storage_offset()
        return saved

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        with torch.no_grad():
            return recompute().as_strided(*packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer casts ``x`` to under autocast (``x.dtype`` outside it)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by OpenAI's released weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def make_activation(act: str) -> nn.Module:
    """The MLP activation by name: exact GELU (open_clip's default), its tanh approximation (SigLIP 2, Hugging Face's
    ``gelu_pytorch_tanh``) or OpenAI's QuickGELU."""
    if act == "quick_gelu":
        return QuickGELU()
    if act in ("gelu", "gelu_tanh"):
        return nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
    raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def _activate_in_place(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``activation(x)`` written over ``x``, with the same values.

    On CPU a fresh [tokens, 4 * width] output per block makes glibc grow and trim its heap every block (page faults
    by the tens of thousands per batch; docs/BENCHMARKS.md). Overwriting the MLP's hidden tensor avoids that.
    """
    if isinstance(activation, QuickGELU):
        gate = x * 1.702
        return x.mul_(gate.sigmoid_())
    if isinstance(activation, nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=activation.approximate)
    return activation(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so fp16/bf16 weights stay numerically stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (CaiT's LayerScale; open_clip's ``ls_1.gamma``, ``ls_2.gamma``)
    that starts near zero, so each block starts close to the identity."""

    def __init__(self, width: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def layer_scaled(scale: nn.Module | None, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear``'s weight and bias with the ``LayerScale`` after it folded in (``gamma * (W h + b)`` as ``(gamma W) h
    + gamma b``); as they are where ``scale`` is None or the identity. Folded, training keeps no scaled copy of the
    branch's output for the backward pass (the linear layer's input, kept anyway, serves), and inference accumulates
    the residual in the GEMM as before."""
    if isinstance(scale, LayerScale):
        return linear.weight * scale.gamma[:, None], linear.bias * scale.gamma
    return linear.weight, linear.bias


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and ``scaled_dot_product_attention``.

    Same parameters as ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) so released
    checkpoints map one to one, but the kernel is SDPA (flash / memory-efficient on GPU).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, lean: bool = False,
                attn_mask: torch.Tensor | None = None, scale: nn.Module | None = None) -> torch.Tensor:
        """``lean``: recompute the merged heads in backward instead of keeping a second copy of the attention output;
        ``scale``: a ``LayerScale`` on the output, folded into the output projection (``layer_scaled``)."""
        heads = self.attend(x, causal, attn_mask)
        out = self.merge_heads(heads)
        with recomputed_for_backward(out, lambda: self.merge_heads(heads)) if lean else contextlib.nullcontext():
            return F.linear(out, *layer_scaled(scale, self.out_proj))

    def attend(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L, width] -> per-head attention outputs [N, heads, L, head_dim], before the output projection.
        ``attn_mask``: [L, L] (or broadcastable) boolean, True where a query may see a key; instead of ``causal``."""
        q, k, v = self._split_heads(x)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)

    def _split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, L, width] -> queries, keys, values, each [N, heads, L, head_dim]."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # unbind, not qkv[0], qkv[1], qkv[2]: in backward its gradients are stacked once, where each index would
        # build a zero-filled [3, ...] gradient of its own and autograd would add the three together
        return qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def attend_explicitly(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``attend``'s output and the attention map it applies [N, heads, L, L] (each query's softmax over the keys
        it may see), the map formed explicitly, the softmax in float32 as transformers' eager attention takes it:
        for inspection (``output_attentions``), where SDPA's fused kernels never form it."""
        q, k, v = self._split_heads(x)
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        visible = attn_mask  # boolean, as ``attend`` takes it
        if causal:
            visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=x.device).tril()
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        probabilities = scores.softmax(dim=-1).to(q.dtype)
        return probabilities @ v, probabilities

    @staticmethod
    def merge_heads(heads: torch.Tensor) -> torch.Tensor:
        batch, n_heads, length, head_dim = heads.shape
        return heads.transpose(1, 2).reshape(batch, length, n_heads * head_dim)

    def forward_pooled(self, x: torch.Tensor, pool_index: torch.Tensor, causal: bool = False,
                       scale: nn.Module | None = None) -> torch.Tensor:
        """Attention output at one position per row (``pool_index``), keys and values from every position.

        Only the pooled token's output survives the last block, so its queries, output projection (and the MLP
        after it) are computed for that one row instead of all ``length``: same result, a fraction of the work.
        """
        batch, length, width = x.shape
        head_dim = width // self.heads
        kv = F.linear(x, self.in_proj_weight[width:], self.in_proj_bias[width:])
        k, v = kv.view(batch, length, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        pooled = x[torch.arange(batch, device=x.device), pool_index]
        q = F.linear(pooled, self.in_proj_weight[:width], self.in_proj_bias[:width]).view(batch, self.heads, 1, head_dim)
        mask = None
        if causal:  # the pooled row sees itself and what came before it
            mask = (torch.arange(length, device=x.device) <= pool_index[:, None]).view(batch, 1, 1, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.linear(out.reshape(batch, width), *layer_scaled(scale, self.out_proj))


def mlp(width: int, hidden: int, act: str) -> nn.Sequential:
    """A transformer's MLP under OpenAI's names (``c_fc``, ``gelu``, ``c_proj``)."""
    layers = nn.Sequential()
    layers.add_module("c_fc", nn.Linear(width, hidden))
    layers.add_module("gelu", make_activation(act))
    layers.add_module("c_proj", nn.Linear(hidden, width))
    return layers


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); with ``ls_init_value`` each branch is
    scaled by a ``LayerScale`` (``ls_1``, ``ls_2``) before it is added, as open_clip builds it (here folded into the
    branch's output projection)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False,
                 act: str | None = None, eps: float = 1e-5, ls_init_value: float | None = None):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ls_1 = nn.Identity() if ls_init_value is None else LayerScale(width, ls_init_value)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = mlp(width, int(width * mlp_ratio), act or ("quick_gelu" if quick_gelu else "gelu"))
        self.ls_2 = nn.Identity() if ls_init_value is None else LayerScale(width, ls_init_value)

    def forward(self, x: torch.Tensor, causal: bool = False, pool_index: torch.Tensor | None = None,
                lean: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L, width] -> [N, L, width]; with ``pool_index`` (one position per row) -> [N, width] at those rows.
        ``attn_mask`` (boolean, True = visible) replaces ``causal`` for any other pattern; not with ``pool_index``.

        ``lean`` (training without checkpointing): LayerNorm, GELU and head-merge outputs are recomputed in backward
        rather than kept (see ``recomputed_for_backward``): same gradients, ~40% less activation memory.
        """
        # the in-place GEMMs of the inference path take no autocast casts: run it only where no cast would happen
        if (pool_index is None and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
                and x.dtype == self.attn.out_proj.weight.dtype):
            return self._forward_inference(x, causal, attn_mask)
        if pool_index is None:
            with self._normed(self.ln_1, x, lean) as h:
                x = x + self.attn(h, causal=causal, lean=lean, attn_mask=attn_mask, scale=self.ls_1)
        else:
            if attn_mask is not None:
                raise ValueError("attn_mask with pool_index is not supported: the pooled path builds its own mask")
            x_pooled = x[torch.arange(x.shape[0], device=x.device), pool_index]
            with self._normed(self.ln_1, x, lean) as h:
                x = x_pooled + self.attn.forward_pooled(h, pool_index, causal=causal, scale=self.ls_1)
        with self._normed(self.ln_2, x, lean) as h:
            return x + self._mlp(h, lean)

    def forward_with_map(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s output and the block's attention map [N, heads, L, L], its attention computed explicitly
        (``Attention.attend_explicitly``) rather than fused: for inspection, at eager attention's cost."""
        heads, attention_map = self.attn.attend_explicitly(self.ln_1(x), causal, attn_mask)
        x = x + F.linear(self.attn.merge_heads(heads), *layer_scaled(self.ls_1, self.attn.out_proj))
        return x + self._mlp(self.ln_2(x), lean=False), attention_map

    def _forward_inference(self, x: torch.Tensor, causal: bool, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` without autograd or dtype casts: the same sums, with each residual and bias accumulated by the
        GEMM itself (``addmm_`` into ``x + bias``) instead of a bias copy, a GEMM and a separate residual add, and the
        MLP's hidden tensor activated in place: fewer passes over memory and allocations on CPU, where they show
        (docs/BENCHMARKS.md). ``x`` is not modified."""
        width = x.shape[-1]
        fc = self.mlp.c_fc
        (attn_weight, attn_bias), (proj_weight, proj_bias) = \
            layer_scaled(self.ls_1, self.attn.out_proj), layer_scaled(self.ls_2, self.mlp.c_proj)
        heads = self.attn.merge_heads(self.attn.attend(self.ln_1(x), causal, attn_mask)).view(-1, width)
        y = torch.add(x, attn_bias).view(-1, width).addmm_(heads, attn_weight.t())
        hidden = _activate_in_place(self.mlp.gelu, F.linear(self.ln_2(y), fc.weight, fc.bias))
        return y.add_(proj_bias).addmm_(hidden, proj_weight.t()).view(x.shape)

    @staticmethod
    @contextlib.contextmanager
    def _normed(norm: nn.Module, x: torch.Tensor, lean: bool):
        """``norm(x)``, already in the dtype the next linear layer takes, and in lean mode not kept for backward."""
        if not lean:
            yield norm(x)
            return
        dtype = autocast_dtype(x)

        def normed():
            return norm(x).to(dtype)

        h = normed()
        with recomputed_for_backward(h, normed):
            yield h

    def _mlp(self, x: torch.Tensor, lean: bool) -> torch.Tensor:
        """The MLP branch, ``ls_2`` folded into its output projection."""
        hidden = self.mlp.c_fc(x)
        if not hidden.requires_grad:  # inference: nothing else needs the pre-activation values
            return F.linear(_activate_in_place(self.mlp.gelu, hidden), *layer_scaled(self.ls_2, self.mlp.c_proj))
        activated = self.mlp.gelu(hidden)
        with recomputed_for_backward(activated, lambda: self.mlp.gelu(hidden)) if lean else contextlib.nullcontext():
            return F.linear(activated, *layer_scaled(self.ls_2, self.mlp.c_proj))


def recomputed(block: nn.Module, *inputs, enabled: bool):
    """``block(*inputs)``; with ``enabled`` (a tower's ``grad_checkpointing``) and autograd on, its activations are
    recomputed in backward instead of kept (``torch.utils.checkpoint``, non-reentrant)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


class Transformer(nn.Module):
    """A stack of residual attention blocks, batch-first, with optional gradient checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False,
                 act: str | None = None, eps: float = 1e-5, ls_init_value: float | None = None):
        """``act`` names the MLP activation (``make_activation``), else ``quick_gelu`` chooses; ``eps``: the
        LayerNorms' (SigLIP's are 1e-6); ``ls_init_value``: LayerScale on each residual branch, starting there."""
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.lean = True  # recompute cheap activations in backward (see ResidualAttentionBlock.forward)
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu, act, eps, ls_init_value) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, causal: bool = False, pool_index: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L, width] -> [N, L, width], or [N, width] at ``pool_index`` when the caller pools one token per row
        (the last block then computes only those rows). ``attn_mask``: boolean [L, L], True where a position may
        attend, for patterns other than ``causal`` (e.g. ``caption_lm``'s prompt tree)."""
        last, lean = len(self.resblocks) - 1, self._lean()
        for i, block in enumerate(self.resblocks):
            x = self._run_block(block, x, causal, pool_index if i == last else None, attn_mask, lean)
        return x

    def forward_intermediates(self, x: torch.Tensor, indices=None, stop_early: bool = False, causal: bool = False,
                              attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(last output [N, L, width], the outputs of the blocks ``indices`` names)``, ``indices`` as
        ``take_indices`` reads them; ``stop_early``: no block after the last one asked for runs (the first value is
        then that block's output), as open_clip's and timm's ``forward_intermediates``."""
        taken, last = take_indices(len(self.resblocks), indices)
        intermediates, lean = [], self._lean()
        for i, block in enumerate(self.resblocks[: last + 1] if stop_early else self.resblocks):
            x = self._run_block(block, x, causal, None, attn_mask, lean)
            if i in taken:
                intermediates.append(x)
        return x, intermediates

    def forward_attentions(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(last output, every block's output, every block's attention map [N, heads, L, L])``: for inspection
        (``ResidualAttentionBlock.forward_with_map``: the attention explicit, as transformers' eager attention)."""
        outputs, maps = [], []
        for block in self.resblocks:
            x, attention_map = block.forward_with_map(x, causal, attn_mask)
            outputs.append(x)
            maps.append(attention_map)
        return x, outputs, maps

    def _lean(self) -> bool:
        # torch.compile's partitioner makes its own recompute choices; the saved-tensor hooks would only get in its way
        return self.lean and torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _run_block(self, block: nn.Module, x: torch.Tensor, causal: bool, pool_index: torch.Tensor | None,
                   attn_mask: torch.Tensor | None, lean: bool) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, causal, pool_index, False, attn_mask, use_reentrant=False)
        return block(x, causal=causal, pool_index=pool_index, lean=lean, attn_mask=attn_mask)

    def prune(self, indices=1) -> list[int]:
        """Drop the blocks after the last one ``indices`` names (``take_indices``); returns the indices taken
        (open_clip's ``prune_intermediate_layers``)."""
        taken, last = take_indices(len(self.resblocks), indices)
        self.resblocks = self.resblocks[: last + 1]
        self.layers = len(self.resblocks)
        return taken

    def init_parameters(self) -> None:
        init_residual_blocks(self.resblocks, self.width, self.layers)


def init_residual_blocks(blocks, width: int, layers: int) -> None:
    """OpenAI CLIP's initialisation of residual attention blocks (``attn`` with fused ``in_proj``, ``mlp``):
    residual projections scaled down with depth, attention biases zero."""
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    attn_std = width ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.zeros_(block.attn.in_proj_bias)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
