"""open_clip's ``forward_intermediates`` conventions, shared by the towers that offer it: which blocks or stages
``indices`` names, a ViT's tokens as patch maps, and a convolutional tower's stages run up to the last one asked for."""
from __future__ import annotations

import torch


def take_indices(count: int, indices=None) -> tuple[list[int], int]:
    """Which of ``count`` blocks (or stages) to take outputs from, as open_clip's and timm's ``forward_intermediates``
    read ``indices``: None for all, an int n for the last n, a sequence of indices (negative ones from the end).
    Returns ``(indices from the start, the largest)``; an index out of range is a ValueError naming the range."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"the last {indices} of {count} blocks: out of range (1 to {count})")
        taken = list(range(count - indices, count))
    else:
        taken = []
        for index in indices:
            absolute = count + index if index < 0 else index
            if not 0 <= absolute < count:
                raise ValueError(f"block index {index} out of range for {count} blocks ({-count} to {count - 1})")
            taken.append(absolute)
        if not taken:
            raise ValueError("no block indices given (None takes every block)")
    return taken, max(taken)


def spatial_intermediates(intermediates: list[torch.Tensor], prefix: int, grid: tuple[int, int],
                          output_fmt: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A ViT's block outputs [N, prefix + rows * cols, width] split into ``(patch tokens, prefix tokens)``: patch
    tokens as maps [N, width, rows, cols] for ``output_fmt`` "NCHW", as they are for "NLC"."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    prefixes = [x[:, :prefix] for x in intermediates]
    patches = [x[:, prefix:] for x in intermediates]
    if output_fmt == "NCHW":
        rows, cols = grid
        if patches and patches[0].shape[1] != rows * cols:
            raise ValueError(f"{patches[0].shape[1]} patch tokens do not make a {rows}x{cols} grid (patch dropout "
                             f"in training drops some): ask for output_fmt='NLC'")
        patches = [x.reshape(x.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous() for x in patches]
    return patches, prefixes


def stage_intermediates(x: torch.Tensor, stages: list, pool, indices=None, stop_early: bool = False,
                        intermediates_only: bool = False, output_fmt: str = "NCHW") -> dict:
    """A convolutional tower's ``forward_intermediates``: its ``stages`` (each a callable map -> map) run on ``x``,
    ``{"image_intermediates": the maps of the stages ``indices`` names, in the usual contiguous NCHW layout,
    "image_features": ``pool`` of the last map (unless ``intermediates_only``)}``. ``stop_early`` runs no stage after
    the last one asked for; before the last stage only with ``intermediates_only``, since the pooling needs the last
    stage's map. Such towers have no final norm nor extra tokens to return."""
    if output_fmt != "NCHW":
        raise ValueError(f"a convolutional tower's intermediates are feature maps: output_fmt 'NCHW', not "
                         f"{output_fmt!r}")
    taken, last = take_indices(len(stages), indices)
    if stop_early and not intermediates_only and last < len(stages) - 1:
        raise ValueError("stop_early before the last stage with the embedding: the pooling needs the last stage's "
                         "map; ask for intermediates_only")
    intermediates = []
    for i, stage in enumerate(stages[: last + 1] if stop_early else stages):
        x = stage(x)
        if i in taken:
            intermediates.append(x.contiguous())  # a channels-last map (the CPU inference layout) as open_clip's
    return {"image_intermediates": intermediates} if intermediates_only else \
        {"image_intermediates": intermediates, "image_features": pool(x)}
