"""Input checks shared by the towers: a wrong shape or dtype gets an error that names it, not a matmul failure."""
from __future__ import annotations

import torch


def check_image_batch(images: torch.Tensor, image_size: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
    if images.shape[-2:] != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {images.shape[-2]}x{images.shape[-1]}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images (what the model's preprocess returns), got {images.dtype}")


def check_token_batch(tokens: torch.Tensor, context_length: int) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"expected tokens of shape [N, context_length], got {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"expected integer token ids (what the tokenizer returns), got {tokens.dtype}")
    if tokens.shape[1] > context_length:
        raise ValueError(f"token sequences of length {tokens.shape[1]} exceed context_length {context_length}")
