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

    @torch.no_grad()
    def caption_log_likelihood(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, C]``: log p(caption c | image n), summed over each caption's words and its <eos>."""
        n, c = len(embeddings), len(tokens)
        length = int(tokens.ne(PAD).sum(dim=1).max())  # nothing past the longest caption can change a sum
        tokens = tokens[:, :length].to(embeddings.device)
        logits = self.next_word_logits(embeddings.repeat_interleave(c, dim=0), tokens.repeat(n, 1))
        targets = tokens[:, 1:].repeat(n, 1)
        log_p = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        return (log_p * targets.ne(PAD)).sum(dim=1).view(n, c)


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
