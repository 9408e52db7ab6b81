"""Features of a frozen text tower, computed once per distinct caption.

A locked text tower maps the same tokens to the same features every time, and a small dataset seen for many epochs
repeats its captions: ``FeatureCache.fill`` computes every caption of the training data once, in a fixed order of
fixed batches, so the cached values are a function of the data alone and a resumed run gets bit-identical ones.
Rows that were not filled in (validation captions, say) are computed with their batch and not kept, exactly as
without a cache.
"""
from __future__ import annotations

from typing import Callable

import torch


class FeatureCache:
    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor], max_entries: int = 2_000_000):
        self.compute, self.max_entries = compute, max_entries
        self.table: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.table)

    @staticmethod
    def _keys(tokens: torch.Tensor) -> list[bytes]:
        rows = tokens.detach().to("cpu", torch.int64).numpy()
        return [row.tobytes() for row in rows]

    @torch.no_grad()
    def fill(self, tokens: torch.Tensor, batch_size: int = 256, progress: bool = False) -> None:
        """Compute and keep the features of every distinct row of ``tokens``, in a fixed order of fixed batches:
        sorted by length (rows of a batch then need little padding), then by value."""
        from tqdm import tqdm

        keys = self._keys(tokens)
        lengths = tokens.ne(0).sum(dim=1).tolist()
        first = {k: i for i, k in enumerate(keys)}  # one row per distinct key
        unique = sorted(first.items(), key=lambda item: (lengths[item[1]], item[0]))
        unique = [(k, i) for k, i in unique if k not in self.table][: max(0, self.max_entries - len(self.table))]
        starts = range(0, len(unique), batch_size)
        for start in tqdm(starts, desc=f"caching text features of {len(unique)} captions", unit="batch",
                          disable=not progress, leave=False):
            chunk = unique[start:start + batch_size]
            features = self.compute(tokens[[i for _, i in chunk]]).float().cpu()
            self.table.update(zip((k for k, _ in chunk), features))

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self._keys(tokens)
        missing = [i for i, key in enumerate(keys) if key not in self.table]
        computed = iter(self.compute(tokens[missing]).float().cpu()) if missing else iter(())
        rows = [self.table[key] if key in self.table else next(computed) for key in keys]
        return torch.stack(rows).to(tokens.device)
