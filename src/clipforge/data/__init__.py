"""Training and evaluation data: sources (shards, CSV, folders, generated shapes) and the batching pipeline."""
from .captions import label_caption
from .pipeline import ContrastiveStream, EvaluationSet, SkipSample, decode_sample, evaluation_set, make_loader
from .shapes import ShapesSource
from .sources import CsvSource, FolderSource, ShardSource, expand_shards, find_classnames, open_source, read_classnames

__all__ = ["ContrastiveStream", "SkipSample", "decode_sample", "EvaluationSet", "evaluation_set", "make_loader",
           "ShapesSource", "CsvSource", "FolderSource", "ShardSource", "expand_shards", "find_classnames",
           "open_source", "read_classnames", "label_caption"]
