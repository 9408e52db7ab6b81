"""Image-text retrieval recall@k with any number of captions per image (as CLIP_benchmark computes it)."""
from __future__ import annotations

from collections import Counter

import torch
from tqdm import tqdm

from ..preprocess import image_batch


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks=(1, 5, 10), positives: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@k both ways from L2-normalised features.

    ``text_to_image[t]`` is the index of the image caption ``t`` describes. text->image: a caption scores a hit when
    its image is among the top k. image->text: an image scores a hit when any of its captions is among the top k.
    ``positives`` ([texts, images] bool) replaces that pairing, e.g. with "same class" for captions made from labels.
    """
    if image_features.shape[0] == 0 or text_features.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    scores = text_features.float() @ image_features.float().T  # [texts, images]
    if positives is None:
        text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
        positives = torch.zeros_like(scores, dtype=torch.bool)
        positives[torch.arange(len(text_to_image)), text_to_image] = True
    elif positives.shape != scores.shape:
        raise ValueError(f"positives has shape {tuple(positives.shape)}, expected {tuple(scores.shape)}")
    metrics = {}
    for k in ks:
        k_images, k_texts = min(k, scores.shape[1]), min(k, scores.shape[0])
        top_images = scores.topk(k_images, dim=1).indices  # [texts, k]
        metrics[f"text_to_image_R@{k}"] = positives.gather(1, top_images).any(dim=1).float().mean().item()
        top_texts = scores.T.topk(k_texts, dim=1).indices  # [images, k]
        metrics[f"image_to_text_R@{k}"] = positives.T.gather(1, top_texts).any(dim=1).float().mean().item()
    return metrics


@torch.no_grad()
def embed_pairs(model, tokenizer, images: list[torch.Tensor], texts: list[str], batch_size: int = 256,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features, in batches (``texts`` may be empty: a [0, 0] tensor for them)."""
    image_features = []
    for start in range(0, len(images), batch_size):
        batch = image_batch(images[start:start + batch_size], device)
        image_features.append(model.encode_image(batch, normalize=True).float().cpu())
    return torch.cat(image_features), caption_features(model, tokenizer, texts, batch_size, device)


@torch.no_grad()
def caption_features(model, tokenizer, texts: list[str], batch_size: int = 256, device: str | torch.device = "cpu",
                     progress: bool = False) -> torch.Tensor:
    """L2-normalised features of ``texts``, in batches ([0, 0] for none)."""
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding captions", unit="batch",
                      disable=not progress, leave=False):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


@torch.no_grad()
def embed_retrieval_set(model, tokenizer, source, preprocess, limit: int | None = None, batch_size: int = 256,
                        progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Counter]:
    """``(image features, caption features, caption_images, skipped)`` for the first ``limit`` usable samples of
    ``source`` and every caption of each (``data.pipeline.evaluation_samples``), L2-normalised; ``caption_images[t]``:
    the image caption ``t`` describes. Each batch of images is embedded as soon as it is decoded, so one batch of
    pixels is held at a time (a 5,000-image set's pixels would take 3 GB at 224 pixels)."""
    from ..data.pipeline import evaluation_samples
    from .features import expected_samples

    device = next(model.parameters()).device
    image_features, captions, owners, batch, skipped = [], [], [], [], Counter()

    def flush():
        if batch:
            image_features.append(model.encode_image(image_batch(batch, device), normalize=True).float().cpu())
            batch.clear()

    with tqdm(desc="embedding images", unit="img", disable=not progress, leave=False,
              total=expected_samples(source, limit) if progress else None) as bar:
        for index, (image, texts, _, _) in enumerate(evaluation_samples(source, limit, skipped=skipped)):
            captions += texts
            owners += [index] * len(texts)
            batch.append(preprocess(image))
            if len(batch) == batch_size:
                flush()
            bar.update(index + 1 + sum(skipped.values()) - bar.n)  # unusable samples count as read
        flush()
    if not image_features:
        return torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), skipped
    return (torch.cat(image_features), caption_features(model, tokenizer, captions, batch_size, device, progress),
            torch.tensor(owners, dtype=torch.long), skipped)
