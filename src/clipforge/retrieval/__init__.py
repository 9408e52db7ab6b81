"""Embed, index and search image collections (``clipforge embed``, ``index build``, ``search``, ``serve``)."""
from .collection import load_embeddings, load_metadata, load_text_embeddings
from .embed import embed_collection
from .index import build_index, load_index, save_index
from .search import Searcher

__all__ = ["embed_collection", "load_embeddings", "load_metadata", "load_text_embeddings", "build_index", "load_index", "save_index", "Searcher"]
