"""SigLIP's SentencePiece tokenizer without ``sentencepiece``: Google's SigLIP repos (``google/siglip-*``) ship their
T5 / mT5 vocabulary as ``spiece.model`` only, which transformers runs with its ``SiglipTokenizer`` (Python, over the
``sentencepiece`` library). Here the model file is read as the protobuf message it is, its Unigram pieces, character
normalisation (the compiled NFKC map) and whitespace rules are rebuilt in ``tokenizers``, and ``SiglipTokenizer``'s own
steps run around it: its text canonicalised (lower case, ASCII punctuation removed, whitespace folded), its special
tokens kept whole, ``</s>`` at the end. The ids are transformers' (tests/test_spiece.py: natural and noisy text,
against ``SiglipTokenizer`` over the real library); BPE models (Gemma's, Llama's) are left to transformers.
"""
from __future__ import annotations

import re
import string
import struct
from pathlib import Path
from typing import NamedTuple

SPIECE_FILE = "spiece.model"
META = "\u2581"  # SentencePiece's visible space, which starts each word's first piece
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
UNIGRAM = 1  # TrainerSpec.ModelType
_HIDDEN = (CONTROL, UNUSED, UNKNOWN)  # pieces SentencePiece never matches in text
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


class SentencePieceModel(NamedTuple):
    """What a ``.model`` file holds that encoding needs (sentencepiece_model.proto's field names)."""
    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: int
    byte_fallback: bool
    treat_whitespace_as_suffix: bool
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool


