"""Evaluation: retrieval recall@k (zero-shot classification and linear probes build on the same features)."""
from .retrieval import embed_pairs, retrieval_metrics

__all__ = ["embed_pairs", "retrieval_metrics"]
