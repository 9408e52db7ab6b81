"""Image towers trained to predict words or labels instead of matching captions: the CLIP paper's bag-of-words
baseline (``--objective bow``) and supervised labels (``--objective labels``), on the same image tower as CLIP's.

A linear head maps the tower's embedding to one logit per entry of a vocabulary:
- ``bow``: the most frequent words of the training captions (stop words left out), trained with cross-entropy
  against each caption's words normalised to a distribution (multi-label softmax, as in Joulin et al. 2016 and
  Mahajan et al. 2018);
- ``labels``: for labelled data its classes (cross-entropy); for captioned data the most frequent concrete nouns of
  the captions (the ``captioning.concepts`` lexicon: lexical categories without sentences, the analogue of
  ImageNet's WordNet labels), each present or absent (multi-label, sigmoid cross-entropy).
Zero-shot, a class scores the mean log-probability of the words of its name: no prompt, no text tower.
"""
from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .models.clip import CLIPOutput
from .models.image_tower import ImageTowerModel, load_image_tower

STOP_WORDS = frozenset("""a an the and or of in on at to with while is are be being been it its this that these those
there their they them he she his her him we our you your i my me from by for as into onto over under up down out off
near next some one two three four five several many other another each very s""".split())
_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Vocabulary:
    """The ``size`` most frequent non-stop words of ``texts`` (a plural whose singular is also a word counts as it),
    or with ``kind="nouns"`` the most frequent concept nouns (``captioning.concepts``)."""

    def __init__(self, words_: list[str], kind: str = "words"):
        if kind not in ("words", "nouns"):
            raise ValueError(f"vocabulary kind must be 'words' or 'nouns', got {kind!r}")
        self.words, self.kind = list(words_), kind
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_captions(cls, texts: list[str], size: int, kind: str = "words") -> "Vocabulary":
        if kind == "nouns":
            from .captioning.concepts import lemma

            merged = Counter(n for text in texts for n in map(lemma, words(text)) if n)
        else:
            counts = Counter(w for text in texts for w in words(text) if w not in STOP_WORDS)
            merged = Counter()
            for word, n in counts.items():
                merged[_singular(word, counts)] += n
        ranked = sorted(merged.items(), key=lambda item: (-item[1], item[0]))  # ties by spelling: deterministic
        return cls([w for w, _ in ranked[:size]], kind)

    def lookup(self, word: str) -> int | None:
        """The index of ``word`` (or of its singular / lexicon noun), else None."""
        word = word.lower()
        if self.kind == "nouns":
            from .captioning.concepts import lemma

            return self.index.get(lemma(word) or "")
        if word in self.index:
            return self.index[word]
        return self.index.get(word[:-1]) if word.endswith("s") and not word.endswith("ss") else None

    def __call__(self, texts) -> torch.Tensor:
        """Texts -> word counts ``[N, len(vocabulary)]``: what the data pipeline hands the model as targets (for
        nouns, presence: 0 or 1)."""
        if isinstance(texts, str):
            texts = [texts]
        targets = torch.zeros(len(texts), len(self.words))
        for row, text in enumerate(texts):
            for word in words(text):
                index = self.lookup(word)
                if index is not None:
                    targets[row, index] = 1 if self.kind == "nouns" else targets[row, index] + 1
        return targets

    def __len__(self) -> int:
        return len(self.words)


def _singular(word: str, counts: Counter) -> str:
    if word.endswith("s") and not word.endswith("ss") and counts.get(word[:-1], 0):
        return word[:-1]
    return word


