"""CLIP's text tower: token + position embeddings, causal transformer, ``ln_final``, features at the EOT token.

SigLIP's is the same tower with three settings changed: no causal mask, features at the last position (``pool="last"``,
padding included), and a projection with a bias (``proj="linear"``; ``"none"`` where the width is the embedding).
A tokenizer whose end-of-text token is not its largest id (MetaCLIP 2's XLM-V) pools at that token's first place
(``pool="eos"``, ``eos_id``), as open_clip's ``pool_type="eos"`` does.
"""
from __future__ import annotations

import torch
from torch import nn

from .inputs import by_length, check_token_batch
from .layers import LayerNorm, Transformer


class TextTransformer(nn.Module):
    def __init__(
        self,
        context_length: int,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
        causal: bool = True,
        pool: str = "eot",
        proj: str = "matrix",
        act: str | None = None,
        eps: float = 1e-5,
        eos_id: int | None = None,
        ls_init_value: float | None = None,
    ):
        """``pool``: "eot" (CLIP: the end-of-text token, the row's largest id), "eos" (the first ``eos_id`` token) or
        "last" (SigLIP: the last position); ``proj``: "matrix" (CLIP's ``text_projection`` parameter, no bias),
        "linear" (with a bias) or "none"; ``ls_init_value``: LayerScale on the blocks' residual branches."""
        super().__init__()
        if pool not in ("eot", "eos", "last"):
            raise ValueError(f"text pool must be 'eot', 'eos' or 'last', got {pool!r}")
        if (pool == "eos") != (eos_id is not None):
            raise ValueError("text pool 'eos' takes the end-of-text token's id (eos_id), and only it does")
        if proj not in ("matrix", "linear", "none"):
            raise ValueError(f"text proj must be 'matrix', 'linear' or 'none', got {proj!r}")
        if proj == "none" and width != output_dim:
            raise ValueError(f"a text tower without projection needs width == embed_dim ({width} != {output_dim})")
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.output_dim = output_dim
        self.causal, self.pool, self.eos_id = causal, pool, eos_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu, act, eps, ls_init_value)
        self.ln_final = LayerNorm(width, eps=eps)
        if proj == "matrix":
            self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        elif proj == "linear":
            self.text_projection = nn.Linear(width, output_dim)
        else:
            self.text_projection = None
        # in this order, so that a seed gives CLIP's towers the weights it gave before SigLIP's options existed
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.text_projection is not None:
            weight = self.text_projection if proj == "matrix" else self.text_projection.weight
            nn.init.normal_(weight, std=width ** -0.5)
        self.transformer.init_parameters()
        self.feature_cache = None  # a FeatureCache of this tower's output, once frozen (``cache_features``)

    def lock_groups(self) -> list:
        """The tower's parameters in open_clip's lock groups, input side first (``CLIP.lock_text_tower``)."""
        blocks = list(self.transformer.resblocks)
        projection = [[self.text_projection]] if self.text_projection is not None else []
        embeddings = [self.token_embedding, self.positional_embedding]
        if getattr(self, "cls_emb", None) is not None:  # a CoCa's class token, an embedding as open_clip groups it
            embeddings.append(self.cls_emb)
        return [embeddings, *([b] for b in blocks[:-1]), [blocks[-1], self.ln_final], *projection]

    def cache_features(self, shared=None):
        """Keep this (frozen) tower's features per distinct token row; returns the cache to ``fill``. ``shared``: the
        cache of a tower with these weights, whose table this one reads and adds to."""
        if any(p.requires_grad for p in self.parameters()):
            raise ValueError("only a locked text tower's features can be cached (lock it first)")
        from .feature_cache import FeatureCache

        self.feature_cache = FeatureCache.computing(shared, self.features)
        return self.feature_cache

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_token_batch(tokens, self.context_length)
        return self.feature_cache(tokens) if self.feature_cache is not None else self.features(tokens)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.causal:  # every position sees the padding: nothing can be skipped
            return self.features_padded(tokens)
        eot = self._pool_index(tokens)
        if tokens.is_cuda or torch.compiler.is_compiling():
            return self.features_padded(tokens)
        # Under a causal mask nothing after a row's EOT can change its pooled features, so on CPU we skip padding:
        # rows are grouped by length and each group runs only up to its own longest EOT (``by_length``). (On GPU
        # this would cost a host-device sync, and padding is cheap there; under torch.compile every new set of
        # lengths would recompile.) Tokens are embedded once for the whole batch so the (vocabulary-sized)
        # embedding gradient is formed once, not once per group.
        lengths = (eot + 1).tolist()
        x = self._embed(tokens[:, : max(lengths)])

        def run(rows, width):
            picked = slice(None) if rows is None else rows
            return self._encode(x[picked, :width], eot[picked])
        return by_length(lengths, run)

    def features_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """``features`` over the whole padded sequence: one computation for every batch shape, what GPUs and
        exported graphs (ONNX) run."""
        return self._encode(self._embed(tokens), self._pool_index(tokens))

    def features_masked(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``features`` of a tower that attends both ways (SigLIP's) with the positions ``attention_mask`` zeroes
        hidden from every position: what transformers' SiglipModel computes when a tokenizer hands it a mask
        (SigLIP was trained to see its padding: ``forward`` lets it). A row with no position left sees them all."""
        check_token_batch(tokens, self.context_length)
        if self.causal:
            raise ValueError("features_masked is for a tower that attends both ways; a causal one pools a position "
                             "that sees no padding after it")
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match the tokens "
                             f"{tuple(tokens.shape)}")
        visible = attention_mask.to(device=tokens.device, dtype=torch.bool)
        visible = visible | ~visible.any(dim=-1, keepdim=True)  # an empty row would leave attention nothing
        x = self.ln_final(self.transformer(self._embed(tokens), attn_mask=visible[:, None, None, :]))  # keys
        return self._project(x[torch.arange(len(x), device=x.device), self._pool_index(tokens)])

    def _pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        if self.pool == "eos":  # the first end-of-text token (position 0 in a row without one, as open_clip's)
            return tokens.eq(self.eos_id).int().argmax(dim=-1)
        # The EOT token has the largest id in CLIP's vocabulary, so argmax finds it (as OpenAI CLIP does).
        return tokens.argmax(dim=-1)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]

    def _encode(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        return self._project(self.ln_final(self.transformer(x, causal=self.causal, pool_index=eot)))  # pooled only

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled if self.text_projection is None else pooled @ self.text_projection

    def forward_intermediates(self, tokens: torch.Tensor, indices=None, stop_early: bool = False,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NLC", output_extra_tokens: bool = False) -> dict:
        """open_clip's ``forward_intermediates`` for this tower: ``{"text_intermediates": the outputs [N, L, width]
        of the blocks ``indices`` names (None: all; n: the last n; a list: those, negative from the end),
        "text_features": the embedding (unless ``intermediates_only``)}``. ``normalize_intermediates``: each through
        ``ln_final``; ``stop_early``: no block after the last one asked for runs. Runs the whole padded sequence,
        never a feature cache."""
        if output_fmt != "NLC":
            raise ValueError(f"a text tower's intermediates are token sequences: output_fmt 'NLC', not {output_fmt!r}")
        check_token_batch(tokens, self.context_length)
        x, mask = self._sequence(tokens)
        x, intermediates = self.transformer.forward_intermediates(x, indices, stop_early, causal=mask is None and
                                                                  self.causal, attn_mask=mask)
        if normalize_intermediates:
            intermediates = [self.ln_final(t) for t in intermediates]
        output = self._split_intermediates(intermediates, output_extra_tokens)
        if not intermediates_only:
            output["text_features"] = self._pool_sequence(x, tokens)
        return output

    def _sequence(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks' input for ``tokens`` and its attention mask (None: ``causal`` says)."""
        return self._embed(tokens), None

    def _split_intermediates(self, intermediates: list[torch.Tensor], extra_tokens: bool) -> dict:
        return {"text_intermediates": intermediates}

    def _pool_sequence(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The last block's whole output [N, L, width] -> the embedding."""
        rows = torch.arange(x.shape[0], device=x.device)
        return self._project(self.ln_final(x[rows, self._pool_index(tokens)]))

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Keep the blocks up to the last one ``indices`` names and drop the rest; ``prune_norm`` drops ``ln_final``,
        ``prune_head`` the projection. Returns the block indices taken, as open_clip's."""
        taken = self.transformer.prune(indices)
        self.pruned = True  # the config no longer describes this tower: checkpoint.io.savable_state refuses it
        if prune_norm:
            self.ln_final = nn.Identity()
        if prune_head:
            self.text_projection = None
            self.output_dim = self.transformer.width
        return taken
