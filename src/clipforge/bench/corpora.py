"""The captions the bench tokenizes and trains on: human captions from the data folder where it is given
(``--data``: coco-mini's 395), completed with CIFAR-10 label captions from the caption grammar."""
from __future__ import annotations

import random
import tarfile
from pathlib import Path

from ..data.captions import label_caption

CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def coco_captions(data: str | Path | None) -> list[str]:
    """coco-mini's human captions, or [] when the data folder is not given or lacks coco-mini."""
    shard = Path(data) / "coco-mini" / "test" / "test-000000.tar" if data else None
    if shard is None or not shard.exists():
        return []
    captions = []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".txt"):
                text = tar.extractfile(member).read().decode()
                captions += [line.strip() for line in text.splitlines() if line.strip()]
    return captions


def real_captions(data: str | Path | None, n: int) -> list[str]:
    """Training captions: the human captions, then label captions from the caption grammar, ``n`` in all."""
    captions = coco_captions(data)
    rng = random.Random(0)
    while len(captions) < n:
        captions.append(label_caption(rng.choice(CIFAR10_NAMES), rng))
    return captions[:n]


def distinct_captions(data: str | Path | None, n: int = 10_000, seed: int = 0) -> list[str]:
    """Tokenizer captions: the human captions plus recombinations of their halves (first half of one, second half of
    another) up to ``n`` distinct strings, so the vocabulary is natural and no word cache gets a free ride."""
    human = coco_captions(data) or real_captions(data, 400)
    rng = random.Random(seed)
    captions, seen = list(dict.fromkeys(human)), set(human)
    while len(captions) < n:
        a, b = rng.choice(human).split(), rng.choice(human).split()
        text = " ".join(a[: len(a) // 2] + b[len(b) // 2:])
        if text not in seen:
            seen.add(text)
            captions.append(text)
    return captions[:n]
