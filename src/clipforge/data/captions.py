"""Captions made from class labels, for training on labelled data (``--label-captions``).

The grammar here is deliberately different from the zero-shot evaluation templates (``clipforge.zeroshot``): a
model trained on captions drawn from the evaluation prompts would be tested on its own training sentences.
"""
from __future__ import annotations

import random
import re
from ..prompts import fill

_OPENERS = ["", "a picture of", "an image of", "a photograph of", "a snapshot of", "a shot of", "here is",
            "this is", "there is", "we see", "a view of", "a close-up of", "a low-resolution image of",
            "a cropped image of", "an old photograph of", "a small image of"]
_ARTICLES = ["a", "the", "one"]
_CONTEXTS = ["", "", "", "in the picture", "in the frame", "seen up close", "from a distance", "outdoors",
             "in daylight", "in the center", "on its own"]


def label_caption(classname: str, rng: random.Random, templates: list[str] | None = None) -> str:
    """A caption for ``classname``: a random template from ``templates`` if given, else from the built-in grammar."""
    if templates:
        return fill(rng.choice(templates), classname)
    words = [rng.choice(_OPENERS), rng.choice(_ARTICLES), classname, rng.choice(_CONTEXTS)]
    caption = " ".join(w for w in words if w)
    return caption.capitalize() + "." if rng.random() < 0.5 else caption


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: whole words "left" and "right" exchanged, capitalisation kept."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, caption)
