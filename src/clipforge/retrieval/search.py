"""Query an embedded, indexed collection by text or by image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .embed import load_metadata
from .index import load_index


class Searcher:
    """``Searcher(folder, model, preprocess, tokenizer)``: top-k of the collection for a text or an image."""

    def __init__(self, folder: str | Path, model, preprocess, tokenizer):
        self.folder = Path(folder)
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.index, self.info = load_index(self.folder)
        self.rows = load_metadata(self.folder)
        if len(self.rows) != self.index.ntotal:
            raise ValueError(f"{self.folder}: index holds {self.index.ntotal} vectors but the metadata "
                             f"{len(self.rows)} rows; rebuild the index")
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu().numpy()

    @torch.no_grad()
    def embed_images(self, images) -> np.ndarray:
        batch = torch.stack([self.preprocess(i) for i in images]).to(self.device)
        return self.model.encode_image(batch, normalize=True).float().cpu().numpy()

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[dict]]:
        k = max(1, min(k, self.index.ntotal))
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return [[{"id": int(i), "score": float(s), **self.rows[i]} for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def search_text(self, text: str, k: int = 10) -> list[dict]:
        return self.search_vectors(self.embed_texts([text]), k)[0]

    def search_image(self, image, k: int = 10) -> list[dict]:
        return self.search_vectors(self.embed_images([image]), k)[0]


def model_spec(folder: str | Path) -> dict:
    """The --model/--pretrained that embedded this collection (recorded by ``clipforge embed``)."""
    info = Path(folder) / "embed_info.json"
    return json.loads(info.read_text()).get("model_spec", {}) if info.exists() else {}
