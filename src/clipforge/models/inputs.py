"""Input checks shared by the image towers: a wrong shape gets an error that names it, not a matmul failure."""
from __future__ import annotations

import torch


def check_image_batch(images: torch.Tensor, image_size: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
    if images.shape[-2:] != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {images.shape[-2]}x{images.shape[-1]}")
