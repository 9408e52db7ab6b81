"""Embedding whole labelled or captioned datasets for evaluation, in batches, with a progress bar."""
from __future__ import annotations

import random
import sys
from collections import Counter

import torch
from tqdm import tqdm

from ..data.pipeline import SkipSample, decode_sample
from ..preprocess import image_batch


@torch.no_grad()
def embed_images(model, images: list, preprocess, batch_size: int = 64, normalize: bool = False) -> torch.Tensor:
    """Image features ``[N, embed_dim]`` of PIL images, as the tower outputs them (or L2-normalised)."""
    device = next(model.parameters()).device
    chunks = []
    for i in range(0, len(images), batch_size):
        batch = image_batch([preprocess(image) for image in images[i:i + batch_size]], device)
        chunks.append(model.encode_image(batch, normalize=normalize).float().cpu())
    if not chunks:
        raise ValueError("no images to embed")
    return torch.cat(chunks)


def expected_samples(source, limit: int | None = None) -> int | None:
    """How many samples a progress bar over ``source`` counts to: its own count where it gives one without decoding
    (local shards' tar headers, listed files), at most ``limit``; else ``limit`` (remote shards)."""
    try:
        count = len(source)
    except (TypeError, ValueError, OSError):
        return limit
    return min(count, limit) if limit else count


@torch.no_grad()
def embed_labelled(model, source, preprocess, batch_size: int = 256, device=None, progress: bool = True,
                   desc: str = "embedding images", limit: int | None = None, image_transform=None,
                   normalize: bool = True):
    """(L2-normalised image features [N, D], labels [N]) for every sample of a labelled source (image + cls), or its
    first ``limit``. ``image_transform(image, index)`` changes each decoded image before preprocessing (corruptions).
    ``normalize=False``: the embeddings as ``encode_image`` gives them (what an image tower's own head reads)."""
    device = device or next(model.parameters()).device
    features, labels, batch, batch_labels, skipped, unreadable = [], [], [], [], Counter(), []

    def flush():
        if batch:
            features.append(model.encode_image(image_batch(batch, device), normalize=normalize).float().cpu())
            labels.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

    bar = tqdm(desc=desc, unit="img", disable=not progress, leave=False,
               total=expected_samples(source, limit) if progress else limit)
    kept = 0
    for raw in source.samples(0, 1, 0, 0, skipped):
        if limit and kept >= limit:
            break
        if "cls" not in raw:
            skipped["no_label"] += 1
            bar.update(1)
            continue
        try:
            image, _ = decode_sample(dict(raw, txt=b"-"), rng=random.Random(0))
        except SkipSample as skip:
            skipped["corrupt_image"] += 1
            if len(unreadable) < 10:
                unreadable.append(skip.detail or f"{raw.get('__key__')}: {skip.reason}")
            bar.update(1)
            continue
        if image_transform is not None:
            image = image_transform(image, kept)
        kept += 1
        batch.append(preprocess(image))
        batch_labels.append(int(raw["cls"]))
        if len(batch) == batch_size:
            flush()
        bar.update(1)
    flush()
    bar.close()
    if not features:
        raise ValueError(f"no usable labelled samples (skipped: {dict(skipped) or 'none'}){_listed(unreadable)}")
    warn_skipped(desc, skipped, unreadable)
    return torch.cat(features), torch.tensor(labels)


def warn_skipped(what: str, skipped: Counter, examples: list[str] = ()) -> None:
    """Say on stderr how many samples an evaluation passed over, by reason, with ``examples`` (each naming its
    sample): its figures are over fewer images than the split holds."""
    if skipped:
        n = sum(skipped.values())
        print(f"warning: {what}: {n} sample{'s' if n > 1 else ''} skipped ("
              + ", ".join(f"{reason} {count}" for reason, count in skipped.most_common()) + ")"
              + _listed(examples), file=sys.stderr)


def _listed(examples) -> str:
    """``examples`` one per indented line, after a message."""
    return "".join(f"\n  {example}" for example in examples)
