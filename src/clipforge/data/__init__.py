"""Training and evaluation data: sources (shards, CSV, folders, generated shapes) and the batching pipeline."""
from .captions import label_caption, load_caption_templates
from .pipeline import ContrastiveStream, SkipSample, decode_sample, evaluation_pairs, make_loader
from .shapes import ShapesSource
from .sources import CsvSource, FolderSource, ShardSource, expand_shards, find_classnames, open_source, read_classnames

__all__ = ["ContrastiveStream", "SkipSample", "decode_sample", "evaluation_pairs", "make_loader", "ShapesSource",
           "CsvSource", "FolderSource", "ShardSource", "expand_shards", "find_classnames", "open_source",
           "read_classnames", "label_caption", "load_caption_templates"]