class BagOfWordsModel(ImageTowerModel):
    """CLIP's image tower plus a linear word head; speaks the training loop's interface (``forward`` -> CLIPOutput
    with the word logits as image features and the word counts as text features)."""

    def __init__(self, config: dict, vocabulary: Vocabulary):
        super().__init__(config)
        self.vocabulary = vocabulary
        self.head = nn.Linear(config["embed_dim"], len(vocabulary))
        self.register_buffer("logit_scale", torch.zeros(()), persistent=False)  # logged by the loop; not learned

    @classmethod
    def from_config(cls, config: dict) -> "BagOfWordsModel":
        return cls(config, Vocabulary(config["vocabulary"], config.get("vocabulary_kind", "words")))

    @property
    def word_log_prior(self) -> torch.Tensor | None:
        """log p(word) over the training captions, from the word counts a bag-of-words run saves in its config
        (None for checkpoints written before it did, and for ``labels`` models)."""
        counts = self.config.get("word_counts")
        return None if counts is None else log_prior(torch.tensor(counts))

    def word_log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Per vocabulary entry: log-softmax for a word distribution (bow, single labels); log-sigmoid for
        independent multi-label nouns."""
        return self.word_log_probs_of(self.visual(images))

    def word_log_probs_of(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``word_log_probs`` from image embeddings already computed (``encode_image``, not normalised)."""
        logits = self.head(embeddings.to(self.head.weight.dtype)).float()
        if self.config.get("objective") == "labels" and self.vocabulary.kind == "nouns":
            return F.logsigmoid(logits)
        return F.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def zero_shot_logits(self, embeddings: torch.Tensor, classnames: list[str], templates=None,
                         references: torch.Tensor | None = None) -> torch.Tensor:
        """Each class's mean word log-probability less the words' prior over the training captions (saved with the
        model; none for ``labels`` models and older checkpoints): ``zero_shot_logits`` below. A bag of words reads no
        prompt, so ``templates`` and ``references`` are not used."""
        return zero_shot_logits(self.word_log_probs_of(embeddings), self.vocabulary, classnames,
                                prior=self.word_log_prior)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> CLIPOutput:
        return CLIPOutput(self.head(self.visual(images)), targets, self.logit_scale.exp())


class BagOfWordsLoss(nn.Module):
    """Cross-entropy between the word logits and each caption's words as a distribution; captions without a
    vocabulary word carry no signal and are left out of the mean."""

    def forward(self, logits, targets, logit_scale=None, logit_bias=None) -> torch.Tensor:
        counts = targets.sum(dim=1)
        keep = counts > 0
        if not keep.any():
            return logits.sum() * 0.0
        distribution = targets[keep] / counts[keep, None]
        return -(distribution * F.log_softmax(logits[keep].float(), dim=-1)).sum(dim=1).mean()


class LabelLoss(nn.Module):
    """``--objective labels``: cross-entropy for integer labels [N]; sigmoid cross-entropy for multi-hot [N, V]."""

    def forward(self, logits, targets, logit_scale=None, logit_bias=None) -> torch.Tensor:
        if targets.ndim == 1:
            return F.cross_entropy(logits.float(), targets)
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def class_word_indices(vocabulary: Vocabulary, classnames: list[str]) -> list[list[int]]:
    """The vocabulary entries of each class name: the name itself where it is one (a labels model's class), else
    its words (possibly none: such a class cannot be named)."""
    return [[vocabulary.index[name.lower()]] if name.lower() in vocabulary.index else
            [i for i in (vocabulary.lookup(w) for w in words(name)) if i is not None] for name in classnames]


def word_counts(vocabulary: Vocabulary, captions: list[str]) -> torch.Tensor:
    """``[len(vocabulary)]``: how often each vocabulary entry occurs in ``captions``."""
    return sum((vocabulary(captions[i:i + 2048]).sum(0) for i in range(0, len(captions), 2048)),
               torch.zeros(len(vocabulary)))


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """Word counts -> log of their distribution, add-one smoothed (a word never seen keeps a finite prior)."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    return torch.log((counts + 1) / (counts + 1).sum())


def word_log_prior(vocabulary: Vocabulary, captions: list[str]) -> torch.Tensor:
    """``[len(vocabulary)]``: log of the word distribution of ``captions`` (the training captions), for
    ``zero_shot_logits(prior=...)``."""
    return log_prior(word_counts(vocabulary, captions))


@torch.no_grad()
def zero_shot_logits(word_log_probs: torch.Tensor, vocabulary: Vocabulary, classnames: list[str],
                     prior: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, classes]``: each class's mean word log-probability; -inf for a class with no vocabulary word.

    With ``prior`` (``word_log_prior`` of the training captions) a word scores log p(word | image) - log p(word):
    how much more likely the image makes it than a typical training caption does. Without it the most frequent
    caption word wins nearly everywhere (a Flickr8k model called 98% of CIFAR-10 images "dog"; docs/BENCHMARKS.md)."""
    if prior is not None:
        word_log_probs = word_log_probs - prior
    columns = []
    for indices in class_word_indices(vocabulary, classnames):
        columns.append(word_log_probs[:, indices].mean(dim=1) if indices else
                       torch.full((len(word_log_probs),), float("-inf")))
    return torch.stack(columns, dim=1)



def load(path: str, device: str = "cpu"):
    """``(model, preprocess)`` of a checkpoint written by ``clipforge train --objective bow`` or ``labels``."""
    return load_image_tower(path, device)
