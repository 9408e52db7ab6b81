"""Caption quality: CLIPScore and RefCLIPScore (Hessel et al. 2021), and COCO's BLEU and CIDEr.

CLIPScore needs no reference captions: ``2.5 * max(cos(image, caption), 0)`` with a CLIP model, here the same frozen
tower that feeds the map (so it measures agreement with what the map was given, not an independent judge).
RefCLIPScore is the harmonic mean of CLIPScore and the caption's best cosine to a reference caption.

BLEU-1..4 and CIDEr-D come from ``pycocoevalcap`` (the COCO caption evaluation code, optional: ``pip install
pycocoevalcap``). Its usual tokenizer is Stanford's PTB tokenizer, which needs Java; captions are tokenized here by
lower-casing and keeping runs of letters and digits, which drops the same punctuation and differs from PTB only on
rare forms (hyphenated words, contractions), so scores are close to, not identical with, published ones.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

CLIP_SCORE_WEIGHT = 2.5  # Hessel et al.: rescales cosines of ~0-0.4 to ~0-1


def classes_named(caption: str, classnames: list[str]) -> set[int]:
    """Indices of the class names a caption mentions as words (singular or plural): "two dogs" names "dog"."""
    text = caption.lower()
    return {i for i, name in enumerate(classnames)
            if re.search(rf"\b{re.escape(name.lower())}(?:s|es)?\b", text)}


def names_the_class(captions: list[str], labels: list[int], classnames: list[str]) -> float:
    """Fraction of captions that name their image's class and no other class."""
    if len(captions) != len(labels) or not captions:
        raise ValueError(f"{len(captions)} captions for {len(labels)} labels")
    return sum(classes_named(c, classnames) == {int(y)} for c, y in zip(captions, labels)) / len(captions)


def tokenize_for_scoring(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


@torch.no_grad()
def clip_scores(clip_model, tokenizer, image_features: torch.Tensor, captions: list[str],
                references: list[list[str]] | None = None, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-image ``clip_score`` and, with ``references``, ``ref_clip_score`` ([N] tensors)."""
    if len(captions) != len(image_features):
        raise ValueError(f"{len(captions)} captions for {len(image_features)} images")
    device = next(clip_model.parameters()).device

    def embed(texts: list[str]) -> torch.Tensor:
        out = [clip_model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float().cpu()
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    candidates = embed(captions)
    images = F.normalize(image_features.float().cpu(), dim=-1)
    scores = {"clip_score": CLIP_SCORE_WEIGHT * (images * candidates).sum(dim=-1).clamp(min=0)}
    if references is not None:
        flat = embed([r for refs in references for r in refs])
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs])
        similarity = (candidates[owner] * flat).sum(dim=-1)
        best = torch.full((len(captions),), -1.0).scatter_reduce(0, owner, similarity, reduce="amax")
        best = best.clamp(min=0)
        clip = scores["clip_score"]
        scores["ref_clip_score"] = torch.where(clip + best > 0, 2 * clip * best / (clip + best).clamp(min=1e-12),
                                               torch.zeros_like(clip))
    return scores


def coco_caption_scores(captions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D of ``captions`` against their ``references`` (pycocoevalcap)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ImportError("BLEU and CIDEr need the COCO caption code: pip install pycocoevalcap") from None
    if len(captions) != len(references) or not captions:
        raise ValueError(f"{len(captions)} captions for {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference caption")
    candidates = {i: [tokenize_for_scoring(c)] for i, c in enumerate(captions)}
    truth = {i: [tokenize_for_scoring(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(truth, candidates, verbose=0)
    cider, _ = Cider().compute_score(truth, candidates)
    return {**{f"bleu_{n}": float(b) for n, b in enumerate(bleu, 1)}, "cider": float(cider)}
