"""Image-caption selection (CLIP_benchmark's ``image_caption_selection``; SugarCrepe, ARO, Winoground): each
instance holds images and captions, image i described by caption i, and the model must match them: for one image
(SugarCrepe), score its true caption above hard negatives (the same words swapped, an attribute or an object
replaced); for two images and two captions (Winoground), pick the right caption for each image and the right image
for each caption. A model that reads captions as bags of words cannot tell a swap from the truth.

Sets: a JSON file in SugarCrepe's layout, ``{id: {"filename": ..., "caption": ..., "negative_caption": ...}}`` (or
``"negative_captions": [...]`` for several), or a JSON-lines file in Winoground's, one ``{"image_0": ..., "image_1":
..., "caption_0": ..., "caption_1": ...}`` per line (image names without a suffix are looked for as .png, then .jpg).
Images are relative to ``images`` (default the file's folder), absolute, or samples of a tar shard as collections name
them (``SHARD.tar:KEY``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..preprocess import BadImageError, image_batch


def _image_place(name: str, root: Path) -> str:
    if ".tar:" in name or Path(name).is_absolute():
        return name
    if not Path(name).suffix:  # Winoground names its images without one
        for suffix in (".png", ".jpg"):
            if (root / f"{name}{suffix}").exists():
                return str(root / f"{name}{suffix}")
    return str(root / name)


def load_selection_set(path: str | Path, images: str | Path | None = None) -> list[tuple[list[str], list[str]]]:
    """``([image places], [captions])`` per instance, caption i describing image i (for one image: the true caption,
    then the negatives), from a SugarCrepe-style JSON file or a Winoground-style JSON-lines file."""
    path = Path(path)
    if not path.is_file() or path.suffix not in (".json", ".jsonl"):
        raise FileNotFoundError(f"{path}: expected a JSON file of samples with filename, caption and "
                                "negative_caption (SugarCrepe's layout), or a .jsonl file of image_0, image_1, "
                                "caption_0, caption_1 (Winoground's)")
    try:
        text = path.read_text(encoding="utf-8")
        data = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not {'JSON lines' if path.suffix == '.jsonl' else 'JSON'} ({exc})") from None
    records = list(data.values()) if isinstance(data, dict) else data
    root = Path(images) if images is not None else path.parent
    samples = []
    for number, record in enumerate(records):
        record = record if isinstance(record, dict) else {}
        if "image_0" in record:  # Winoground: image i with caption i
            count = sum(1 for i in range(len(record)) if f"image_{i}" in record)
            captions = [record.get(f"caption_{i}") for i in range(count)]
            if count < 2 or not all(captions):
                raise ValueError(f"{path}: instance {number} needs image_0, image_1, ... and a caption_i for each")
            samples.append(([_image_place(str(record[f"image_{i}"]), root) for i in range(count)],
                            list(map(str, captions))))
            continue
        single = record.get("negative_caption")
        negatives = record.get("negative_captions") or ([single] if single else [])
        if not negatives or not record.get("filename") or not record.get("caption"):
            raise ValueError(f"{path}: sample {number} needs filename, caption and negative_caption(s), got "
                             f"{sorted(record) or 'none of them'}")
        samples.append(([_image_place(str(record["filename"]), root)], [str(record["caption"]), *map(str, negatives)]))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


@torch.no_grad()
def caption_selection(model, preprocess, tokenizer, samples: list[tuple[list[str], list[str]]],
                      batch_size: int = 256, device="cpu", progress: bool = False) -> dict:
    """CLIP_benchmark's metrics: ``text_acc``, the share of instances where every image's highest-scoring caption is
    its own; ``image_acc``, where every caption's highest-scoring image is its own; ``acc``, both (for one image,
    ``text_acc`` alone: the true caption above the negatives). A tie counts for the right one (CLIP_benchmark's
    arg-max, the first of equals); ``ties``: instances with such a tie on the caption side (a bag-of-words reading
    scores a swap exactly as the truth). Instances with an unreadable image are skipped and counted."""
    from tqdm import tqdm

    from ..retrieval.collection import item_from_path, load_item

    right = {"text": 0, "image": 0, "both": 0}
    ties, skipped, seen = 0, 0, 0
    for start in tqdm(range(0, len(samples), batch_size), desc="caption selection", unit="batch",
                      disable=not progress):
        images, instances = [], []
        for places, captions in samples[start:start + batch_size]:
            try:
                opened = [preprocess(load_item(item_from_path(place))[0].convert("RGB")) for place in places]
            except (BadImageError, OSError, KeyError, StopIteration):
                skipped += 1
                continue
            instances.append((len(images), len(opened), captions))
            images += opened
        if not images:
            continue
        image_features = model.encode_image(image_batch(images, device), normalize=True).float()
        # each distinct text embedded once: a negative that reads as its true caption scores exactly as it does
        texts = list(dict.fromkeys(caption for _, _, captions in instances for caption in captions))
        text_features = model.encode_text(tokenizer(texts).to(device), normalize=True).float()
        place = {text: i for i, text in enumerate(texts)}
        all_scores = image_features @ text_features.T
        for first, count, captions in instances:
            scores = all_scores[first:first + count][:, [place[c] for c in captions]]  # [images, captions]
            pairs = torch.arange(min(scores.shape))
            text_ok = bool((scores.argmax(dim=1)[pairs] == pairs).all())
            image_ok = bool((scores.argmax(dim=0)[pairs] == pairs).all())
            others = scores[pairs].clone()
            others[pairs, pairs] = -float("inf")
            ties += int(bool((scores[pairs, pairs] == others.max(dim=1).values).any()))
            right["text"] += text_ok
            right["image"] += image_ok
            right["both"] += text_ok and image_ok
            seen += 1
    if not seen:
        raise ValueError(f"no instance with readable images among the {len(samples)} ({skipped} unreadable)")
    return {"acc": right["both"] / seen, "text_acc": right["text"] / seen, "image_acc": right["image"] / seen,
            "ties": ties, "n_samples": seen, "skipped": skipped}
