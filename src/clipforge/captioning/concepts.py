"""Which concepts a caption carries over from the image (the LiMBer paper's Figure 4): noun precision and recall of
generated captions against their references, per category (people, animals, vehicles, places, objects), and for the
reference nouns a caption misses, how close the words it used instead come.

The nouns are those of a small lexicon shipped with the package (``concepts.json``: concrete nouns of everyday
photo captions in the paper's five categories, plurals folded to one form). Closeness is the cosine similarity of
all-MiniLM-L6-v2 embeddings of the two words: the paper uses WordNet's Wu-Palmer similarity, and no package that
installs here ships WordNet's data, so this is a substitute, not the same measure.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

import torch

CATEGORIES = ("people", "animals", "vehicles", "places", "objects")
_WORD = re.compile(r"[a-z]+")


@lru_cache(maxsize=1)
def lexicon() -> tuple[dict[str, str], dict[str, str]]:
    """(noun -> category, irregular plural -> noun)."""
    data = json.loads((resources.files(__package__) / "concepts.json").read_text())
    category_of = {noun: category for category, nouns in data["categories"].items() for noun in nouns if " " not in noun}
    return category_of, data["irregular"]


def lemma(word: str) -> str | None:
    """The lexicon noun a word names (``dogs`` -> ``dog``, ``children`` -> ``child``), or None."""
    category_of, irregular = lexicon()
    word = irregular.get(word, word)
    if word in category_of:
        return word
    for suffix, replacement in (("ies", "y"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and word[: -len(suffix)] + replacement in category_of:
            return word[: -len(suffix)] + replacement
    return None


def concept_nouns(text: str) -> set[str]:
    """The lexicon nouns mentioned in ``text``."""
    return {noun for noun in map(lemma, _WORD.findall(text.lower())) if noun}


def noun_scores(generated: list[str], references: list[list[str]]) -> dict:
    """Micro-averaged noun precision and recall per category and over all, against the nouns of *any* reference of
    the image (a caption naming what one annotator saw is right): {category: {precision, recall, generated,
    referenced, matched}}."""
    category_of, _ = lexicon()
    counts = {c: {"generated": 0, "referenced": 0, "matched": 0} for c in (*CATEGORIES, "all")}
    for caption, refs in zip(generated, references):
        said, truth = concept_nouns(caption), set().union(*(concept_nouns(r) for r in refs))
        for noun in said | truth:
            for key in (category_of[noun], "all"):
                counts[key]["generated"] += noun in said
                counts[key]["referenced"] += noun in truth
                counts[key]["matched"] += noun in said and noun in truth
    for row in counts.values():
        row["precision"] = row["matched"] / row["generated"] if row["generated"] else float("nan")
        row["recall"] = row["matched"] / row["referenced"] if row["referenced"] else float("nan")
    return counts


@lru_cache(maxsize=1)
def _minilm():
    from ..models.bert import Bert
    from ..models.hf_text import HFTokenizer, resolve_hf_model

    return Bert.from_pretrained(resolve_hf_model("all-minilm-l6-v2")).eval(), HFTokenizer("all-minilm-l6-v2", 8)


@torch.no_grad()
def word_vectors(words: list[str]) -> dict[str, torch.Tensor]:
    """Unit all-MiniLM-L6-v2 embeddings of single words (mean-pooled, as the model is used for sentences)."""
    model, tokenizer = _minilm()
    tokens = tokenizer(list(words))
    mask = tokens.ne(0)
    hidden = model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return dict(zip(words, torch.nn.functional.normalize(pooled, dim=-1)))


def missed_noun_similarity(generated: list[str], references: list[list[str]], vectors=word_vectors) -> dict:
    """For every reference noun a caption does not say, the highest cosine similarity between it and the nouns the
    caption does say (0 when it says none); the mean per category and over all. ``vectors``: words -> unit vectors."""
    category_of, _ = lexicon()
    pairs = []
    for caption, refs in zip(generated, references):
        said = concept_nouns(caption)
        missed = set().union(*(concept_nouns(r) for r in refs)) - said
        pairs += [(noun, sorted(said)) for noun in missed]
    if not pairs:
        return {c: float("nan") for c in (*CATEGORIES, "all")}
    table = vectors(sorted({n for n, _ in pairs} | {w for _, said in pairs for w in said}))
    scores = {c: [] for c in (*CATEGORIES, "all")}
    for noun, said in pairs:
        best = max((float(table[noun] @ table[w]) for w in said), default=0.0)
        scores[category_of[noun]].append(best)
        scores["all"].append(best)
    return {c: sum(v) / len(v) if v else float("nan") for c, v in scores.items()}
