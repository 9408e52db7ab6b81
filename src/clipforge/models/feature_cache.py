"""Features of a frozen text tower, computed once per distinct caption.

A locked text tower maps the same tokens to the same features every time, and a small dataset seen for many epochs
repeats its captions: ``FeatureCache.fill`` computes every caption of the training data once, in a fixed order of
fixed batches, so the cached values are a function of the data alone and a resumed run gets bit-identical ones.
Rows that were not filled in (validation captions, say) are computed with their batch, exactly as without a cache,
and then kept (up to ``max_entries``): training validates on the same captions in the same batches each time, so
later validations read what the first computed (a resumed run computes them again in those batches: the same values).
"""
from __future__ import annotations

from typing import Callable

import torch


class FeatureCache:
    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor], max_entries: int = 2_000_000):
        self.compute, self.max_entries = compute, max_entries
        self.table: dict[bytes, torch.Tensor] = {}

    @classmethod
    def computing(cls, shared: "FeatureCache | None", compute: Callable[[torch.Tensor], torch.Tensor]) -> "FeatureCache":
        """A new cache computing with ``compute``, or ``shared`` (its table kept) computing with it from now on: a
        tower with the same frozen weights (``fingerprint``) takes over another's cache."""
        if shared is None:
            return cls(compute)
        shared.compute = compute
        return shared

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

    def save(self, path, fingerprint: str) -> None:
        """Write the table (token rows and their features) with ``fingerprint`` (what computed them), atomically."""
        from safetensors.torch import save_file

        from ..files import atomic_path

        rows = torch.stack([torch.frombuffer(bytearray(key), dtype=torch.int64) for key in self.table]).int() \
            if self.table else torch.zeros(0, 0, dtype=torch.int32)  # token ids: int32 holds every vocabulary
        features = torch.stack(list(self.table.values())) if self.table else torch.zeros(0, 0)
        with atomic_path(path) as tmp:
            save_file({"rows": rows, "features": features}, str(tmp), metadata={"fingerprint": fingerprint})

    def load(self, path, fingerprint: str) -> bool:
        """Read a table ``save`` wrote with the same ``fingerprint``; False (nothing read) for another fingerprint,
        or no file, or one that cannot be read."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as saved:
                if (saved.metadata() or {}).get("fingerprint") != fingerprint:
                    return False
                rows, features = saved.get_tensor("rows"), saved.get_tensor("features")
        except (OSError, SafetensorError):
            return False
        self.table.update(zip(self._keys(rows), features))
        return True

    @staticmethod
    def fingerprint(tower: torch.nn.Module, tokens: torch.Tensor | None = None) -> str:
        """What cached features are a function of: the tower's frozen weights (and a fill's token rows), by value."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in [*tower.named_parameters(), *tower.named_buffers()]:
            if not tensor.requires_grad:  # a locked Hugging Face tower's projection trains: not part of the cache
                digest.update(name.encode() + str(tensor.dtype).encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        if tokens is not None:
            digest.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self._keys(tokens)
        missing = [i for i, key in enumerate(keys) if key not in self.table]
        computed = list(self.compute(tokens[missing]).float().cpu()) if missing else []
        rows = [self.table.get(key) for key in keys]
        for i, features in zip(missing, computed):
            rows[i] = features
            if len(self.table) < self.max_entries:
                self.table.setdefault(keys[i], features)
        return torch.stack(rows).to(tokens.device)


def fill_kept(cache: FeatureCache, tower: torch.nn.Module, tokens: torch.Tensor, kept, write: bool = True,
              progress: bool = False) -> str:
    """``cache.fill(tokens)``, unless the table is kept already: at ``kept`` (a run's folder: its resume), else in
    ``$CLIPFORGE_CACHE/text-features`` under the fingerprint of ``tower``'s frozen weights and ``tokens`` (another run
    on the same captions with the same frozen tower). ``write``: keep what was filled (or read from the shared cache)
    at ``kept`` and in the shared cache (one process of a distributed run writes). Returns where the table came
    from: "kept", "shared" or "computed"."""
    import sys
    from pathlib import Path

    from ..files import link_or_copy
    from ..pretrained import cache_dir

    fingerprint = cache.fingerprint(tower, tokens)
    kept, shared = Path(kept), cache_dir() / "text-features" / f"{fingerprint[:32]}.safetensors"
    if cache.load(kept, fingerprint):
        return "kept"
    if cache.load(shared, fingerprint):
        if write:
            link_or_copy(shared, kept)
        return "shared"
    cache.fill(tokens, progress=progress)
    if write:
        cache.save(kept, fingerprint)
        try:
            link_or_copy(kept, shared)
        except OSError as exc:  # a read-only cache costs the next run the fill, not this run
            print(f"warning: text features not kept in the cache ({exc}); {kept} has them", file=sys.stderr)
    return "computed"
