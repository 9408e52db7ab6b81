"""Embed, index and search image collections (``clipforge embed``, ``index build``, ``search``, ``serve``)."""
import importlib

# resolved on first use: ``clipforge index build`` needs neither torch nor a model
_LAZY = {"load_embeddings": "collection", "load_metadata": "collection", "load_text_embeddings": "collection",
         "Metadata": "collection", "StoredVectors": "collection", "embed_collection": "embed",
         "build_index": "index", "load_index": "index", "save_index": "index", "Searcher": "search"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
