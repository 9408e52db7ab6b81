"""A model's fingerprint: its features of a few fixed synthetic images and texts, stored beside a collection.

The config and paths ``embed`` records say which architecture embedded a collection, not which weights: a checkpoint
overwritten by a longer run, or another run's checkpoint of the same architecture, looks the same there. Their
features of the same inputs do not: the same weights agree to a cosine of 0.999 or more at any precision (fp32,
bf16, fp16, ONNX Runtime), while another checkpoint's features point elsewhere. ``embed`` stores the fingerprint and
refuses to resume with weights that disagree; ``search`` and ``serve`` warn when they would query a collection with
such weights. (docs/BENCHMARKS.md, "Which weights embedded a collection", has the cosines that set the threshold.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from ..preprocess import image_batch

PROBE = "probe_emb.npz"  # in the collection's folder (retrieval.collection's layout)
SAME_WEIGHTS = 0.99  # the lowest cosine between two runs' probe features that counts as the same weights
PROBE_TEXTS = ("a photo of a dog.", "two people walking on a beach at sunset.", "a red circle on a blue background.")


def probe_images(size: int = 224) -> list:
    """Three fixed RGB images, the same on every machine: a scene-like layout (sky, ground, a disc), smooth colour
    noise from a seeded generator, and diagonal stripes."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    scene = np.where((y < 0.55)[..., None], np.stack([0.45 + 0.5 * y, 0.65 + 0.3 * y, np.ones_like(y)], -1),
                     np.stack([0.2 + 0 * y, 0.55 - 0.3 * (y - 0.55), 0.15 + 0 * y], -1))
    scene[(y - 0.55) ** 2 + (x - 0.5) ** 2 < 0.03] = (0.85, 0.1, 0.1)
    coarse = np.random.default_rng(0).random((6, 6, 3))
    noise = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)) / 255
    stripes = np.where((((x + y) * 8).astype(int) % 2 == 0)[..., None], (0.95, 0.8, 0.1), (0.05, 0.05, 0.1))
    return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in (scene, noise, stripes)]


@torch.no_grad()
def probe_features(model, preprocess, tokenizer=None, device=None) -> dict[str, np.ndarray]:
    """``{"image": [3, d], "text": [3, d]}`` (float32, L2-normalised): the model's features of ``probe_images``
    through ``preprocess`` and of ``PROBE_TEXTS`` through ``tokenizer`` (left out without one, or when the tokenizer
    cannot run: a model folder without its tokenizer files still embeds images)."""
    if device is None:  # where the weights are (an ONNX Runtime model has none: CPU)
        parameters = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
        device = next((p.device for p in parameters), torch.device("cpu"))
    images = image_batch([preprocess(image) for image in probe_images()], device)
    found = {"image": model.encode_image(images, normalize=True).float().cpu().numpy()}
    if tokenizer is not None:
        try:
            tokens = tokenizer(list(PROBE_TEXTS))
        except (OSError, ValueError):
            return found
        found["text"] = model.encode_text(tokens.to(device), normalize=True).float().cpu().numpy()
    return found


def write_probe(folder: str | Path, features: dict[str, np.ndarray]) -> None:
    with atomic_path(Path(folder) / PROBE) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **features)


def read_probe(folder: str | Path) -> dict[str, np.ndarray]:
    """The stored fingerprint; empty for a collection embedded before fingerprints were stored."""
    path = Path(folder) / PROBE
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}


def agreement(stored: dict[str, np.ndarray], current: dict[str, np.ndarray]) -> dict[str, float]:
    """The lowest cosine between stored and current features, per side both have (of the same shape)."""
    return {side: float((stored[side] * current[side]).sum(axis=1).min()) for side in ("image", "text")
            if side in stored and side in current and stored[side].shape == current[side].shape}


def disagreeing(stored: dict[str, np.ndarray], current: dict[str, np.ndarray], sides=("image", "text")) -> str | None:
    """A description of how ``current`` differs from ``stored`` on ``sides`` (None when the same weights, as far as
    the probes tell); an embedding of another width counts as disagreeing too."""
    for side in sides:
        if side in stored and side in current and stored[side].shape != current[side].shape:
            return f"{side} features of shape {current[side].shape}, stored {stored[side].shape}"
    cosines = {side: value for side, value in agreement(stored, current).items() if side in sides}
    low = {side: value for side, value in cosines.items() if value < SAME_WEIGHTS}
    if not low:
        return None
    return ", ".join(f"probe {side}s agree to cosine {value:.3f}" for side, value in low.items()) + \
        f" (the same weights agree to {SAME_WEIGHTS} or more)"


def warn_if_other_weights(folder: str | Path, model, preprocess, tokenizer) -> None:
    """A warning when ``model`` is not the one whose fingerprint the collection in ``folder`` stores: its queries
    would be compared with vectors of another embedding space."""
    stored = read_probe(folder)
    if not stored:
        return
    differs = disagreeing(stored, probe_features(model, preprocess, tokenizer))
    if differs:
        print(f"warning: this model is not the one that embedded {folder}: {differs}. Its queries will not find "
              "what they should: give the collection's own --model/--pretrained (or none, to use the recorded "
              "ones), or embed the collection again with this model", file=sys.stderr)
