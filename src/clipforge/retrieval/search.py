"""Query an embedded, indexed collection by text or by image: its images, or (modality "text") its captions."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..preprocess import image_batch
from .collection import MODALITIES, Metadata, StoredVectors, item_captions, item_from_path, read_info
from .index import index_path, load_index, load_rows, modality_vectors


DEDUP_DEPTH = 4  # with de-duplication, candidates are read this many times deeper than k
LINE_CACHE_ROWS = 4096  # rows whose caption lines' vectors a Searcher keeps (pages of results come back)


def drop_near_duplicates(vectors: np.ndarray, threshold: float) -> list[int]:
    """Positions to keep, in rank order: a result goes when its cosine similarity to a better-ranked kept one is
    ``threshold`` or more (clip-retrieval's near-duplicate removal, for collections full of re-uploads)."""
    kept: list[int] = []
    for position, vector in enumerate(vectors):
        if not kept or float(np.max(vectors[kept] @ vector)) < threshold:
            kept.append(position)
    return kept


def require_caption_index(folder: str | Path) -> None:
    """A clear error when ``folder`` has no caption index (what ``--modality text`` searches)."""
    if not index_path(folder, "text").exists():
        raise FileNotFoundError(f"{folder} has no caption index: embed the collection with --captions, then "
                                f"clipforge index build {folder}")


class Searcher:
    """``Searcher(folder, model, preprocess, tokenizer)``: top-k of the collection for a text or an image, among its
    images or (``modality="text"``, where ``index build`` made a caption index) its captions; a result is the
    collection's row either way (the image with the caption that matched).

    Served from disk: IVF-PQ codes memory-mapped (``in_memory=False``, the default), metadata through Arrow by row
    id, the re-rank and de-duplication reading the stored embeddings by id; RAM holds no per-image object."""

    def __init__(self, folder: str | Path, model, preprocess, tokenizer, in_memory: bool = False):
        self.folder = Path(folder)
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.model_lock = contextlib.nullcontext()  # a server sets its lock: one model call at a time
        self._lines: OrderedDict[int, tuple[list[str], np.ndarray]] = OrderedDict()
        self.index, self.info = load_index(self.folder, mmap=not in_memory, vectors=self.stored)
        self.rows = Metadata(self.folder)
        if len(self.rows) != self.index.ntotal:
            raise ValueError(f"{self.folder}: index holds {self.index.ntotal} vectors but the metadata "
                             f"{len(self.rows)} rows; rebuild the index")
        # modality -> (index, its vectors for de-duplication, the collection row of each position or None)
        self.indexes = {"image": (self.index, self.stored, None)}
        if index_path(self.folder, "text").exists():
            rows = load_rows(self.folder, "text")
            captions, _ = modality_vectors(self.folder, "text", rows)
            index, _ = load_index(self.folder, mmap=not in_memory, vectors=captions, modality="text")
            if index.ntotal != len(rows) or (len(rows) and rows.max() >= len(self.rows)):
                raise ValueError(f"{self.folder}: the caption index does not match the collection (rebuilt or "
                                 "re-embedded since); rebuild it: clipforge index build "
                                 f"{self.folder} --modality text")
            self.indexes["text"] = (index, captions, rows)
        self.device = next(model.parameters()).device

    @property
    def captions_indexed(self) -> int | None:
        """How many captions the caption index holds (None without one)."""
        return self.indexes["text"][0].ntotal if "text" in self.indexes else None

    def _modality(self, modality: str):
        if modality not in self.indexes:
            if modality not in MODALITIES:
                raise ValueError(f"modality {modality!r}: choose one of {', '.join(MODALITIES)}")
            require_caption_index(self.folder)
        return self.indexes[modality]

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu().numpy()

    @torch.no_grad()
    def embed_images(self, images) -> np.ndarray:
        batch = image_batch([self.preprocess(i) for i in images], self.device)
        return self.model.encode_image(batch, normalize=True).float().cpu().numpy()

    def search_vectors(self, vectors: np.ndarray, k: int = 10, dedup: float | None = None,
                       modality: str = "image", matched_lines: bool = True) -> list[list[dict]]:
        """Top-``k`` per query vector among the images or (``modality="text"``) the captions; ``dedup`` (a cosine
        similarity, e.g. 0.95) leaves out near-duplicates of better-ranked results (images, or captions), filling
        the k places from a deeper candidate list. A caption search's results show the caption line that matched
        (``with_matched_lines``) unless ``matched_lines`` is False (a caller that shows only part of them)."""
        index, stored, rows = self._modality(modality)
        k = max(1, min(k, index.ntotal))
        depth = k if dedup is None else min(index.ntotal, k * DEDUP_DEPTH)
        scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), depth)
        results = []
        for srow, irow in zip(scores, ids):
            found = [(float(s), int(i)) for s, i in zip(srow, irow) if i >= 0]
            if dedup is not None and found:
                found = [found[p] for p in drop_near_duplicates(stored.get([i for _, i in found]), dedup)]
            if rows is not None:  # the caption index's positions -> collection rows
                found = [(s, int(rows[i])) for s, i in found]
            results.append([{"id": i, "score": s, **self.rows[i]} for s, i in found[:k]])
        if modality == "text" and matched_lines:
            results = [self.with_matched_lines(vector, hits) for vector, hits in zip(vectors, results)]
        return results

    @cached_property
    def mean_captions(self) -> bool:
        """Whether each caption vector is the mean of its image's caption lines (``embed --all-captions``)."""
        return read_info(self.folder).get("captions") == "all"

    def with_matched_lines(self, vector: np.ndarray, hits: list[dict]) -> list[dict]:
        """``hits`` of a caption search, each ``caption`` the image's caption line nearest the query ``vector``
        where the collection holds the mean of its lines (``--all-captions``; as given otherwise): the line that
        matched, not the image's first. The lines' vectors are embedded once per row and kept for
        ``LINE_CACHE_ROWS`` rows."""
        if not self.mean_captions or not hits:
            return hits
        missing = [hit for hit in dict((hit["id"], hit) for hit in hits).values() if hit["id"] not in self._lines]
        if missing:
            lines = []
            for hit in missing:
                try:
                    lines.append(item_captions(item_from_path(str(hit["path"]))) or [hit.get("caption") or ""])
                except (OSError, KeyError):  # moved since it was embedded: what the metadata kept
                    lines.append([hit.get("caption") or ""])
            with self.model_lock:
                vectors = self.embed_texts([line for own in lines for line in own])
            start = 0
            for hit, own in zip(missing, lines):
                self._lines[hit["id"]] = (own, vectors[start:start + len(own)])
                start += len(own)
        matched = []
        for hit in hits:
            self._lines.move_to_end(hit["id"])
            own, line_vectors = self._lines[hit["id"]]
            matched.append({**hit, "caption": own[int(np.argmax(line_vectors @ np.asarray(vector, np.float32)))]})
        while len(self._lines) > LINE_CACHE_ROWS:
            self._lines.popitem(last=False)
        return matched

    @cached_property
    def stored(self) -> StoredVectors:
        """The stored embeddings, read by id (re-rank, de-duplication, more-like-this)."""
        return StoredVectors(self.folder)

    def search_text(self, text: str, k: int = 10, dedup: float | None = None, modality: str = "image") -> list[dict]:
        return self.search_vectors(self.embed_texts([text]), k, dedup, modality)[0]

    def search_image(self, image, k: int = 10, dedup: float | None = None, modality: str = "image") -> list[dict]:
        return self.search_vectors(self.embed_images([image]), k, dedup, modality)[0]
