"""Embed, index and search image collections (``clipforge embed``, ``index build``, ``search``, ``serve``)."""
from .embed import embed_collection, load_embeddings
from .index import build_index, load_index, save_index
from .search import Searcher

__all__ = ["embed_collection", "load_embeddings", "build_index", "load_index", "save_index", "Searcher"]
