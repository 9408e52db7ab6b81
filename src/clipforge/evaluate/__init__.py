"""Evaluation: retrieval recall@k, dataset embedding (zero-shot classification lives in clipforge.zeroshot)."""
from .features import captioned_pairs, embed_labelled
from .retrieval import embed_pairs, retrieval_metrics

__all__ = ["captioned_pairs", "embed_labelled", "embed_pairs", "retrieval_metrics"]
