"""Evaluation: retrieval recall@k, dataset embedding (zero-shot classification lives in clipforge.zeroshot; the
fixed image-caption sets in clipforge.data.evaluation_set)."""
from .features import embed_labelled
from .retrieval import embed_pairs, embed_retrieval_set, retrieval_metrics

__all__ = ["embed_labelled", "embed_pairs", "embed_retrieval_set", "retrieval_metrics"]
