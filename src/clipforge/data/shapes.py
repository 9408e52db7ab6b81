"""A procedurally generated captioned image set: coloured shapes of several sizes at several positions.

It needs no download and no files, is the same on every machine (sample ``i`` depends only on ``(seed, i)``), and is
hard enough to be interesting: captions name colour, shape, size and position in varied sentences, and some
colour+shape combinations can be held out of training to test compositional zero-shot transfer.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Iterator

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
# Held out of demo training: every colour and every shape still appears, just never in these pairs.
HELD_OUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("green", "cross"), ("yellow", "square"))

_TEMPLATES = [
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape}, {size}, {where}",
    "there is a {size} {colour} {shape} {where}",
    "{where}: a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a {size} {shape} coloured {colour} {where}",
    "one {colour} {shape}",
    "a drawing of a {size} {colour} {shape}",
    "the {shape} is {colour} and {size}",
    "{colour} {shape} {where}",
]
_WHERE = {"left": ["on the left", "at the left side", "to the left"],
          "right": ["on the right", "at the right side", "to the right"],
          "top": ["at the top", "near the top", "in the upper part"],
          "bottom": ["at the bottom", "near the bottom", "in the lower part"],
          "center": ["in the middle", "in the center", "centered"]}


def attributes(seed: int, index: int, exclude_pairs=(), only_pairs=None) -> dict:
    """The attributes of sample ``index`` (rejection-sampled so excluded pairs never appear)."""
    rng = random.Random(f"shapes-{seed}-{index}")
    while True:
        attrs = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES), "size": rng.choice(SIZES),
                 "position": rng.choice(POSITIONS)}
        pair = (attrs["colour"], attrs["shape"])
        if pair not in exclude_pairs and (only_pairs is None or pair in only_pairs):
            attrs["rng_state"] = rng.random()
            return attrs


def render(attrs: dict, size: int = 64) -> Image.Image:
    rng = random.Random(attrs["rng_state"])
    background = tuple(rng.randint(200, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = size * (rng.uniform(0.10, 0.14) if attrs["size"] == "small" else rng.uniform(0.22, 0.28))
    jitter = size * 0.06
    anchor = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
              "center": (0.5, 0.5)}[attrs["position"]]
    cx = anchor[0] * size + rng.uniform(-jitter, jitter)
    cy = anchor[1] * size + rng.uniform(-jitter, jitter)
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[attrs["colour"]])
    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "triangle":
        points = [(cx + radius * math.cos(a), cy + radius * math.sin(a))
                  for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(points, fill=colour)
    else:  # cross
        arm = radius * 0.35
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=colour)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=colour)
    return image


def caption(attrs: dict, rng: random.Random) -> str:
    where = rng.choice(_WHERE[attrs["position"]])
    return rng.choice(_TEMPLATES).format(size=attrs["size"], colour=attrs["colour"], shape=attrs["shape"], where=where)


class ShapesSource:
    """``n`` generated samples; a sample carries a rendered PIL image and one caption per template draw."""

    def __init__(self, n: int, seed: int = 0, exclude_pairs=(), only_pairs=None, image_size: int = 64):
        self.n, self.seed = n, seed
        self.exclude_pairs, self.only_pairs = tuple(exclude_pairs), only_pairs
        self.image_size = image_size

    def __len__(self) -> int:
        return self.n

    def item(self, index: int) -> tuple[Image.Image, dict]:
        attrs = attributes(self.seed, index, self.exclude_pairs, self.only_pairs)
        return render(attrs, self.image_size), attrs

    def samples(self, part: int, parts: int, epoch: int, seed: int, errors: Counter) -> Iterator[dict]:
        order = list(range(self.n))
        random.Random(f"order-{seed}-{epoch}").shuffle(order)
        for index in order[part::parts]:
            image, attrs = self.item(index)
            # several captions, one drawn per use by the pipeline (as multi-line txt in img2dataset shards)
            rng = random.Random(f"captions-{self.seed}-{index}")
            text = "\n".join(caption(attrs, rng) for _ in range(5))
            yield {"__key__": f"shape-{index:07d}", "image": image, "txt": text.encode()}
