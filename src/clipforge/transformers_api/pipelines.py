"""transformers' ``pipeline("zero-shot-image-classification")``."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from PIL import Image

from ..preprocess import Decoding, _upright, open_image
from .modeling import AutoModel, CLIPModel, SiglipModel
from .processing import CLIPProcessor


class ZeroShotImageClassificationPipeline:
    """transformers' ``pipeline("zero-shot-image-classification")``: ``classifier(image, candidate_labels=[...])``
    gives ``[{"score", "label"}, ...]`` best first (a list of those for a list of images), each label's softmax
    probability over ``hypothesis_template`` filled with the labels (a SigLIP model's: each label's sigmoid). The
    labels' features are computed once for all the images (transformers' runs them again for each image)."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor):
        self.model, self.processor = model, processor

    def __call__(self, image, candidate_labels: list[str] | None = None,
                 hypothesis_template: str = "This is a photo of {}.", timeout: float | None = None,
                 tokenizer_kwargs: dict | None = None):
        """``image``: a PIL image, a path, an http(s) URL, or a list of them; turned upright as its EXIF says."""
        if not candidate_labels or isinstance(candidate_labels, str):
            raise ValueError("candidate_labels: give a list of one or more labels")
        single = not isinstance(image, (list, tuple))
        images = [_load_image(i, timeout) for i in ([image] if single else image)]
        texts = [hypothesis_template.format(label) for label in candidate_labels]
        model = self.model
        siglip = isinstance(model, SiglipModel)  # as trained: padded to 64 tokens, each label's own sigmoid
        padding = {"padding": "max_length", "max_length": 64, "truncation": True} if siglip else {"padding": True}
        tokens = self.processor.tokenizer(texts, return_tensors="pt", **{**padding, **(tokenizer_kwargs or {})})
        pixels = self.processor.image_processor(images, return_tensors="pt")  # Siglip2's: patches, mask, shapes
        with torch.no_grad():
            text = F.normalize(model.get_text_features(**tokens.to(model.device)), dim=-1)
            pictures = F.normalize(model.get_image_features(**pixels.to(model.device)), dim=-1)
            logits = model.logit_scale.exp() * pictures @ text.t()
            probs = (logits + model.clip.logit_bias).sigmoid() if siglip else logits.softmax(dim=-1)
            probs = probs.float().cpu()
        results = [[{"score": score, "label": label}
                    for score, label in sorted(zip(row.tolist(), candidate_labels), key=lambda pair: -pair[0])]
                   for row in probs]
        return results[0] if single else results


def _load_image(image, timeout: float | None) -> Image.Image:
    """transformers' ``load_image``: a PIL image, a path or an http(s) URL, upright as its EXIF orientation says."""
    if isinstance(image, Image.Image):
        return _upright(image)[0]
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(image, timeout=timeout) as response:
            return open_image(response.read(), name=image, decoding=Decoding(upright=True))
    if isinstance(image, (str, os.PathLike)):
        return open_image(os.fspath(image), decoding=Decoding(upright=True))
    raise TypeError(f"expected a PIL image, a path or an http(s) URL; got {type(image).__name__}")


def pipeline(task: str, model: str | os.PathLike | CLIPModel, processor: CLIPProcessor | str | None = None,
             device=None, dtype=None, torch_dtype=None, **kwargs) -> ZeroShotImageClassificationPipeline:
    """transformers' ``pipeline`` for ``"zero-shot-image-classification"`` over a CLIP or SigLIP folder or hub repo
    (or a ``CLIPModel`` / ``SiglipModel`` with its ``processor``). ``device``: a device, or a GPU's index (-1: the
    CPU)."""
    if task != "zero-shot-image-classification":
        raise ValueError(f"pipeline {task!r}: only 'zero-shot-image-classification' is built here")
    if kwargs:
        raise TypeError(f"pipeline: {', '.join(sorted(kwargs))} not built here")
    if isinstance(device, int):
        device = "cpu" if device < 0 else f"cuda:{device}"
    if isinstance(model, CLIPModel):
        if processor is None:
            raise ValueError("pipeline: a CLIPModel instance needs its processor (processor=...)")
        if device is not None:
            model = model.to(device)
    else:
        processor = processor or model
        model = AutoModel.from_pretrained(model, dtype=dtype, torch_dtype=torch_dtype, device_map=device)
    if not isinstance(processor, CLIPProcessor):
        processor = CLIPProcessor.from_pretrained(processor)
    return ZeroShotImageClassificationPipeline(model.eval(), processor)
