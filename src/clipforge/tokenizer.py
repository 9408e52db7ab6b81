"""OpenAI CLIP's byte-level BPE tokenizer, run by the compiled Hugging Face ``tokenizers`` library.

Ids are identical to OpenAI's (and open_clip's) pure-Python tokenizer: the same text cleaning (ftfy, HTML
unescaping, whitespace folding, lower-casing), the same pre-tokenising regex, the same byte-to-unicode table and
BPE merges, ``<start_of_text>``/``<end_of_text>`` around the ids, zero padding, and truncation that keeps the end
token. Only the expensive parts move: ftfy runs only on text that is not plain printable ASCII (on which it is the
identity) and skips its steps that cannot change the string (``textfix``), words are split by the same C regex
engine OpenAI uses, and each distinct word's BPE runs once in Rust (``tokenizers``) and is cached.
"""
from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from importlib import resources
from itertools import chain, repeat

import numpy as np
import torch

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Anything outside printable ASCII (tab/newline/CR allowed) or an '&' (a possible HTML entity) needs the full clean.
_NEEDS_FULL_CLEAN = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")
_PLAIN_BYTES = bytes([9, 10, 13, *range(0x20, 0x26), *range(0x27, 0x7f)])  # the same set, as bytes
# On cleaned text that is printable ASCII (lower case, single spaces) OpenAI's pattern reduces to this one, which
# the standard library runs several times faster than the ``regex`` module runs the Unicode-class original.
# Letters come first because they are most common; no other branch can start with a letter or digit, so the
# matches are the same as with OpenAI's order.
_ASCII_WORDS = re.compile(f"[a-z]+|[0-9]|{SOT_TOKEN}|{EOT_TOKEN}|'(?:s|t|re|ve|m|ll|d)|[^ a-z0-9]+")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
# Batch cleaning of plain text: the whitespace str.split() folds (as much as plain text can hold) that is not already
# a single space
_WHITESPACE_TO_FOLD = re.compile(r"[ \t\n\r]{2,}|[\t\n\r]")


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
    from .textfix import fix_text

    text = html.unescape(html.unescape(fix_text(text))).strip()
    return " ".join(text.split()).lower()


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    raw = (resources.files(__package__) / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return {token: i for i, token in enumerate(vocab)}, merges


class Tokenizer:
    """Callable: ``tokenizer("a photo of a cat")`` or a list of strings -> LongTensor [N, context_length].

    Words are split by OpenAI's regex (the ``regex`` module, in C; an equivalent stdlib pattern on ASCII text), each
    distinct word is BPE-encoded once by the Rust ``tokenizers`` model and cached. Plain-ASCII text (nearly every
    caption) never goes through Python per word or per caption: a batch is cleaned as one string, cut into
    space-separated chunks whose ids are cached, and the rows are gathered from the cache in numpy.
    """

    _MAX_CACHED_WORDS = 1_000_000
    _SEPARATOR = "\x00"  # joins a batch's plain texts; never in one (it would need the full clean)

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH):
        import regex
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

        vocab, merges = vocab_and_merges()
        self.encoder = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.vocab_size = len(vocab)
        self.sot_token_id = vocab[SOT_TOKEN]
        self.eot_token_id = vocab[EOT_TOKEN]
        self.context_length = context_length
        # The BPE model sees pre-split words; ByteLevel maps each word's UTF-8 bytes to CLIP's alphabet.
        self._bpe = HFTokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # OpenAI's pattern, special tokens first: their literal text in a caption becomes the special id.
        self._word_regex = regex.compile(f"{SOT_TOKEN}|{EOT_TOKEN}|{_WORD_PATTERN}", regex.IGNORECASE)
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._word_ids: dict[str, list[int]] = {SOT_TOKEN: [self.sot_token_id], EOT_TOKEN: [self.eot_token_id]}
        # chunk -> row of (offset, length) into a flat id store; row 0 is the batch separator, row 1 the empty chunk.
        # Both arrays grow by doubling (rows and ids beyond those in use are spare), so adding a few chunks to a large
        # cache does not copy it.
        self._chunk_row = {self._SEPARATOR: 0, "": 1}
        self._chunk_span = np.zeros((1024, 2), dtype=np.int64)
        self._chunk_store = np.zeros(4096, dtype=np.int64)
        self._store_used = 0

    def _bound_caches(self) -> None:
        """Start the caches afresh once they pass the bound (checked between calls, so a call's own entries stay)."""
        if max(len(self._word_ids), len(self._chunk_row)) > self._MAX_CACHED_WORDS:
            self._reset_caches()

    def _encode_words(self, words: list[str]) -> list[int]:
        """Ids of regex-split words; unseen words go through the Rust BPE model in one call."""
        cache = self._word_ids
        try:
            return list(chain.from_iterable(map(cache.__getitem__, words)))
        except KeyError:
            pass
        self._bpe_into_cache([w for w in dict.fromkeys(words) if w not in cache])
        return list(chain.from_iterable(map(cache.__getitem__, words)))

    def _bpe_into_cache(self, words: list[str]) -> None:
        """BPE every word in one sequence (one Rust call, one result object) and cut the ids back per word.

        A printable-ASCII word that is itself a vocabulary entry (most words of real captions) is that one id without
        BPE: its byte-level spelling is the word, and BPE of such a word always ends in that entry (true of every one
        of the vocabulary's printable-ASCII entries; ``tests/test_tokenizer.py`` checks them all)."""
        encoder = self.encoder
        whole = [(w, i) for w in words
                 if (i := encoder.get(w + "</w>")) is not None and w.isascii() and w.isprintable()]
        if whole:
            self._word_ids.update((w, [i]) for w, i in whole)
            words = [w for w in words if w not in self._word_ids]
        if not words:
            return
        encoding = self._bpe.encode(words, is_pretokenized=True, add_special_tokens=False)
        ids = encoding.ids
        counts = np.bincount(np.asarray(encoding.word_ids, dtype=np.int64), minlength=len(words))
        ends = np.cumsum(counts).tolist()
        self._word_ids.update(zip(words, (ids[e - c:e] for e, c in zip(ends, counts.tolist()))))

    def _add_chunks(self, chunks: list[str]) -> None:
        """Cache the ids of unseen chunks of cleaned text (each encoded on its own: no OpenAI regex match spans a
        space in cleaned text); printable-ASCII chunks are split by the faster ASCII pattern."""
        plain, regex_split = _PRINTABLE_ASCII.fullmatch, self._word_regex.findall
        split = [_ASCII_WORDS.findall(c) if plain(c) else regex_split(c) for c in chunks]
        words = {w for found in split for w in found}
        self._bpe_into_cache([w for w in words if w not in self._word_ids])
        word_ids = self._word_ids
        ids = [list(chain.from_iterable(map(word_ids.__getitem__, found))) for found in split]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        used, added = self._store_used, int(lengths.sum())
        first = len(self._chunk_row)
        self._chunk_store = _with_room(self._chunk_store, used + added)
        self._chunk_span = _with_room(self._chunk_span, first + len(chunks))
        self._chunk_store[used:used + added] = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=added)
        self._chunk_span[first:first + len(chunks)] = np.stack([used + np.cumsum(lengths) - lengths, lengths], axis=1)
        self._store_used = used + added
        self._chunk_row.update(zip(chunks, range(first, first + len(chunks))))

    def _encode_plain(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all ``texts`` concatenated, each text's id count) for texts that are printable ASCII plus
        tab/newline/CR, or already cleaned: cleaned as one string (a no-op on cleaned text), looked up as one list of
        space-separated chunks, gathered in numpy."""
        sep = self._SEPARATOR
        joined = sep.join(texts).lower()
        if any(mark in joined for mark in ("  ", "\t", "\n", "\r")):  # a scan for each is cheaper than one regex pass
            joined = _WHITESPACE_TO_FOLD.sub(" ", joined)
        joined = joined.replace(" " + sep, sep).replace(sep + " ", sep).strip(" ")
        chunks = joined.replace(sep, f" {sep} ").split(" ")
        row_of = self._chunk_row
        sample = chunks[:1000]
        if 4 * sum(c not in row_of for c in sample) > len(sample):  # a cold batch: cache all its new chunks first
            self._add_chunks([c for c in set(chunks) if c not in row_of])
        rows = np.fromiter(map(row_of.get, chunks, repeat(-1)), dtype=np.int64, count=len(chunks))
        unseen = np.flatnonzero(rows < 0)
        if len(unseen):
            self._add_chunks(list({chunks[i] for i in unseen.tolist()}))
            rows[unseen] = np.fromiter(map(row_of.__getitem__, (chunks[i] for i in unseen.tolist())), dtype=np.int64,
                                       count=len(unseen))
        text_of = np.cumsum(rows == 0)  # a separator chunk (no ids) opens the next text
        offsets, lengths = self._chunk_span[rows, 0], self._chunk_span[rows, 1]
        counts = np.bincount(text_of, weights=lengths, minlength=len(texts)).astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        gather = np.repeat(offsets - starts, lengths) + np.arange(int(lengths.sum()))
        return self._chunk_store[gather], counts

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text after cleaning, without start/end tokens or padding."""
        self._bound_caches()
        cleaned = clean_text(text)
        if _PRINTABLE_ASCII.fullmatch(cleaned):
            return self._encode_plain([cleaned])[0].tolist()
        return self._encode_words(self._word_regex.findall(cleaned))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = "".join(self.decoder[i] for i in ids if i in self.decoder)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)) or not all(map(isinstance, texts, repeat(str))):
            raise TypeError("the tokenizer takes a string or a list of strings")
        context_length = context_length or self.context_length
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        result = np.zeros((len(texts), context_length), dtype=np.int64)
        result[:, 0] = self.sot_token_id
        if not texts:
            return torch.from_numpy(result)
        self._bound_caches()
        # texts that need ftfy/HTML cleaning; deleting the allowed bytes from the whole batch at C speed says first
        # whether there is any
        joined = "\n".join(texts)
        plain, other_rows, other = list(texts), [], []
        marks = len(joined.encode("ascii").translate(None, _PLAIN_BYTES)) if joined.isascii() else len(joined)
        if marks:
            if marks < len(texts):  # a few '&' or control characters: one scan, their offsets mapped to texts
                found = [m.start() for m in _NEEDS_FULL_CLEAN.finditer(joined)]
                ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + 1)
                full = np.unique(np.searchsorted(ends, found, side="right")).tolist()
            else:
                needs_full_clean = _NEEDS_FULL_CLEAN.search
                full = [i for i, text in enumerate(texts) if needs_full_clean(text)]
            for i in full:
                cleaned = clean_text(texts[i])
                if self._SEPARATOR not in cleaned:  # cleaned text: the chunk path below leaves it as it is
                    plain[i] = cleaned
                else:
                    other_rows.append(i)
                    other.append(self._encode_words(self._word_regex.findall(cleaned)))
        plain_rows = np.arange(len(texts))
        if other_rows:
            plain_rows = np.delete(plain_rows, other_rows)
            plain = [plain[i] for i in plain_rows.tolist()]
        limit = context_length - 2  # truncation keeps the end token
        if plain:
            ids, counts = self._encode_plain(plain)
            self._place(result, plain_rows, ids, counts, limit)
        if other:
            counts = np.fromiter(map(len, other), dtype=np.int64, count=len(other))
            ids = np.fromiter(chain.from_iterable(other), dtype=np.int64, count=int(counts.sum()))
            self._place(result, np.asarray(other_rows), ids, counts, limit)
        return torch.from_numpy(result)

    def _place(self, result: np.ndarray, rows: np.ndarray, ids: np.ndarray, counts: np.ndarray, limit: int) -> None:
        """Write each row's ids (concatenated in ``ids``, ``counts`` per row) after the start token, truncated to
        ``limit``, then the end token."""
        text = np.repeat(np.arange(len(rows)), counts)
        position = np.arange(len(ids)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = position < limit
        result[rows[text[keep]], 1 + position[keep]] = ids[keep]
        result[rows, 1 + np.minimum(counts, limit)] = self.eot_token_id


def _with_room(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` itself when it has ``rows`` rows, else a copy at least twice as long (the spare rows zero)."""
    if rows <= len(array):
        return array
    grown = np.zeros((max(rows, 2 * len(array)), *array.shape[1:]), dtype=array.dtype)
    grown[:len(array)] = array
    return grown


@lru_cache(maxsize=None)
def _shared_tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length)


def _is_openai_vocabulary(path) -> bool:
    """Whether a gzipped BPE file holds the vocabulary this tokenizer ships (open_clip's copy of it does)."""
    from pathlib import Path

    ours = (resources.files(__package__) / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    try:
        return gzip.decompress(Path(path).read_bytes()) == gzip.decompress(ours)
    except (OSError, EOFError):  # missing, unreadable, not gzip
        return False


class SimpleTokenizer(Tokenizer):
    """open_clip's ``SimpleTokenizer`` by its name and keywords: this tokenizer (the same ids), for scripts that build
    it themselves. What it cannot do is refused by name: another BPE vocabulary, added special tokens, cleaners other
    than "lower" (open_clip's default, this tokenizer's), CLIPA's token reductions."""

    def __init__(self, bpe_path: str | None = None, additional_special_tokens=None,
                 context_length: int = DEFAULT_CONTEXT_LENGTH, clean: str = "lower", reduction_mask: str = ""):
        if bpe_path is not None and not _is_openai_vocabulary(bpe_path):
            raise ValueError(f"bpe_path {bpe_path}: only OpenAI's vocabulary (bpe_simple_vocab_16e6) is built here")
        refused = {"additional_special_tokens": additional_special_tokens, "reduction_mask": reduction_mask,
                   "clean": clean if clean != "lower" else None}
        for name, value in refused.items():
            if value:
                raise ValueError(f"SimpleTokenizer({name}={value!r}) is not built here: OpenAI's BPE with open_clip's "
                                 f"default cleaning ('lower') only")
        super().__init__(context_length)


def get_tokenizer(name: str | dict | None = None, context_length: int | None = None, cache_dir: str | None = None,
                  **settings):
    """The tokenizer for a model (its context length; a Hugging Face text tower brings its own tokenizer, a SigLIP,
    CLIPA or MetaCLIP 2 model its tokenizer files: ``hub_tokenizer``), or the OpenAI default (77 tokens) when no name
    is given. ``name``: a zoo name, a model config, or what ``clipforge.load`` takes (``hf-hub:`` repos, checkpoint
    folders, ``local-dir:``), as open_clip's ``get_tokenizer`` does; ``cache_dir``: where fetched files are kept.

    ``settings``: open_clip's tokenizer keywords, over the model's own ``text_cfg.tokenizer_kwargs``: ``clean``,
    ``strip_sep_token`` and ``language`` (NLLB-CLIP's source language, e.g. ``"fra_Latn"``; also
    ``tokenizer.set_language``) for a tokenizer from files, ``language`` for a Hugging Face text tower's; the CLIP BPE
    tokenizer cleans as OpenAI's (``clean="lower"``) and takes nothing else. Others are refused by name."""
    from .pretrained import cache_at

    with cache_at(cache_dir):
        tokenizer = _tokenizer_for(name or None, context_length, settings)
        if cache_dir is not None and hasattr(tokenizer, "fetch"):
            tokenizer.fetch()  # its files now, into cache_dir (they are otherwise found on first use)
    return tokenizer


def _only(settings: dict, allowed: tuple, kind: str) -> dict:
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise TypeError(f"get_tokenizer: {', '.join(unknown)}: not a setting of {kind}, which takes "
                        f"{', '.join(allowed) if allowed else 'none'}")
    return settings


def _tokenizer_for(name: str | dict | None, context_length: int | None, settings: dict | None = None):
    settings = settings or {}
    text_cfg = {}
    if isinstance(name, dict):
        text_cfg = name["text_cfg"]
    elif name is not None:
        from . import read_model_config

        text_cfg = read_model_config(name)["text_cfg"]
    if context_length is None:
        context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    if "hf_model_name" in text_cfg and not text_cfg.get("hf_tokenizer_name"):
        from .models.hf_text import HFTokenizer

        return HFTokenizer(text_cfg["hf_model_name"], context_length,
                           **_only(settings, ("language",), "a Hugging Face text tower's tokenizer"))
    if "hf_tokenizer_name" in text_cfg:  # SigLIP's, CLIPA's, MetaCLIP 2's: files beside the weights or in a hub repo
        from .hub_tokenizer import HubTokenizer

        settings = {**text_cfg.get("tokenizer_kwargs", {}), **settings}  # the caller's win, as in open_clip
        return HubTokenizer(text_cfg["hf_tokenizer_name"], context_length,
                            **_only(settings, ("clean", "strip_sep_token", "language"), "a tokenizer from files"))
    _only(settings, ("clean",), "the CLIP BPE tokenizer")
    if settings.get("clean", "lower") != "lower":
        raise ValueError(f"get_tokenizer: clean={settings['clean']!r}: the CLIP BPE tokenizer cleans as OpenAI's "
                         "('lower': ftfy, HTML unescaped, whitespace folded, lower case), the only cleaning built")
    return _shared_tokenizer(context_length)


def tokenize(texts: str | list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.LongTensor:
    """OpenAI-style function form: ``clipforge.tokenize(["a dog", "a cat"])``."""
    return _shared_tokenizer(context_length)(texts)
