"""Input checks shared by the towers: a wrong shape or dtype gets an error that names it, not a matmul failure; and
``by_length``, how the text towers skip padding on CPU."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch


def check_image_batch(images: torch.Tensor, image_size: int | None) -> None:
    """``image_size``: the square size the batch must have (None: any)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
    if image_size is not None and images.shape[-2:] != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {images.shape[-2]}x{images.shape[-1]}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images (what the model's preprocess returns), got {images.dtype}")


def batch_input(value, method: str):
    """``value`` as a tower takes it (a tensor; a NaFlex image batch is a dict of them), or a TypeError saying what
    ``method`` wants: text or a PIL image passed where ids or pixels go is the usual first mistake."""
    if isinstance(value, (torch.Tensor, Mapping)):  # transformers' BatchFeature is a Mapping, not a dict
        return value
    if method == "encode_text":
        raise TypeError(f"encode_text takes token ids [N, context_length] from the model's tokenizer, not a "
                        f"{type(value).__name__}: model.encode_text(tokenizer(texts)), with tokenizer = "
                        "clipforge.get_tokenizer(the model's name or checkpoint)")
    raise TypeError(f"encode_image takes a batch of preprocessed images [N, 3, H, W], not a {type(value).__name__}: "
                    "preprocess(image).unsqueeze(0), or torch.stack([preprocess(im) for im in images])")


def checked_images(images, width: int, dtype: torch.dtype):
    """``(images, empty)`` for an image tower's ``encode_image``: the batch as the tower takes it (type and, for a
    tensor, shape checked), and ``[0, width]`` features of ``dtype`` where it is empty (else None)."""
    images = batch_input(images, "encode_image")
    if not isinstance(images, torch.Tensor):  # a NaFlex batch: its tower checks it
        return images, None
    check_image_batch(images, None)
    return images, empty_features(images, width, dtype)


def empty_features(value, width: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``[0, width]`` features for an empty batch (of a shape already checked), None for any other: the towers'
    attention reshapes cannot infer a size from zero elements, and a filtered batch can be empty."""
    if isinstance(value, torch.Tensor) and value.shape[0] == 0:
        return torch.zeros(0, width, dtype=dtype, device=value.device)
    return None


def check_token_batch(tokens: torch.Tensor, context_length: int) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"expected tokens of shape [N, context_length], got {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"expected integer token ids (what the tokenizer returns), got {tokens.dtype}")
    if tokens.shape[1] > context_length:
        raise ValueError(f"token sequences of length {tokens.shape[1]} exceed context_length {context_length}")


def by_length(lengths: list[int], run: Callable[[torch.Tensor | None, int], torch.Tensor]) -> torch.Tensor:
    """A text tower's rows run by length, for a tower where nothing past a row's ``lengths[i]`` tokens can change its
    pooled features (padding under a causal mask, or masked out): ``run(rows, width)`` computes rows ``rows`` (None:
    every row) over their first ``width`` tokens. The rows are sorted by length into 1, 2 or 4 groups (under 16
    rows, 16 to 63, 64 and more: fewer, larger groups keep the matrix products efficient), each run only as wide as
    its longest row, and the results put back in the batch's order; as one group where that would save under a
    tenth of the tokens (rows of nearly one length). On Flickr8k captions at batches of 256 (a mean of 14 tokens,
    at most 32) MiniLM embeds them 1.8x faster than cut at the longest (``benchmarks/text_padding.py``)."""
    n_groups = 1 if len(lengths) < 16 else 4 if len(lengths) >= 64 else 2
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    bounds = [round(i * len(order) / n_groups) for i in range(n_groups + 1)]
    grouped = sum((stop - start) * lengths[order[stop - 1]] for start, stop in zip(bounds[:-1], bounds[1:]))
    if n_groups == 1 or grouped > 0.9 * len(lengths) * max(lengths):
        return run(None, max(lengths))
    parts, index = [], []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        rows = torch.tensor(order[start:stop])
        parts.append(run(rows, lengths[order[stop - 1]]))
        index.append(rows)
    out = torch.empty(len(lengths), *parts[0].shape[1:], dtype=parts[0].dtype, device=parts[0].device)
    return out.index_copy(0, torch.cat(index).to(out.device), torch.cat(parts))
