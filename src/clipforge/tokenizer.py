"""OpenAI CLIP's byte-level BPE tokenizer, run by the compiled Hugging Face ``tokenizers`` library.

Ids are identical to OpenAI's (and open_clip's) pure-Python tokenizer: the same text cleaning (ftfy, HTML
unescaping, whitespace folding, lower-casing), the same pre-tokenising regex, the same byte-to-unicode table and
BPE merges, ``<start_of_text>``/``<end_of_text>`` around the ids, zero padding, and truncation that keeps the end
token. Only the expensive parts move: ftfy runs only on text that is not plain printable ASCII (on which it is the
identity), words are split by the same C regex engine OpenAI uses, and each distinct word's BPE runs once in
Rust (``tokenizers``) and is cached.
"""
from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from importlib import resources
from itertools import chain

import numpy as np
import torch

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Anything outside printable ASCII (tab/newline/CR allowed) or an '&' (a possible HTML entity) needs the full clean.
_NEEDS_FULL_CLEAN = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")
# On cleaned text that is printable ASCII (lower case, single spaces) OpenAI's pattern reduces to this one, which
# the standard library runs several times faster than the ``regex`` module runs the Unicode-class original.
# Letters come first because they are most common; no other branch can start with a letter or digit, so the
# matches are the same as with OpenAI's order.
_ASCII_WORDS = re.compile(f"[a-z]+|[0-9]|{SOT_TOKEN}|{EOT_TOKEN}|'(?:s|t|re|ve|m|ll|d)|[^ a-z0-9]+")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clean_text(text: str) -> str:
    """OpenAI CLIP's cleaning: ftfy fixes, HTML unescaping (twice), whitespace folding, lower case."""
    if not _NEEDS_FULL_CLEAN.search(text):
        return " ".join(text.split()).lower()
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    raw = (resources.files(__package__) / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return {token: i for i, token in enumerate(vocab)}, merges


class Tokenizer:
    """Callable: ``tokenizer("a photo of a cat")`` or a list of strings -> LongTensor [N, context_length].

    Words are split by OpenAI's regex (the ``regex`` module, in C; an equivalent stdlib pattern on ASCII text), each
    distinct word is BPE-encoded once by the Rust ``tokenizers`` model and cached, and rows are assembled in numpy.
    Captions repeat words heavily, so after warm-up a caption costs a cleaning pass and a few dict look-ups.
    """

    _MAX_CACHED_WORDS = 1_000_000

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH):
        import regex
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

        vocab, merges = _vocab_and_merges()
        self.encoder = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.vocab_size = len(vocab)
        self.sot_token_id = vocab[SOT_TOKEN]
        self.eot_token_id = vocab[EOT_TOKEN]
        self.context_length = context_length
        # The BPE model sees one pre-split word at a time; ByteLevel maps its UTF-8 bytes to CLIP's alphabet.
        self._bpe = HFTokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # OpenAI's pattern, special tokens first: their literal text in a caption becomes the special id.
        self._word_regex = regex.compile(f"{SOT_TOKEN}|{EOT_TOKEN}|{_WORD_PATTERN}", regex.IGNORECASE)
        self._word_ids: dict[str, list[int]] = {SOT_TOKEN: [self.sot_token_id], EOT_TOKEN: [self.eot_token_id]}
        self._chunk_ids: dict[str, list[int]] = {}

    def _encode_words(self, words: list[str]) -> list[int]:
        """Ids of regex-split words; unseen words go through the Rust BPE model in one batch."""
        cache = self._word_ids
        try:
            return list(chain.from_iterable(map(cache.__getitem__, words)))
        except KeyError:
            pass
        missing = list({w for w in words if w not in cache})
        if len(cache) + len(missing) > self._MAX_CACHED_WORDS:
            cache.clear()
            cache.update({SOT_TOKEN: [self.sot_token_id], EOT_TOKEN: [self.eot_token_id]})
        self._bpe_into_cache(missing)
        return self._encode_words(words)

    def _bpe_into_cache(self, words: list[str]) -> None:
        encodings = self._bpe.encode_batch([[w] for w in words], is_pretokenized=True, add_special_tokens=False)
        self._word_ids.update(zip(words, (e.ids for e in encodings)))

    def _prefill(self, cleaned_texts: list[str]) -> None:
        """Cache the ids of every unseen printable-ASCII chunk of these texts, BPE-encoding all their unseen words in
        one call to the Rust model: a cold batch then encodes from the caches, almost as fast as a warm one. (Words
        and chunks found in texts that also hold non-ASCII are harmless extra entries: an ASCII chunk's ids do not
        depend on the text around it.)"""
        chunks = {c for text in cleaned_texts for c in text.split(" ")}
        chunks.difference_update(self._chunk_ids)
        if not chunks or len(self._chunk_ids) + len(chunks) > self._MAX_CACHED_WORDS:
            return
        split = {c: _ASCII_WORDS.findall(c) for c in chunks if _PRINTABLE_ASCII.fullmatch(c)}
        words = {w for found in split.values() for w in found}
        words.difference_update(self._word_ids)
        if len(self._word_ids) + len(words) > self._MAX_CACHED_WORDS:
            return
        if words:
            self._bpe_into_cache(list(words))
        word_ids = self._word_ids
        self._chunk_ids.update((c, list(chain.from_iterable(map(word_ids.__getitem__, found))))
                               for c, found in split.items())

    def _encode_cleaned(self, cleaned: str, fill: bool = True) -> list[int] | None:
        """Ids of one cleaned text; with ``fill=False`` None instead of encoding an unseen ASCII chunk."""
        if not _PRINTABLE_ASCII.fullmatch(cleaned):
            return self._encode_words(self._word_regex.findall(cleaned))
        # In cleaned ASCII text no regex match spans a space, so each space-separated chunk ("dog,") can be
        # cached whole and most captions need no regex scan at all.
        chunks = cleaned.split(" ")
        cache = self._chunk_ids
        try:
            return list(chain.from_iterable(map(cache.__getitem__, chunks)))
        except KeyError:
            if not fill:
                return None
        if len(cache) > self._MAX_CACHED_WORDS:
            cache.clear()
        for chunk in chunks:
            if chunk not in cache:
                cache[chunk] = self._encode_words(_ASCII_WORDS.findall(chunk))
        return self._encode_cleaned(cleaned)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text after cleaning, without start/end tokens or padding."""
        return self._encode_cleaned(clean_text(text))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = "".join(self.decoder[i] for i in ids if i in self.decoder)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a string or a list of strings")
        context_length = context_length or self.context_length
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        limit = context_length - 2
        cleaned = [clean_text(t) for t in texts]
        encode = self._encode_cleaned
        if len(self._chunk_ids) < len(cleaned):  # cold-ish caches: most texts bring new words
            self._prefill(cleaned)
            encoded = [encode(text) for text in cleaned]
        else:  # warm: encode from the caches, then BPE the few texts with new chunks together
            encoded = [encode(text, False) for text in cleaned]
            missed = [i for i, ids in enumerate(encoded) if ids is None]
            if len(missed) > 1:
                self._prefill([cleaned[i] for i in missed])
            for i in missed:
                encoded[i] = encode(cleaned[i])
        encoded = [ids if len(ids) <= limit else ids[:limit] for ids in encoded]  # truncation keeps the end token
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        result = np.zeros((len(texts), context_length), dtype=np.int64)
        result[:, 0] = self.sot_token_id
        body = np.arange(context_length - 1) < lengths[:, None]
        result[:, 1:][body] = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
        result[np.arange(len(texts)), lengths + 1] = self.eot_token_id
        return torch.from_numpy(result)


@lru_cache(maxsize=None)
def _shared_tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length)


def get_tokenizer(name: str | dict | None = None, context_length: int | None = None):
    """The tokenizer for a zoo model name or model config (its context length; a Hugging Face text tower brings its
    own tokenizer), or the OpenAI default (77 tokens) when no name is given."""
    text_cfg = {}
    if name is not None:
        from .models import get_model_config

        text_cfg = (name if isinstance(name, dict) else get_model_config(name))["text_cfg"]
    if context_length is None:
        context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    if "hf_model_name" in text_cfg:
        from .models.hf_text import HFTokenizer

        return HFTokenizer(text_cfg["hf_model_name"], context_length)
    return _shared_tokenizer(context_length)


def tokenize(texts: str | list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.LongTensor:
    """OpenAI-style function form: ``clipforge.tokenize(["a dog", "a cat"])``."""
    return _shared_tokenizer(context_length)(texts)
