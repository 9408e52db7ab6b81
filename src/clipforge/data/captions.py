"""Captions made from class labels, for training on labelled data (``--label-captions``).

The grammar here is deliberately different from the zero-shot evaluation templates (``clipforge.zeroshot``): a
model trained on captions drawn from the evaluation prompts would be tested on its own training sentences.
"""
from __future__ import annotations

import random
from pathlib import Path

_OPENERS = ["", "a picture of", "an image of", "a photograph of", "a snapshot of", "a shot of", "here is",
            "this is", "there is", "we see", "a view of", "a close-up of", "a low-resolution image of",
            "a cropped image of", "an old photograph of", "a small image of"]
_ARTICLES = ["a", "the", "one"]
_CONTEXTS = ["", "", "", "in the picture", "in the frame", "seen up close", "from a distance", "outdoors",
             "in daylight", "in the center", "on its own"]


def label_caption(classname: str, rng: random.Random, templates: list[str] | None = None) -> str:
    """A caption for ``classname``: a random template from ``templates`` if given, else from the built-in grammar."""
    if templates:
        return rng.choice(templates).replace("{}", classname).replace("{c}", classname)
    words = [rng.choice(_OPENERS), rng.choice(_ARTICLES), classname, rng.choice(_CONTEXTS)]
    caption = " ".join(w for w in words if w)
    return caption.capitalize() + "." if rng.random() < 0.5 else caption


def load_caption_templates(path: str | Path) -> list[str]:
    """One template per line with ``{}`` (or ``{c}``) where the class name goes; blank lines and ``#`` ignored."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if not templates:
        raise ValueError(f"{path}: no caption templates found")
    if bad:
        raise ValueError(f"{path}: template without '{{}}' placeholder: {bad[0]!r}")
    return templates
