"""Image-caption selection (CLIP_benchmark's ``image_caption_selection``; SugarCrepe, ARO and the like): for each
image the model must score its true caption above hard negatives (the same words swapped, an attribute or an object
replaced). A model that reads captions as bags of words cannot tell a swap from the truth.

A set is a JSON file in SugarCrepe's layout, ``{id: {"filename": ..., "caption": ..., "negative_caption": ...}}``
(or ``"negative_captions": [...]`` for several), the filename relative to ``images`` (default the file's folder),
absolute, or a sample of a tar shard as collections name it (``SHARD.tar:KEY``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..preprocess import BadImageError, image_batch


def load_selection_set(path: str | Path, images: str | Path | None = None) -> list[tuple[str, list[str]]]:
    """``(image location, [true caption, negatives ...])`` for each sample of a SugarCrepe-style JSON file."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".json":
        raise FileNotFoundError(f"{path}: expected a JSON file of samples with filename, caption and "
                                "negative_caption (SugarCrepe's layout)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    records = list(data.values()) if isinstance(data, dict) else data
    root = Path(images) if images is not None else path.parent
    samples = []
    for number, record in enumerate(records):
        record = record if isinstance(record, dict) else {}
        single = record.get("negative_caption")
        negatives = record.get("negative_captions") or ([single] if single else [])
        if not negatives or not record.get("filename") or not record.get("caption"):
            raise ValueError(f"{path}: sample {number} needs filename, caption and negative_caption(s), got "
                             f"{sorted(record) or 'none of them'}")
        where = str(record["filename"])
        if ".tar:" not in where and not Path(where).is_absolute():
            where = str(root / where)
        samples.append((where, [str(record["caption"]), *map(str, negatives)]))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


@torch.no_grad()
def caption_selection(model, preprocess, tokenizer, samples: list[tuple[str, list[str]]], batch_size: int = 256,
                      device="cpu", progress: bool = False) -> dict:
    """``acc``: the share of images whose true caption scores highest, a tie counting for it (CLIP_benchmark's
    rule: the arg-max of the scores, the true caption first); ``ties``: how many were such ties (a bag-of-words
    reading scores a swap exactly as the truth); unreadable images are skipped and counted."""
    from tqdm import tqdm

    from ..retrieval.collection import item_from_path, load_item

    correct, ties, skipped, seen = 0, 0, 0, 0
    for start in tqdm(range(0, len(samples), batch_size), desc="caption selection", unit="batch",
                      disable=not progress):
        images, groups = [], []
        for where, captions in samples[start:start + batch_size]:
            try:
                image, _ = load_item(item_from_path(where))
            except (BadImageError, OSError, KeyError, StopIteration):
                skipped += 1
                continue
            images.append(preprocess(image.convert("RGB")))
            groups.append(captions)
        if not images:
            continue
        image_features = model.encode_image(image_batch(images, device), normalize=True).float()
        # each distinct text embedded once: a negative that reads as its true caption scores exactly as it does
        texts = list(dict.fromkeys(caption for captions in groups for caption in captions))
        text_features = model.encode_text(tokenizer(texts).to(device), normalize=True).float()
        place = {text: i for i, text in enumerate(texts)}
        for features, captions in zip(image_features, groups):
            scores = (text_features @ features)[[place[c] for c in captions]]
            best_negative = scores[1:].max()
            correct += int(scores[0] >= best_negative)
            ties += int(scores[0] == best_negative)
            seen += 1
    if not seen:
        raise ValueError(f"no readable image among the {len(samples)} samples ({skipped} unreadable)")
    return {"acc": correct / seen, "ties": ties, "n_samples": seen, "skipped": skipped}
