"""OpenAI's ``clip`` package (github.com/openai/CLIP) answered by clipforge: a script that does
``import clipforge.openai_clip as clip`` in place of ``import clip`` gets the same models, preprocessing, tokens and
logits from ``clip.load``, ``clip.tokenize`` and ``clip.available_models``.

The model ``load`` returns is a clipforge ``CLIP`` whose ``forward(image, text)`` gives OpenAI's ``(logits_per_image,
logits_per_text)`` (the temperature unclamped, as OpenAI's), with OpenAI's ``dtype``, ``visual.input_resolution`` and
``vocab_size``; on a GPU its weights are fp16, as OpenAI's. TorchScript (``jit=True``) is not built here."""
from __future__ import annotations

import os

import torch

from .models.clip import CLIP

# OpenAI's names, and the zoo architecture each is (the "openai" tag holds its weights)
_MODELS = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
           "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336"}


def available_models() -> list[str]:
    """The names ``load`` takes besides a checkpoint file."""
    return list(_MODELS)


class OpenAICLIP(CLIP):
    """A clipforge ``CLIP`` answering as OpenAI's ``model.CLIP`` does; the same weights and state dict."""

    @classmethod
    def adopt(cls, model: CLIP) -> "OpenAICLIP":
        """``model`` itself, answering as OpenAI's (no copy of the weights is made)."""
        if type(model) is not CLIP:
            raise ValueError(f"OpenAI's CLIP API takes a CLIP model, not a {type(model).__name__}")
        model.__class__ = cls
        model.visual.input_resolution = model.image_size
        return model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return self.text.token_embedding.num_embeddings

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image [N, M], logits_per_text [M, N])``: the scaled cosine similarities."""
        logits_per_image = self.logit_scale.exp() * self.encode_image(image, normalize=True) \
            @ self.encode_text(text, normalize=True).t()
        return logits_per_image, logits_per_image.t()


def load(name: str, device: str | torch.device = "cuda" if torch.cuda.is_available() else "cpu", jit: bool = False,
         download_root: str | None = None):
    """``(model, preprocess)`` as OpenAI's ``clip.load``: ``name`` one of ``available_models()`` (OpenAI's weights,
    downloaded into ``download_root`` or clipforge's cache, checked) or a checkpoint file: OpenAI's TorchScript
    archive or a state dict (``.pt``, ``.bin``), built with QuickGELU as OpenAI's code builds any file, or a
    safetensors file ``clipforge.load`` reads, with its own settings. The model is in eval mode, fp32 on CPU and fp16
    elsewhere (all of it: OpenAI's keeps LayerNorm, embeddings and batch norm in fp32, and its fp16 features are no
    closer to fp32's than these, tests/test_openai_clip_api.py)."""
    from . import load_model
    from .preprocess import Preprocess
    from .pretrained import cache_at

    if jit:
        raise ValueError("jit=True (OpenAI's TorchScript model) is not built here: load with jit=False, the "
                         "default; torch.compile(model) compiles it")
    with cache_at(download_root):
        if name in _MODELS:
            model = load_model(_MODELS[name], "openai")
        elif os.path.isfile(name):  # OpenAI's code builds any file with QuickGELU; a safetensors file says its own
            model = load_model(name, quick_gelu=None if name.endswith(".safetensors") else True)
        else:
            raise RuntimeError(f"Model {name} not found; available models = {available_models()}")
    model = OpenAICLIP.adopt(model).to(device)
    if str(device) != "cpu":
        model.half()
    return model, Preprocess(model.image_size, **model.normalisation)


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False) -> torch.IntTensor:
    """OpenAI's ``clip.tokenize``: int32 ids ``[N, context_length]``; a text longer than ``context_length`` tokens is
    an error unless ``truncate``, which keeps the first ones and ends with end-of-text."""
    from .tokenizer import get_tokenizer

    texts = [texts] if isinstance(texts, str) else texts
    tokenizer = get_tokenizer(context_length=context_length + 1)  # one more position: a long text fills it
    ids = tokenizer(texts)
    too_long = ids[:, -1] != 0
    if too_long.any() and not truncate:
        raise RuntimeError(f"Input {texts[int(too_long.nonzero()[0])]} is too long for context length "
                           f"{context_length}")
    ids = ids[:, :context_length]
    ids[too_long, -1] = tokenizer.eot_token_id  # OpenAI's truncation: the first tokens, then end-of-text
    return ids.int()
