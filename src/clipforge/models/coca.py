"""CoCa (Yu et al. 2022) as open_clip trained it (LAION's coca_ViT-B-32 / coca_ViT-L-14): a CLIP whose towers also
hand their tokens to a captioning decoder.

- Image tower: CLIP's ViT, then attentional pooling (256 learned queries attend over the last block's tokens, in the
  embedding's width), ``ln_post`` over the queries; the first query, projected, is the image embedding, the other
  255 are what the decoder reads. (open_clip's own layout, "not the paper's", kept for its weights.)
- Text tower: CLIP's, with a learned ``cls_emb`` appended after the text; its output after ``ln_final`` and the
  projection is the text embedding; keys at padding positions are masked, one position late, as open_clip's
  released weights were trained (``correct_cls_mask`` false).
- Decoder (``text_decoder``, open_clip's ``MultimodalTransformer``): per layer a causal self-attention block on the
  caption so far and a cross-attention block on the image's tokens; ``ln_final``; a projection to the vocabulary.

Module names are open_clip's, so its checkpoints load without renaming. ``generate`` writes captions greedily, by
top-k / top-p sampling or by beam search, as open_clip's ``generate`` does (token for token), or by beam search over
log-probabilities; ``decode_captions`` turns them into text; ``clipforge caption generate --coca MODEL`` does both from
the command line (``caption eval --coca`` scores them). In training, ``forward`` also returns the decoder's logits for
the caption tokens, which ``loss.CoCaLoss`` adds to the contrastive loss (``clipforge train --model coca_...``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import linear_cross_entropy
from .clip import CLIP, CLIPOutput
from .layers import LayerNorm, ResidualAttentionBlock, init_residual_blocks, mlp, recomputed
from .text_transformer import TextTransformer
from .vision_transformer import VisionTransformer

SOT_ID, EOT_ID = 49406, 49407  # CLIP's tokenizer's start- and end-of-text ids


class AttentionalPooler(nn.Module):
    """``queries`` learned vectors attend over the tokens (keys and values ``context_dim`` wide)."""

    def __init__(self, width: int, context_dim: int, heads: int, queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, width))
        self.attn = nn.MultiheadAttention(width, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = LayerNorm(width)
        self.ln_k = LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        query = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(query, x, x, need_weights=False)[0]


class CoCaVisionTransformer(VisionTransformer):
    def __init__(self, *args, pool_heads: int = 8, pool_queries: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        width, output_dim = self.conv1.out_channels, self.output_dim
        self.attn_pool = AttentionalPooler(output_dim, width, pool_heads, pool_queries)
        self.ln_post = LayerNorm(output_dim)  # over the pooled queries, in the embedding's width
        self.proj = nn.Parameter(output_dim ** -0.5 * torch.randn(output_dim, output_dim))

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [N, output_dim], tokens for the decoder [N, queries - 1, output_dim])`` (``forward_tokens``)."""
        x = self.ln_post(self.attn_pool(x))
        return self._project(x[:, 0]), x[:, 1:]

    def _normalize_intermediate(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("normalize_intermediates: a CoCa image tower's final LayerNorm is over its pooled queries "
                         "(the embedding's width), not over the blocks' tokens")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)[0]

    def forward_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's patch tokens as a map ``[N, width, grid, grid]`` (the pooling's input)."""
        x = self.transformer(self._tokens(images))[:, 1:]
        grid = self.image_size // self.patch_size
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid, grid)


class CoCaTextTransformer(TextTransformer):
    def __init__(self, *args, pad_id: int = 0, correct_cls_mask: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.causal or self.pool != "eot":
            raise ValueError("CoCa's text tower is causal and pools its appended class token")
        width = self.token_embedding.embedding_dim
        self.pad_id, self.correct_cls_mask = pad_id, correct_cls_mask
        self.cls_emb = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length + 1, width))
        nn.init.normal_(self.cls_emb, std=0.01)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [N, output_dim], per-position outputs before ln_final [N, L, width])``."""
        x, mask = self._sequence(tokens)
        x = self.transformer(x, attn_mask=mask)
        return self._pool_sequence(x, tokens), x[:, :-1]

    def _sequence(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text's embeddings with the class token appended [N, L + 1, width], and the attention mask: causal, and
        no query attends to padding."""
        batch, length = tokens.shape
        x = torch.cat([self.token_embedding(tokens), self.cls_emb.to(self.token_embedding.weight.dtype)
                       .expand(batch, 1, -1)], dim=1)
        x = x + self.positional_embedding[: length + 1]
        keys = tokens != self.pad_id
        ones = keys.new_ones(batch, 1)
        keys = torch.cat([keys, ones] if self.correct_cls_mask else [ones, keys], dim=1)  # the released weights': late
        causal = torch.ones(length + 1, length + 1, dtype=torch.bool, device=tokens.device).tril()
        return x, (causal & keys[:, None, :]).unsqueeze(1)

    def _split_intermediates(self, intermediates: list[torch.Tensor], extra_tokens: bool) -> dict:
        """The text positions, and (``extra_tokens``) the appended class token's as ``text_intermediates_suffix``."""
        output = {"text_intermediates": [t[:, :-1] for t in intermediates]}
        if extra_tokens:
            output["text_intermediates_suffix"] = [t[:, -1:] for t in intermediates]
        return output

    def _pool_sequence(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._project(self.ln_final(x[:, -1]))  # the class token's, whatever the pool setting

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(tokens)[0]

    features_padded = features


class CrossAttentionBlock(nn.Module):
    """``x + attn(ln_1(x), ln_1_kv(image), ln_1_kv(image))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.ln_1_kv = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        self.mlp = mlp(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        image = self.ln_1_kv(image)
        x = x + self.attn(self.ln_1(x), image, image, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class MultimodalDecoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, vocab_size: int, context_length: int,
                 mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        self.context_length = context_length
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act=act)
                                        for _ in range(layers)])
        self.cross_attn = nn.ModuleList([CrossAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)])
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, vocab_size))
        self.grad_checkpointing = False  # recompute each block in backward (CLIP.set_grad_checkpointing)
        # open_clip's: CLIP's block initialisation over both kinds of block, the vocabulary projection by width
        init_residual_blocks((*self.resblocks, *self.cross_attn), width, layers)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, project: bool = True) -> torch.Tensor:
        """Vocabulary logits ``[N, L, vocab]`` for each caption position, from the text tower's outputs (``project``
        false: the states before the vocabulary projection, ``[N, L, width]``)."""
        x = text_tokens
        for block, cross in zip(self.resblocks, self.cross_attn):
            x = recomputed(block, x, True, enabled=self.grad_checkpointing)  # causal self-attention
            x = recomputed(cross, x, image_tokens, enabled=self.grad_checkpointing)
        x = self.ln_final(x)
        return x @ self.text_projection if project else x


class CoCa(CLIP):
    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict, multimodal_cfg: dict, **kwargs):
        super().__init__(embed_dim, vision_cfg, text_cfg, **kwargs)
        if not isinstance(self.visual, VisionTransformer) or not isinstance(self.text, CoCaTextTransformer):
            raise ValueError("CoCa needs CLIP's ViT as its image tower (with or without attentional pooling, "
                             "vision_cfg.attentional_pool) and a class token in its text tower (text_cfg.embed_cls)")
        cfg = multimodal_cfg
        # the decoder's cross-attention reads the image tokens in its own width: the pooled queries' (the embedding
        # width) after attentional pooling, else the tower's own (coca_base)
        token_width = self.visual.output_dim if isinstance(self.visual, CoCaVisionTransformer) else \
            self.visual.conv1.out_channels
        if token_width != cfg["width"]:
            raise ValueError(f"CoCa's decoder (multimodal_cfg.width {cfg['width']}) reads image tokens "
                             f"{token_width} wide; the two must be equal")
        self.text_decoder = MultimodalDecoder(
            cfg["width"], cfg["layers"], cfg["heads"], cfg["vocab_size"], cfg["context_length"],
            cfg.get("mlp_ratio", 4.0), "quick_gelu" if kwargs.get("quick_gelu") else "gelu")

    def caption_logits(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's next-token logits ``[N, L, vocab]`` at every position of ``tokens`` (teacher forcing: the
        captioning loss compares position i with token i + 1)."""
        _, image_tokens = self.visual.forward_tokens(images)
        return self.text_decoder(image_tokens, self.text.forward_tokens(tokens)[1])

    def caption_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """CoCa's captioning loss (open_clip's ``CoCaLoss`` before its weight): the mean cross-entropy of each next
        token given the caption so far and the image, padding left out. (``clipforge train`` takes it from
        ``forward``'s caption fields instead, with the contrastive loss from the same tower passes: ``CoCaLoss``.)"""
        image_tokens = self.visual.forward_tokens(images)[1]
        states, labels = self.caption_states(image_tokens, self.text.forward_tokens(tokens)[1], tokens)
        return linear_cross_entropy(states, self.text_decoder.text_projection, labels) / max(1, len(labels))

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> CLIPOutput:
        """CLIP's output; in training, given images and tokens, also what the captioning loss needs, from the same
        two tower passes (as open_clip's ``CoCa.forward``): ``caption_labels``, every caption token after the first
        that is not padding, flattened, and (autograd on) ``caption_nll``, the summed cross-entropy of the decoder's
        prediction of each (open_clip returns the logits; its loss takes the mean).

        The decoder runs only as far as the batch's longest caption, and only positions with a label are projected
        onto the vocabulary: causal masks make both exact (later positions cannot change earlier ones), so the
        padding of a 77-token context costs neither time nor memory. The projection and cross-entropy run a chunk of
        tokens at a time (``loss.linear_cross_entropy``): the [tokens x 49,408] logits never exist whole. Without
        autograd (the cached pass of gradient accumulation) the decoder is skipped: the step needs only the labels'
        count."""
        if not (self.training and images is not None and tokens is not None):
            return super().forward(images, tokens)
        dtype = next(self.visual.parameters()).dtype
        image_features, image_tokens = self.visual.forward_tokens(images.to(dtype))
        text_features, text_states = self.text.forward_tokens(tokens)
        if torch.is_grad_enabled():
            states, labels = self.caption_states(image_tokens, text_states, tokens)
            nll = linear_cross_entropy(states, self.text_decoder.text_projection, labels)
        else:
            nll, labels = None, _labelled_rows(tokens[:, 1:], tokens[:, 1:] != self.text.pad_id)
        return super().forward()._replace(
            image_features=F.normalize(image_features, dim=-1), text_features=F.normalize(text_features, dim=-1),
            caption_nll=nll, caption_labels=labels)

    def caption_states(self, image_tokens: torch.Tensor, text_states: torch.Tensor,
                       tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [T, width], labels [T])`` for the T caption tokens after the first that are not padding: the
        decoder's final states predicting each (before the vocabulary projection) from the tokens before it
        (``text_states``: the text tower's per-position outputs for ``tokens``) and the image's tokens. Only as many
        positions as the longest caption are decoded."""
        labels = tokens[:, 1:]
        has_label, length = _caption_extent(labels, self.text.pad_id)
        states = self.text_decoder(image_tokens, text_states[:, :length], project=False)
        return _labelled_rows(states, has_label[:, :length]), _labelled_rows(labels, has_label)

    def caption_predictions(self, image_tokens: torch.Tensor, text_states: torch.Tensor,
                            tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [T, vocab], labels [T])``: ``caption_states`` projected onto the vocabulary."""
        states, labels = self.caption_states(image_tokens, text_states, tokens)
        return states @ self.text_decoder.text_projection, labels

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_length: int = 30, min_length: int = 5, top_k: int | None = None,
                 top_p: float | None = None, num_beams: int | None = None, num_beam_groups: int = 1,
                 beam_scores: str = "logits", temperature: float = 1.0, repetition_penalty: float = 1.0,
                 length_penalty: float = 1.0, generator: torch.Generator | None = None, sot_id: int = SOT_ID,
                 eot_id: int = EOT_ID, pad_id: int | None = None) -> torch.Tensor:
        """Caption token ids ``[N, <= max_length]``, start-of-text first, as open_clip's ``generate``:

        - greedy (the default) or ``top_k`` / ``top_p`` sampling (its ``generation_type`` "top_k" / "top_p"): one
          token at a time until end-of-text (or ``pad_id``) or ``max_length``, where the last token is forced to
          end-of-text; finished rows are padded with ``pad_id`` (the text tower's);
        - ``num_beams`` (with ``num_beam_groups``): its "beam_search", open_clip's default (6 beams in 3 groups).
          As open_clip's, beams are ranked by their summed *logits* (not log-probabilities), finished hypotheses by
          that sum over their length (with end-of-text) to the power ``length_penalty``, and a caption that reaches
          ``max_length`` keeps its last token. open_clip's groups have no diversity penalty, so every group searches
          alike: one group of ``num_beams // num_beam_groups`` beams is searched here, with the same result.
          ``beam_scores="log_probs"`` ranks by summed log-probabilities instead, as transformers' beam search does
          (better captions on Flickr8k dev for a CoCa trained here: docs/BENCHMARKS.md).

        No end-of-text before ``min_length`` tokens; ``repetition_penalty`` shrinks the logits of tokens already in
        the caption (transformers' ``RepetitionPenaltyLogitsProcessor``, which open_clip applies). Each step runs only
        the new position of the rows still being written through the text tower and the decoder, attending over the
        keys and values kept from earlier steps: under the causal masks earlier positions cannot change, so this is
        open_clip's computation without its recomputing every caption (and every finished one) at every step."""
        if max_length <= min_length:
            raise ValueError(f"max_length ({max_length}) must be larger than min_length ({min_length})")
        if max_length > self.text.context_length:
            raise ValueError(f"max_length ({max_length}) is past the text tower's {self.text.context_length} positions")
        if sum(option is not None for option in (top_k, top_p, num_beams)) > 1:
            raise ValueError("generate decodes greedily, by top_k or top_p sampling, or by beam search (num_beams): "
                             "give at most one of them")
        if beam_scores not in ("logits", "log_probs"):
            raise ValueError(f"beam_scores is 'logits' (open_clip's) or 'log_probs', not {beam_scores!r}")
        if num_beams is not None and (num_beams < 2 or num_beam_groups < 1 or num_beams % num_beam_groups):
            raise ValueError(f"num_beams ({num_beams}) must be at least 2 and a multiple of num_beam_groups "
                             f"({num_beam_groups})")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, not {repetition_penalty}")
        pad_id = self.text.pad_id if pad_id is None else pad_id
        was_training = self.training
        self.eval()
        try:
            decoder = _IncrementalDecoder(self, self.visual.forward_tokens(images)[1])
            if num_beams is None:
                out = _sample(decoder, images.shape[0], max_length, min_length, 1 if top_p is None and top_k is None
                              else top_k, top_p, temperature, repetition_penalty, generator, sot_id, eot_id, pad_id)
            else:
                out = _beam_search(decoder, images.shape[0], num_beams // num_beam_groups, max_length, min_length,
                                   beam_scores == "log_probs", repetition_penalty, length_penalty, sot_id, eot_id,
                                   pad_id)
        finally:
            self.train(was_training)
        return out


class _IncrementalDecoder:
    """A CoCa's text tower and decoder run one caption position at a time for each row (an image, or one beam of an
    image), keeping every layer's self-attention keys and values, and the image tokens' cross-attention ones."""

    def __init__(self, model: CoCa, image_tokens: torch.Tensor):
        self.text, self.decoder = model.text, model.text_decoder
        self.cross_kv = [_cross_keys_values(block, image_tokens) for block in self.decoder.cross_attn]
        self.text_cache = [[] for _ in self.text.transformer.resblocks]
        self.decoder_cache = [[] for _ in self.decoder.resblocks]

    def next_logits(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Each row's next-token logits ``[R, vocab]`` after its token ``tokens[r]`` at ``position``."""
        text, decoder = self.text, self.decoder
        x = text.token_embedding(tokens[:, None]) + text.positional_embedding[position]
        for block, cache in zip(text.transformer.resblocks, self.text_cache):
            x = _self_attention_step(block, x, cache)
        for block, cross, cache, kv in zip(decoder.resblocks, decoder.cross_attn, self.decoder_cache, self.cross_kv):
            x = _cross_attention_step(cross, _self_attention_step(block, x, cache), kv)
        return decoder.ln_final(x[:, -1]) @ decoder.text_projection

    def keep(self, rows: torch.Tensor) -> None:
        """From now on only ``rows``, in that order (beams reordered, finished rows dropped; a row may repeat)."""
        for cache in self.text_cache + self.decoder_cache:
            cache[:] = [t[rows] for t in cache]
        self.cross_kv = [(k[rows], v[rows]) for k, v in self.cross_kv]


def _sample(decoder: _IncrementalDecoder, batch: int, max_length: int, min_length: int, top_k: int | None,
            top_p: float | None, temperature: float, repetition_penalty: float, generator, sot_id: int, eot_id: int,
            pad_id: int) -> torch.Tensor:
    """open_clip's top-k / top-p ``generate`` loop; rows leave the computation as they finish."""
    device = decoder.text.positional_embedding.device
    out = torch.full((batch, 1), sot_id, dtype=torch.long, device=device)
    writing = torch.arange(batch, device=device)  # rows of ``out`` still being written, in the decoder's row order
    while True:
        length = out.shape[1]
        logits = _processed(decoder.next_logits(out[writing, -1], length - 1), out[writing], length < min_length,
                            repetition_penalty, eot_id)
        logits = _filter_top_k(logits, top_k) if top_k is not None else _filter_top_p(logits, top_p)
        if length + 1 == max_length:
            new = torch.full((len(writing),), eot_id, dtype=torch.long, device=device)
        else:
            new = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator)[:, 0]
        column = torch.full((batch, 1), pad_id, dtype=torch.long, device=device)
        column[writing, 0] = new
        out = torch.cat([out, column], dim=1)
        going = (new != eot_id) & (new != pad_id)  # open_clip stops a row at either
        if out.shape[1] >= max_length or not going.any():
            return out
        if not going.all():
            decoder.keep(going.nonzero()[:, 0])
            writing = writing[going]


def _processed(logits: torch.Tensor, tokens: torch.Tensor, too_short: bool, repetition_penalty: float,
               eot_id: int) -> torch.Tensor:
    """open_clip's logits processors: no end-of-text while ``too_short`` (transformers' MinLengthLogitsProcessor),
    then the logits of tokens already in each row's ``tokens`` divided by ``repetition_penalty`` (multiplied where
    negative: transformers' RepetitionPenaltyLogitsProcessor)."""
    if too_short:
        logits[:, eot_id] = float("-inf")
    if repetition_penalty != 1.0:
        seen = logits.gather(1, tokens)
        logits = logits.scatter(1, tokens, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
    return logits


class _Finished:
    """One image's best finished captions, at most ``size`` (transformers' ``BeamHypotheses``, which open_clip's beam
    search keeps): each scored by its summed logits over its length to the power ``length_penalty``."""

    def __init__(self, size: int, length_penalty: float):
        self.size, self.length_penalty = size, length_penalty
        self.captions: list[tuple[float, torch.Tensor]] = []
        self.worst = 1e9

    def add(self, tokens: torch.Tensor, summed: float, length: int) -> None:
        score = summed / length ** self.length_penalty
        if len(self.captions) < self.size or score > self.worst:
            self.captions.append((score, tokens))
            if len(self.captions) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.captions))
                del self.captions[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_summed: float, length: int) -> bool:
        """Full, and no open beam can beat the worst caption kept (transformers' ``early_stopping=False``)."""
        return len(self.captions) >= self.size and self.worst >= best_summed / length ** self.length_penalty

    def best(self) -> torch.Tensor:
        return sorted(self.captions, key=lambda caption: caption[0])[-1][1]  # the last of equals, as transformers'