def _varint(data: bytes, at: int) -> tuple[int, int]:
    if at < len(data) and data[at] < 0x80:  # one byte: every key and almost every length in a model file
        return data[at], at + 1
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("a number runs past the end")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _fields(data: bytes):
    """(field number, value) for each field of a protobuf message: an int, or the bytes of a length-delimited or
    fixed-width field."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire in (1, 2, 5):
            size, at = (8, at) if wire == 1 else (4, at) if wire == 5 else _varint(data, at)
            value, at = data[at:at + size], at + size
        else:
            raise ValueError(f"field {number} has wire type {wire}, which SentencePiece models do not use")
        if at > len(data):
            raise ValueError(f"field {number} runs past the end")
        yield number, value


def read_model(path: str | Path) -> SentencePieceModel:
    """A SentencePiece ``.model`` file's pieces and settings, with a clear error for a file that is not one."""
    path = Path(path)
    pieces, trainer, normalizer = [], {}, {}
    try:
        for number, value in _fields(path.read_bytes()):
            if number == 1:
                piece = dict(_fields(value))
                score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
                pieces.append((piece.get(1, b"").decode("utf-8"), score, piece.get(3, NORMAL)))
            elif number == 2:
                trainer = dict(_fields(value))
            elif number == 3:
                normalizer = dict(_fields(value))
    except (ValueError, TypeError, struct.error, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a SentencePiece model ({exc})") from None
    if not pieces or not any(kind == UNKNOWN for _, _, kind in pieces):
        raise ValueError(f"{path}: not a SentencePiece model (no pieces, or no unknown piece)")
    return SentencePieceModel(pieces, trainer.get(3, UNIGRAM), bool(trainer.get(35, 0)), bool(trainer.get(24, 0)),
                              normalizer.get(2, b""), bool(normalizer.get(3, 1)), bool(normalizer.get(4, 1)),
                              bool(normalizer.get(5, 1)))


def unigram_backend(model: SentencePieceModel, source: str = "the model"):
    """``(tokenizer, hidden)``: the model as a ``tokenizers.Tokenizer`` that segments a text as SentencePiece segments
    it once a leading ``▁`` is in the text itself (``SiglipTokenizer``'s way, which turns the model's dummy prefix
    off): the compiled NFKC map, runs of spaces folded and trailing ones dropped, spaces as ``▁``, Viterbi over the
    pieces' scores. Control, unused and unknown pieces ("<pad>", "</s>", "<unk>"), which SentencePiece never finds in
    text (a full-width "＜pad＞" is "<pad>" after NFKC), are renamed in it to what no text can hold (a space: the text
    has none left by then); ``hidden`` maps their real names to their ids."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    kinds = {kind for _, _, kind in model.pieces}
    refused = ("a BPE model (Gemma's, Llama's: transformers runs it)" if model.model_type != UNIGRAM else
               "user-defined symbols" if USER_DEFINED in kinds else
               "whitespace as a suffix" if model.treat_whitespace_as_suffix else
               "unescaped whitespace" if not model.escape_whitespaces else None)
    if refused:
        raise ValueError(f"{source}: a SentencePiece model with {refused} is not read here (T5's and mT5's "
                         "Unigram vocabularies, SigLIP's, are)")
    unk_id = next(i for i, (_, _, kind) in enumerate(model.pieces) if kind == UNKNOWN)
    hidden = {piece: i for i, (piece, _, kind) in enumerate(model.pieces) if kind in _HIDDEN}
    vocab = [(f" {i}" if kind in _HIDDEN else piece, score) for i, (piece, score, kind) in enumerate(model.pieces)]
    backend = Tokenizer(Unigram(vocab, unk_id, model.byte_fallback))
    steps = [normalizers.Precompiled(model.precompiled_charsmap)] if model.precompiled_charsmap else []
    if model.remove_extra_whitespaces:  # SentencePiece folds runs of spaces as its map leaves them, then drops
        # what ends the text once spaces are "▁": a "▁" written in the text too (T5's NFKC map makes it a space)
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(f"[ {META}]+\\z"), "")]
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="never")
    backend.decoder = decoders.Sequence([decoders.Replace(META, " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, hidden


class Encoded(NamedTuple):
    ids: list[int]


class SiglipSentencePiece:
    """transformers' ``SiglipTokenizer`` over a ``spiece.model``, presenting the part of ``tokenizers.Tokenizer``
    that ``transformers_api.CLIPTokenizer`` and ``hub_tokenizer.HubTokenizer`` call (``encode_batch``, truncation,
    ``token_to_id``, ``decode``), so that either runs it as it runs a ``tokenizer.json``."""

    def __init__(self, model_file: str | Path, eos_token: str = "</s>", unk_token: str = "<unk>",
                 pad_token: str = "</s>", additional_special_tokens=(), do_lower_case: bool = True):
        """``SiglipTokenizer``'s arguments and defaults (its ``legacy`` changes nothing it does)."""
        model = read_model(model_file)
        self._backend, self._hidden = unigram_backend(model, str(model_file))
        self._pieces = len(model.pieces)
        self.do_lower_case = do_lower_case
        specials = [t for t in dict.fromkeys((eos_token, unk_token, pad_token, *additional_special_tokens)) if t]
        self._special_ids, next_id = {}, self._pieces
        for token in specials:  # a special token not among the pieces is added after them, as transformers adds it
            found = self._piece_id(token)
            if found is None:
                found, next_id = next_id, next_id + 1
            self._special_ids[token] = found
        self._special_tokens = {i: t for t, i in self._special_ids.items()}
        self._hidden_names = {i: piece for piece, i in self._hidden.items()}
        self.eos_token_id = self._special_ids[eos_token]
        self.pad_token_id = self._special_ids.get(pad_token)
        self._meta_id = self._backend.token_to_id(META)
        # transformers splits a text at its special tokens first (longest first), eating the white space around them
        alternatives = "|".join(map(re.escape, sorted(specials, key=len, reverse=True)))
        self._split = re.compile(rf"\s*({alternatives})\s*")
        self._max_length = None

    @classmethod
    def from_folder(cls, folder: str | Path, settings: dict) -> "SiglipSentencePiece":
        """From a folder's ``spiece.model`` and its tokenizer settings (tokenizer_config.json over
        special_tokens_map.json)."""
        from .hub_tokenizer import _token_text

        def token(name, default):
            return _token_text(settings.get(name) or default)

        extra = [_token_text(t) for t in settings.get("additional_special_tokens") or []]
        return cls(Path(folder) / SPIECE_FILE, token("eos_token", "</s>"), token("unk_token", "<unk>"),
                   token("pad_token", "</s>"), extra, bool(settings.get("do_lower_case", True)))

    # --- the tokenizers.Tokenizer calls the wrappers make -------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self._special_ids.get(token, self._piece_id(token))

    def id_to_token(self, token_id: int) -> str | None:
        return self._special_tokens.get(token_id) or self._hidden_names.get(token_id) or \
            self._backend.id_to_token(token_id)

    def _piece_id(self, piece: str) -> int | None:
        if piece in self._hidden:
            return self._hidden[piece]
        return None if piece.startswith(" ") else self._backend.token_to_id(piece)  # " ...": a renamed hidden piece

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        vocab = {piece: i for piece, i in self._backend.get_vocab(with_added_tokens=False).items()
                 if not piece.startswith(" ")}
        vocab.update(self._hidden)
        return {**vocab, **self._special_ids} if with_added_tokens else vocab

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return max(self._pieces, *(i + 1 for i in self._special_ids.values())) if with_added_tokens else self._pieces

    def enable_truncation(self, max_length: int, **_) -> None:
        self._max_length = max_length

    def no_truncation(self) -> None:
        self._max_length = None

    def no_padding(self) -> None:
        """Padding is the caller's (both wrappers pad the ids themselves)."""

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[Encoded]:
        rows: list[list[int] | None] = [None] * len(texts)
        plain, where = [], []
        for i, text in enumerate(texts):
            text = META + text.replace(META, " ")  # SiglipTokenizer.tokenize's start of the first word
            if self._split.search(text):
                rows[i] = self._with_specials(text)
            else:
                plain.append(self.canonicalize(text))
                where.append(i)
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # fast: no offsets
        for i, encoded in zip(where, encode(plain, add_special_tokens=False)):
            rows[i] = encoded.ids
        return [Encoded(self._finish(row, add_special_tokens)) for row in rows]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """SiglipTokenizer's ``decode``: each run of pieces decoded by SentencePiece's rules, special tokens between
        them as their text."""
        text, run, after_special = "", [], False
        for token_id in ids:
            if token_id in self._special_tokens:
                if not skip_special_tokens:
                    text += ("" if after_special else " ") + self._decode_run(run) + self._special_tokens[token_id]
                    run, after_special = [], True
            else:
                run.append(token_id)
                after_special = False
        return (text + self._decode_run(run)).strip()

    # --- SiglipTokenizer's own steps ----------------------------------------------------------------------------
    def canonicalize(self, text: str) -> str:
        """``SiglipTokenizer.canonicalize_text`` (big_vision's): lower case, ASCII punctuation removed, whitespace
        folded to single spaces, stripped."""
        if self.do_lower_case:
            text = text.lower()
        return _WHITESPACE.sub(" ", text.translate(_PUNCTUATION)).strip()

    def _with_specials(self, text: str) -> list[int]:
        parts = self._split.split(text)  # text, special, text, special, ..., text
        ids = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._special_ids[part])
            elif part:
                piece_ids = self._backend.encode(self.canonicalize(part), add_special_tokens=False).ids
                if i == 0 and piece_ids == [self._meta_id]:
                    piece_ids = []  # a lone "▁" before a special token is dropped, as transformers drops it
                ids.extend(piece_ids)
        return ids

    def _finish(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        """Truncated to the length set (the end token kept within it), then ``</s>`` unless it already ends so."""
        if not add_special_tokens:
            return ids[: self._max_length] if self._max_length else ids
        if self._max_length:
            ids = ids[: self._max_length - 1]
        return ids if ids and ids[-1] == self.eos_token_id else ids + [self.eos_token_id]

    def _decode_run(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self._hidden_names]  # a control piece ("<pad>") decodes to nothing
        text = self._backend.decode(ids, skip_special_tokens=False) if ids else ""
        return text[1:] if text.startswith(" ") else text  # SentencePiece drops the first word's space
