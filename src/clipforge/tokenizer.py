"""OpenAI CLIP's byte-level BPE tokenizer, run by the compiled Hugging Face ``tokenizers`` library.

Ids are identical to OpenAI's (and open_clip's) pure-Python tokenizer: the same text cleaning (ftfy, HTML
unescaping, whitespace folding, lower-casing), the same pre-tokenising regex, the same byte-to-unicode table and
BPE merges, ``<start_of_text>``/``<end_of_text>`` around the ids, zero padding, and truncation that keeps the end
token. Only the expensive parts move: ftfy runs only on text that is not plain printable ASCII (on which it is the
identity) and skips its steps that cannot change the string (``textfix``), words are split by the same C regex
engine OpenAI uses, and each distinct word's BPE runs once in Rust (``tokenizers``) and is cached.

Tokens added after the vocabulary (open_clip's ``additional_special_tokens``; a textual inversion's placeholders) take
the next ids in order. They are matched in the cleaned, lower-cased text as open_clip matches them: alternatives of the
word pattern tried before the others (escaped: open_clip puts them in its pattern as they are, where "*" is an error
and "." any character); or, with ``split_added_tokens``, as transformers matches the tokens ``add_tokens`` gave a
``CLIPTokenizer``: cut out of the text first, longest first, whatever their case, the word pattern run on the rest.
The two differ where punctuation runs into a token ("(<cat-toy>": open_clip's "(<" is one word).
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

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, additional_special_tokens=None,
                 split_added_tokens: bool = False):
        import regex
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

        vocab, merges = vocab_and_merges()
        if isinstance(additional_special_tokens, str):
            raise TypeError("additional_special_tokens takes a list of tokens, not one string")
        self.added_tokens = tuple(additional_special_tokens or ())
        check_added_tokens(self.added_tokens, vocab, split_added_tokens)
        self._base_vocab = vocab
        added_ids = {t: len(vocab) + k for k, t in enumerate(self.added_tokens)}
        self.encoder = {**vocab, **added_ids}
        self.decoder = {**{i: t for t, i in vocab.items()}, **{i: t for t, i in added_ids.items()}}
        # a token that is also a vocabulary piece ("!") takes its new id wherever that piece comes out of the BPE too,
        # as in open_clip, whose piece-to-id table the added token overwrites
        self._renumbered = {vocab[t]: i for t, i in added_ids.items() if t in vocab}
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.vocab_size = len(vocab) + len(self.added_tokens)  # ids (an added token of the vocabulary takes a new one)
        self.sot_token_id = vocab[SOT_TOKEN]
        self.eot_token_id = vocab[EOT_TOKEN]
        self.context_length = context_length
        # The BPE model sees pre-split words; ByteLevel maps each word's UTF-8 bytes to CLIP's alphabet.
        self._bpe = HFTokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # OpenAI's pattern, special tokens first: their literal text in a caption becomes the special id.
        in_pattern = () if split_added_tokens else self.added_tokens
        special = "".join(f"{regex.escape(t)}|" for t in (SOT_TOKEN, EOT_TOKEN, *in_pattern))
        self._word_regex = regex.compile(f"{special}{_WORD_PATTERN}", regex.IGNORECASE)
        self._ascii_words = _ASCII_WORDS
        if in_pattern:  # tried first, as in the full pattern (a letter-led token inside a word is cut out)
            self._ascii_words = re.compile("".join(f"{re.escape(t.lower())}|" for t in in_pattern) +
                                           _ASCII_WORDS.pattern)
        # transformers' way: (lower-cased) tokens cut out first, the longest where two start at one place
        self._cut_added = None
        if split_added_tokens and self.added_tokens:
            longest_first = sorted({t.lower() for t in self.added_tokens}, key=len, reverse=True)
            self._cut_added = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._word_ids: dict[str, list[int]] = {t: [self.encoder[t]] for t in (SOT_TOKEN, EOT_TOKEN)}
        if self._cut_added is None:
            self._word_ids.update((t, [self.encoder[t]]) for t in self.added_tokens)
        else:  # the text cut out is lower case
            self._word_ids.update((t.lower(), [self.encoder[t]]) for t in self.added_tokens)
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

    def _find_words(self, text: str) -> list[str]:
        """The words of cleaned text (added tokens cut out first, where they are)."""
        find = self._ascii_words.findall if _PRINTABLE_ASCII.fullmatch(text) else self._word_regex.findall
        if self._cut_added is None:
            return find(text)
        parts = self._cut_added.split(text)  # text, token, text, ..., text
        return [word for k, part in enumerate(parts) for word in ((part,) if k % 2 else find(part))]

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
        encoder = self._base_vocab
        whole = [(w, i) for w in words
                 if (i := encoder.get(w + "</w>")) is not None and w.isascii() and w.isprintable()]
        renumbered = self._renumbered
        if whole:
            self._word_ids.update((w, [renumbered.get(i, i)]) for w, i in whole)
            words = [w for w in words if w not in self._word_ids]
        if not words:
            return
        encoding = self._bpe.encode(words, is_pretokenized=True, add_special_tokens=False)
        ids = [renumbered.get(i, i) for i in encoding.ids] if renumbered else encoding.ids
        counts = np.bincount(np.asarray(encoding.word_ids, dtype=np.int64), minlength=len(words))
        ends = np.cumsum(counts).tolist()
        self._word_ids.update(zip(words, (ids[e - c:e] for e, c in zip(ends, counts.tolist()))))

    def _add_chunks(self, chunks: list[str]) -> None:
        """Cache the ids of unseen chunks of cleaned text (each encoded on its own: no OpenAI regex match spans a
        space in cleaned text); printable-ASCII chunks are split by the faster ASCII pattern."""
        split = list(map(self._find_words, chunks))
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
        return self._encode_words(self._find_words(cleaned))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        first_added, out, pieces = len(self._base_vocab), [], []
        for i in ids:
            if i >= first_added and i in self.decoder:  # an added token: its own text (it need not be byte-level)
                out += [self._decode_pieces(pieces), self.decoder[i]]
                pieces = []
            elif i in self.decoder:
                pieces.append(self.decoder[i])
        return "".join(out) + self._decode_pieces(pieces)

    def _decode_pieces(self, pieces: list[str]) -> str:
        text = "".join(pieces)
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
                    other.append(self._encode_words(self._find_words(cleaned)))
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


def check_added_tokens(tokens: tuple, vocab: dict, split: bool) -> None:
    """Refuse, by name, added tokens the matching could not find or the ids could not keep apart."""
    for token in tokens:
        if not isinstance(token, str) or not token or token.split() != [token] or not token.isprintable():
            raise ValueError(f"added token {token!r}: a token must be printable text without white space")
        if not (split or token.isascii()):  # open_clip looks it up in byte-level spelling, where it is never found
            raise ValueError(f"added token {token!r}: only ASCII tokens are matched as open_clip matches them (its "
                             "tokenizer never matches another); split_added_tokens matches any")
    key = str.lower if split else str  # cut out whatever their case, two alike but for it would match one text
    keys = [key(t) for t in tokens]
    repeated = sorted({t for t in tokens if keys.count(key(t)) > 1})
    if repeated:
        alike = " (alike but for case, and matched whatever their case)" if split else ""
        raise ValueError(f"added tokens {', '.join(map(repr, repeated))} are given more than once{alike}")


@lru_cache(maxsize=None)
def _shared_tokenizer(context_length: int, added_tokens: tuple = (), split_added_tokens: bool = False) -> Tokenizer:
    return Tokenizer(context_length, additional_special_tokens=added_tokens, split_added_tokens=split_added_tokens)


def _is_openai_vocabulary(path) -> bool:
    """Whether a gzipped BPE file holds the vocabulary this tokenizer ships (open_clip's copy of it does)."""
    from pathlib import Path

    ours = (resources.files(__package__) / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    try:
        return gzip.decompress(Path(path).read_bytes()) == gzip.decompress(ours)
    except (OSError, EOFError):  # missing, unreadable, not gzip
        return False


class SimpleTokenizer(Tokenizer):
    """open_clip's ``SimpleTokenizer`` by its name and keywords: this tokenizer (the same ids, with
    ``additional_special_tokens`` too), for scripts that build it themselves. What it cannot do is refused by name:
    another BPE vocabulary, cleaners other than "lower" (open_clip's default, this tokenizer's), CLIPA's token
    reductions."""

    def __init__(self, bpe_path: str | None = None, additional_special_tokens=None,
                 context_length: int = DEFAULT_CONTEXT_LENGTH, clean: str = "lower", reduction_mask: str = ""):
        if bpe_path is not None and not _is_openai_vocabulary(bpe_path):
            raise ValueError(f"bpe_path {bpe_path}: only OpenAI's vocabulary (bpe_simple_vocab_16e6) is built here")
        refused = {"reduction_mask": reduction_mask, "clean": clean if clean != "lower" else None}
        for name, value in refused.items():
            if value:
                raise ValueError(f"SimpleTokenizer({name}={value!r}) is not built here: OpenAI's BPE with open_clip's "
                                 f"default cleaning ('lower') only")
        super().__init__(context_length, additional_special_tokens)


def get_tokenizer(name: str | dict | None = None, context_length: int | None = None, cache_dir: str | None = None,
                  **settings):
    """The tokenizer for a model (its context length; a Hugging Face text tower brings its own tokenizer, a SigLIP,
    CLIPA or MetaCLIP 2 model its tokenizer files: ``hub_tokenizer``), or the OpenAI default (77 tokens) when no name
    is given. ``name``: a zoo name, a model config, or what ``clipforge.load`` takes (``hf-hub:`` repos, checkpoint
    folders, ``local-dir:``), as open_clip's ``get_tokenizer`` does; ``cache_dir``: where fetched files are kept.

    ``settings``: open_clip's tokenizer keywords, over the model's own ``text_cfg.tokenizer_kwargs``: ``clean``,
    ``strip_sep_token`` and ``language`` (NLLB-CLIP's source language, e.g. ``"fra_Latn"``; also
    ``tokenizer.set_language``) for a tokenizer from files, ``language`` for a Hugging Face text tower's; the CLIP BPE
    tokenizer cleans as OpenAI's (``clean="lower"``) and takes ``additional_special_tokens`` (ids after its
    vocabulary, in order: a textual inversion's placeholders) and ``split_added_tokens`` (them matched as
    transformers matches them: ``Tokenizer``). Others are refused by name."""
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
    asked = settings
    settings = {**text_cfg.get("tokenizer_kwargs", {}), **settings}  # as open_clip gives SimpleTokenizer its kwargs
    _only(settings, ("clean", "additional_special_tokens", "split_added_tokens"), "the CLIP BPE tokenizer")
    if settings.get("clean", "lower") != "lower":
        raise ValueError(f"get_tokenizer: clean={settings['clean']!r}: the CLIP BPE tokenizer cleans as OpenAI's "
                         "('lower': ftfy, HTML unescaped, whitespace folded, lower case), the only cleaning built")
    added = tuple(settings.get("additional_special_tokens") or ())
    vocab_size = text_cfg.get("vocab_size")
    # tokens the model's config names need its rows (tokens the caller adds, rows the caller is about to add)
    if added and "additional_special_tokens" not in asked and vocab_size is not None and \
            vocab_size < len(vocab_and_merges()[0]) + len(added):
        raise ValueError(f"the model's text tower has {vocab_size} token embeddings, fewer than its tokenizer's "
                         f"{len(vocab_and_merges()[0]) + len(added)} ids ({len(added)} added tokens)")
    return _shared_tokenizer(context_length, added, bool(settings.get("split_added_tokens")))


def tokenize(texts: str | list[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.LongTensor:
    """OpenAI-style function form: ``clipforge.tokenize(["a dog", "a cat"])``."""
    return _shared_tokenizer(context_length)(texts)
