"""Bounds on every request the server takes, in one place for both of its APIs (its own and clip-retrieval's)."""

MAX_QUERY_CHARS = 1000
MAX_K = 100
MAX_DEPTH = 1000  # offset + k: how deep a page of results may reach into the ranking
THUMB_SIZES = (256, 512)
MAX_LABELS = 256
MAX_TEXTS = 256
MAX_PIXELS = 40_000_000
MAX_PROMPT_CHARS = 200
MAX_NEW_TOKENS = 64
CAPTION_TOKENS = 24  # a caption's length unless the request says otherwise
MAX_QUESTION_CHARS = 300
MAX_ANSWER_TOKENS = 32
CAPTIONS_KEPT = 4096  # generated captions of collection images kept in memory
MAX_METADATA_IDS = 1000  # ids per clip-retrieval /metadata request