def _beam_search(decoder: _IncrementalDecoder, batch: int, beams: int, max_length: int, min_length: int,
                 log_probs: bool, repetition_penalty: float, length_penalty: float, sot_id: int, eot_id: int,
                 pad_id: int) -> torch.Tensor:
    """open_clip's ``_generate_beamsearch`` (transformers' ``BeamSearchScorer``) for one group of ``beams`` beams
    per image, on logits or (``log_probs``) log-probabilities; an image leaves the computation once its search is
    done."""
    device = decoder.text.positional_embedding.device
    decoder.keep(torch.arange(batch, device=device).repeat_interleave(beams))
    searching = list(range(batch))  # images still searched; each has ``beams`` consecutive rows
    finished = [_Finished(beams, length_penalty) for _ in range(batch)]
    tokens = torch.full((batch * beams, 1), sot_id, dtype=torch.long, device=device)
    scores = torch.full((batch, beams), -1e9, device=device)
    scores[:, 0] = 0  # every image starts from one beam
    scores = scores.view(-1)
    while True:
        length = tokens.shape[1]
        logits = decoder.next_logits(tokens[:, -1], length - 1)
        logits = _processed(F.log_softmax(logits, dim=-1) if log_probs else logits, tokens, length < min_length,
                            repetition_penalty, eot_id)
        vocab = logits.shape[1]
        top_scores, top = (logits + scores[:, None]).view(len(searching), beams * vocab).topk(2 * beams, dim=1)
        chosen, still = [], []  # (row, token, summed score) of every beam that goes on; the images that do
        for i, (image, image_scores, image_top) in enumerate(zip(searching, top_scores.tolist(), top.tolist())):
            kept = []
            for rank, (score, choice) in enumerate(zip(image_scores, image_top)):
                row, token = i * beams + choice // vocab, choice % vocab
                if token == eot_id:
                    if rank < beams:  # an end among the best ``beams`` candidates finishes that caption
                        finished[image].add(tokens[row], score, length + 1)
                else:
                    kept.append((row, token, score))
                if len(kept) == beams:
                    break
            if not finished[image].done(max(image_scores), length + 1):
                still.append(image)
                chosen += kept
        searching = still
        if not searching:
            break
        rows, next_tokens, next_scores = (list(column) for column in zip(*chosen))
        rows = torch.tensor(rows, device=device)
        tokens = torch.cat([tokens[rows], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device)
        if tokens.shape[1] >= max_length:  # the open beams of an unfinished search compete as they are
            for i, image in enumerate(searching):
                for row in range(i * beams, (i + 1) * beams):
                    finished[image].add(tokens[row], next_scores[row], tokens.shape[1])
            break
        decoder.keep(rows)
    best = [caption.best() for caption in finished]
    width = min(max(len(caption) for caption in best) + 1, max_length)
    out = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    for row, caption in zip(out, best):
        row[:len(caption)] = caption
        if len(caption) < width:
            row[len(caption)] = eot_id
    return out


# Sizes read off the data: eager under torch.compile (a graph break, without dynamo tracing .item() and nonzero)
@torch.compiler.disable
def _caption_extent(labels: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int]:
    """(which positions hold a caption token, how many positions reach the last of them)."""
    has_label = labels != pad_id
    used = has_label.any(dim=0).nonzero()
    return has_label, int(used.max()) + 1 if len(used) else 1


@torch.compiler.disable
def _labelled_rows(x: torch.Tensor, has_label: torch.Tensor) -> torch.Tensor:
    return x[has_label]


def _self_attention_step(block: ResidualAttentionBlock, x: torch.Tensor, cache: list) -> torch.Tensor:
    """One new position ``x`` [N, 1, width] through a causal pre-LN block; its keys and values join ``cache``."""
    attn = block.attn
    batch, _, width = x.shape
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias) \
        .view(batch, 1, 3, attn.heads, width // attn.heads).permute(2, 0, 3, 1, 4)
    if cache:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    cache[:] = [k, v]
    x = x + block.ls_1(attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, 1, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _cross_keys_values(block: CrossAttentionBlock, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tokens' keys and values for one cross-attention block [N, heads, tokens, head_dim], computed once."""
    attn, width = block.attn, image.shape[-1]
    kv = F.linear(block.ln_1_kv(image), attn.in_proj_weight[width:], attn.in_proj_bias[width:])
    k, v = kv.view(image.shape[0], -1, 2, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
    return k, v


def _cross_attention_step(block: CrossAttentionBlock, x: torch.Tensor, kv: tuple) -> torch.Tensor:
    attn = block.attn
    batch, _, width = x.shape
    q = F.linear(block.ln_1(x), attn.in_proj_weight[:width], attn.in_proj_bias[:width])
    q = q.view(batch, 1, attn.num_heads, width // attn.num_heads).transpose(1, 2)
    x = x + attn.out_proj(F.scaled_dot_product_attention(q, *kv).transpose(1, 2).reshape(batch, 1, width))
    return x + block.mlp(block.ln_2(x))


def decode_captions(ids: torch.Tensor, tokenizer) -> list[str]:
    """The text of each ``generate`` row: the tokens between start- and end-of-text, decoded."""
    captions = []
    for row in ids.tolist():
        row = row[1:] if row and row[0] == SOT_ID else row
        row = row[: row.index(EOT_ID)] if EOT_ID in row else row
        captions.append(tokenizer.decode([i for i in row if i != 0]).strip())
    return captions


def _filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Every logit below the k-th largest of its row set to -inf (transformers' ``TopKLogitsWarper``)."""
    k = min(max(k, 1), logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """The smallest set of most probable tokens whose probabilities sum past ``p`` kept (transformers'
    ``TopPLogitsWarper``: the tokens in the lowest ``1 - p`` of the mass are dropped, the top one always kept)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
