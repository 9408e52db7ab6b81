"""The captions the bench tokenizes and trains on: human captions from the data folder where it is given
(``--data``: coco-mini's 395), completed with CIFAR-10 label captions from the caption grammar."""
from __future__ import annotations

import random
import tarfile
from pathlib import Path

from ..data.captions import label_caption

CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def shard_captions(shards: list[Path], n: int | None = None) -> list[str]:
    """Every caption line of the shards' ``.txt`` members, in order (the first ``n``)."""
    captions = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    text = tar.extractfile(member).read().decode()
                    captions += [line.strip() for line in text.splitlines() if line.strip()]
                    if n is not None and len(captions) >= n:
                        return captions[:n]
    return captions


def coco_captions(data: str | Path | None) -> list[str]:
    """coco-mini's human captions, or [] when the data folder is not given or lacks coco-mini."""
    shard = Path(data) / "coco-mini" / "test" / "test-000000.tar" if data else None
    return shard_captions([shard]) if shard is not None and shard.exists() else []


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


def flickr8k_captions(data: str | Path | None, n: int = 30_000) -> list[str]:
    """Flickr8k's human training captions (the first ``n``, in shard order), or [] without the data set."""
    return shard_captions(sorted((Path(data) / "flickr8k" / "train").glob("*.tar")) if data else [], n)


# What web alt-text carries that human captions do not: each kind is one function of a random generator and a
# clean caption. Mojibake is UTF-8 read as cp1252 or Latin-1 (what ftfy exists to undo).
_EMOJI = ["😀", "🐶", "🌊", "❤️", "👍🏽", "🎉", "🇫🇷", "☀"]
_ACCENTED = ["café", "naïve", "Zürich", "São Paulo", "crème brûlée", "Ångström", "jalapeño", "façade"]
_ENTITIES = ["&amp;", "&quot;", "&#39;", "&lt;3", "&nbsp;", "&eacute;", "&#x1F600;", "&amp;amp;"]
_CONTROL = ["\x00", "\x07", "\x1b[31m", "\u200b", "\ufeff", "\r\n", "\t", "\x85"]
_CJK = ["東京", "猫", "서울", "Москва", "Αθήνα", "القاهرة", "ｆｕｌｌｗｉｄｔｈ", "ﬁne"]


def _mojibake(text: str, rng: random.Random) -> str:
    encoding = rng.choice(["cp1252", "latin-1"])
    try:
        return text.encode("utf-8").decode(encoding)
    except UnicodeDecodeError:
        return text


def noisy_captions(data: str | Path | None, n: int = 5_000, seed: int = 0) -> list[str]:
    """Web-style strings made from the tokenizer captions: emoji, accents, HTML entities, mojibake, control and
    zero-width characters, other scripts, curly quotes, shouting and very long lines, deterministic for ``seed``."""
    rng = random.Random(seed)
    base = distinct_captions(data, n, seed)
    out = []
    for caption in base:
        words = caption.split()
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(8)
            at = rng.randint(0, len(words))
            if kind == 0:
                words.insert(at, rng.choice(_EMOJI))
            elif kind == 1:
                words.insert(at, rng.choice(_ACCENTED))
            elif kind == 2:
                words.insert(at, rng.choice(_ENTITIES))
            elif kind == 3:
                words.insert(at, rng.choice(_CONTROL))
            elif kind == 4:
                words.insert(at, rng.choice(_CJK))
            elif kind == 5:
                words.insert(at, f"\u201c{rng.choice(_ACCENTED)}\u201d")
            elif kind == 6 and words:
                words[at % len(words)] = words[at % len(words)].upper()
            elif len(words) < 100:
                words = words * rng.randint(5, 20)  # a very long line (once: alt-text runs long, not unbounded)
        text = " ".join(words)
        out.append(_mojibake(text, rng) if rng.random() < 0.15 else text)
    return out
