"""An image tower trained to predict its caption word by word (``--objective caption``): the CLIP paper's
transformer language-model baseline (its Figure 2, the slowest of the three objectives), on the same image tower.

The image embedding, projected, is the first position of a small causal transformer (the size of the zoo model's
text tower) that predicts the caption's words one after another, trained with cross-entropy. The vocabulary is every
word of the training captions (stop words included: a language model has to say them), most frequent first.
Zero-shot, a class scores the log-likelihood of its prompt ("a photo of a {}.") given the image, averaged over
templates: no text encoder, only the model's own predictions.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .bow import words
from .models.clip import CLIPOutput
from .models.image_tower import ImageTowerModel
from .models.layers import LayerNorm, Transformer

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(len(SPECIALS))
PRIOR_IMAGES = 500  # training images a prompt's prior is averaged over when evaluating (benchmarks/objectives.py)
CONTEXT_LENGTH = 32  # tokens per caption row: <bos>, up to 30 words, <eos> (Flickr8k captions rarely pass 25 words)


class CaptionVocabulary:
    """The special tokens, then the ``size`` most frequent words of the training captions; called on texts it
    returns ``[N, context_length]`` rows ``<bos> words... <eos> <pad>...`` (unknown words as ``<unk>``)."""

    def __init__(self, words_: list[str], context_length: int = CONTEXT_LENGTH):
        if context_length < 3:
            raise ValueError(f"context_length {context_length} leaves no room for a word between <bos> and <eos>")
        self.words, self.context_length = list(words_), context_length
        self.index = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}

    @classmethod
    def from_captions(cls, texts: list[str], size: int, context_length: int = CONTEXT_LENGTH) -> "CaptionVocabulary":
        counts = Counter(w for text in texts for w in words(text))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))  # ties by spelling: deterministic
        return cls([w for w, _ in ranked[:size]], context_length)

    def ids(self, text: str) -> list[int]:
        """``text``'s word ids, without specials."""
        return [self.index.get(w, UNK) for w in words(text)]

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS, *self.ids(text)[: self.context_length - 2], EOS]
            rows[row, : len(ids)] = torch.tensor(ids)
        return rows

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.words)


class CaptionLMModel(ImageTowerModel):
    """CLIP's image tower plus a causal transformer decoder conditioned on its embedding; speaks the training loop's
    interface (``forward`` -> CLIPOutput with the next-word logits as image features and the words to predict as
    text features)."""

    def __init__(self, config: dict, vocabulary: CaptionVocabulary):
        super().__init__(config)
        decoder = config["decoder"]
        width = decoder["width"]
        self.vocabulary = vocabulary
        self.image_to_prefix = nn.Linear(config["embed_dim"], width)
        self.token_embedding = nn.Embedding(len(vocabulary), width)  # also the output layer (tied)
        self.positional_embedding = nn.Parameter(torch.empty(vocabulary.context_length, width))
        self.decoder = Transformer(width, decoder["layers"], decoder["heads"])
        self.ln_final = LayerNorm(width)
        self.register_buffer("logit_scale", torch.zeros(()), persistent=False)  # logged by the loop; not learned
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.decoder.init_parameters()

    @classmethod
    def from_config(cls, config: dict) -> "CaptionLMModel":
        return cls(config, CaptionVocabulary(config["vocabulary"], config["decoder"]["context_length"]))

    def next_word_logits(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, L-1, vocabulary]``: at each position of ``tokens`` ([N, L], starting with <bos>) but the last, the
        logits of the token after it, given image ``embeddings`` [N, embed_dim] and the tokens so far."""
        prefix = self.image_to_prefix(embeddings.to(self.image_to_prefix.weight.dtype))[:, None]
        x = torch.cat([prefix, self.token_embedding(tokens[:, :-1])], dim=1)
        x = self.ln_final(self.decoder(x + self.positional_embedding[: x.shape[1]], causal=True))
        return x[:, 1:] @ self.token_embedding.weight.t()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> CLIPOutput:
        return CLIPOutput(self.next_word_logits(self.visual(images), tokens), tokens[:, 1:], self.logit_scale.exp())

    def zero_shot_logits(self, embeddings: torch.Tensor, classnames: list[str], templates=("a photo of a {}.",),
                         references: torch.Tensor | None = None) -> torch.Tensor:
        """Each class prompt's log-likelihood given the image, averaged over ``templates``, less its mean over the
        ``references`` (embeddings of training images) when given: module ``zero_shot_logits`` and
        ``prompt_log_prior``. Without references the likeliest prompt for any image tends to win for nearly all."""
        prior = None if references is None else prompt_log_prior(self, references, classnames, templates)
        return zero_shot_logits(self, embeddings, classnames, templates, prior=prior)

    @torch.no_grad()
    def caption_log_likelihood(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, C]``: log p(caption c | image n), summed over each caption's words and its <eos>.

        The captions are read as one tree per image (``CaptionTree``): words that several captions begin with ("a
        photo of a") are one decoder position, seen by every caption under it, so a class prompt costs the decoder
        only the positions of its own words. Same sums as running each caption alone, to float rounding."""
        scores = []
        prefix = self.image_to_prefix(embeddings.to(self.image_to_prefix.weight.dtype))[:, None]
        for tree in CaptionTree.split(tokens):
            words_ = self.token_embedding(tree.tokens.to(prefix.device)).expand(len(prefix), -1, -1)
            x = torch.cat([prefix, words_], dim=1) + self.positional_embedding[tree.depth.to(prefix.device)]
            x = self.ln_final(self.decoder(x, attn_mask=tree.visible.to(prefix.device)))
            logits = x[:, 1:] @ self.token_embedding.weight.t()
            log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            scored = log_p[:, tree.pair_node.to(prefix.device) - 1, tree.pair_target.to(prefix.device)]  # [N, pairs]
            scores.append(scored @ tree.pair_in_caption.to(scored))
        return torch.cat(scores, dim=1)


class CaptionTree:
    """Caption rows (``<bos> words <eos> <pad>...``) as one decoder input: a trie of their input tokens (all but
    each caption's last) under node 0, the image position. Node i sits at position ``depth[i]`` and sees itself
    and its ancestors only (``visible``), so its output is exactly what the causal decoder gives at that position
    of every caption through it. ``pair_node``/``pair_target``: each (node, next token) a caption scores, once;
    ``pair_in_caption`` [pairs, C]: 1 where caption c scores the pair."""

    MAX_NODES = 256  # attention over the tree grows with its square; larger caption sets are split (``split``)

    def __init__(self, rows: list[list[int]]):
        parents, depths, tokens = [-1], [0], [PAD]
        children: dict[tuple[int, int], int] = {}
        pairs: dict[tuple[int, int], int] = {}
        uses = []
        for row in rows:
            node, used = 0, []
            for position, (token, target) in enumerate(zip(row[:-1], row[1:])):
                if (node, token) not in children:
                    children[node, token] = len(tokens)
                    parents.append(node)
                    depths.append(position + 1)
                    tokens.append(token)
                node = children[node, token]
                used.append(pairs.setdefault((node, target), len(pairs)))
            uses.append(used)
        visible = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
        for node, parent in enumerate(parents):  # parents come before their children
            if parent >= 0:
                visible[node] = visible[parent]
            visible[node, node] = True
        self.tokens, self.depth, self.visible = torch.tensor(tokens[1:]), torch.tensor(depths), visible
        self.pair_node = torch.tensor([node for node, _ in pairs], dtype=torch.long)
        self.pair_target = torch.tensor([target for _, target in pairs], dtype=torch.long)
        self.pair_in_caption = torch.zeros(len(pairs), len(rows))
        for caption, used in enumerate(uses):
            self.pair_in_caption[used, caption] = 1.0

    @classmethod
    def split(cls, tokens: torch.Tensor) -> list["CaptionTree"]:
        """Trees over consecutive rows of ``tokens`` [C, L], each of at most ``MAX_NODES`` nodes (a caption longer
        than that still gets a tree of its own); their score columns concatenate in row order."""
        groups, seen = [], set()
        for row in tokens.tolist():
            row = [t for t in row if t != PAD]
            inputs = [tuple(row[:end]) for end in range(1, len(row))]  # each input token, named by its path
            new = [path for path in inputs if path not in seen]
            if not groups or len(seen) + len(new) + 1 > cls.MAX_NODES:
                groups.append([])
                seen, new = set(), inputs
            groups[-1].append(row)
            seen.update(new)
        return [cls(group) for group in groups]


class CaptionLoss(nn.Module):
    """Mean cross-entropy of every next word (and <eos>) of every caption; padding carries no signal."""

    def forward(self, logits, targets, logit_scale=None, logit_bias=None) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD)


@torch.no_grad()
def zero_shot_logits(model: CaptionLMModel, embeddings: torch.Tensor, classnames: list[str],
                     templates=("a photo of a {}.",), batch_size: int = 256,
                     prior: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, classes]``: each class's prompt log-likelihood given the image, averaged over ``templates``; -inf for a
    class whose name has a word outside the vocabulary (the model could only say "<unk>").

    With ``prior`` (``prompt_log_prior`` over training images, same templates) a class scores
    log p(prompt | image) - log p(prompt): without it the prompt the decoder finds likeliest for any image (its
    commonest caption noun's) wins for nearly every image."""
    scores = _prompt_log_likelihoods(model, embeddings, classnames, templates, batch_size)
    if prior is not None:
        scores = scores - prior.to(scores.device)
    unnameable = [any(i == UNK for i in model.vocabulary.ids(name)) or not words(name) for name in classnames]
    scores[:, torch.tensor(unnameable, dtype=torch.bool)] = float("-inf")
    return scores


@torch.no_grad()
def prompt_log_prior(model: CaptionLMModel, embeddings: torch.Tensor, classnames: list[str],
                     templates=("a photo of a {}.",), batch_size: int = 256) -> torch.Tensor:
    """``[classes]``: each class prompt's log-likelihood averaged over reference images' ``embeddings``, an estimate
    of log p(prompt) for ``zero_shot_logits(prior=...)``. Take the references from training images, never from the
    images being classified."""
    return _prompt_log_likelihoods(model, embeddings, classnames, templates, batch_size).mean(dim=0)


def _prompt_log_likelihoods(model, embeddings, classnames, templates, batch_size) -> torch.Tensor:
    from .prompts import prompt_texts

    tokens = model.vocabulary(prompt_texts(classnames, list(templates)))
    scores = torch.cat([model.caption_log_likelihood(embeddings[i:i + batch_size], tokens).cpu()
                        for i in range(0, len(embeddings), batch_size)])
    return scores.view(len(embeddings), len(classnames), len(templates)).mean(dim=2)


def load(path: str, device: str = "cpu"):
    """``(model, preprocess)`` of a checkpoint written by ``clipforge train --objective caption``."""
    from .models.image_tower import load_image_tower

    return load_image_tower(path, device)
