"""``CLIPTokenizer``: a folder's ``tokenizer.json``, BPE vocabulary files or SigLIP's ``spiece.model``, with
transformers' tokenizer calls (padding, truncation, the id/token conversions, special tokens)."""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ..hub_tokenizer import _token_text, is_siglip_sentencepiece, padding_side
from ..spiece import SPIECE_FILE, SiglipSentencePiece
from .loading import _checkpoint_processor_files, _folder, _hub_options, _model_type, _optional_files, _read_json
from .outputs import BatchEncoding


# transformers' special token attributes, in its order (``all_special_tokens``)
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLIP_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
_SIGLIP_SPECIAL = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}


class CLIPTokenizer:
    """transformers' ``CLIPTokenizer`` / ``CLIPTokenizerFast`` (and, from a SigLIP folder's ``tokenizer.json``, the
    fast tokenizer transformers runs for SigLIP): the folder's ``tokenizer.json`` (or ``vocab.json`` and
    ``merges.txt``) run by ``tokenizers``, as transformers runs them: CLIP's ``<|startoftext|>`` ...
    ``<|endoftext|>``, padded with the folder's pad token on its padding side; ``attention_mask`` where the folder's
    ``model_input_names`` have it. Its text cleaning is transformers' (CLIP's: Unicode NFC, runs of white space, lower
    case), not OpenAI's ftfy: the ids are what the model was given in transformers."""

    _FILES = ("tokenizer.json", "vocab.json", "merges.txt", SPIECE_FILE, "tokenizer_config.json",
              "special_tokens_map.json")

    def __init__(self, backend, model_max_length: int = 77, padding_side: str = "right",
                 model_input_names=("input_ids", "attention_mask"), **special_tokens):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side {padding_side!r}: expected 'right' or 'left'")
        self._backend = backend
        self._truncating = threading.Lock()  # truncation is the backend's state: one call sets it at a time
        self.model_max_length, self.padding_side = model_max_length, padding_side
        self.model_input_names = list(model_input_names)
        self.folder_settings: dict = {}  # the tokenizer_config.json it was read from, which save_pretrained keeps
        for name in _SPECIAL:
            token = special_tokens.pop(name, None)
            token_id = None if token is None else backend.token_to_id(token)
            if token is not None and token_id is None:
                raise ValueError(f"the tokenizer's {name} {token!r} is not in its vocabulary")
            setattr(self, name, token)
            setattr(self, f"{name}_id", token_id)
        if special_tokens:
            raise TypeError(f"CLIPTokenizer: {', '.join(sorted(special_tokens))} not built here")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "CLIPTokenizer":
        """From a folder or hub repo holding ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``; for a checkpoint
        in another format (clipforge's, open_clip's, OpenAI's), the tokenizer ``clipforge convert --to hf`` writes."""
        from tokenizers import Tokenizer, normalizers

        own = ("model_max_length", "padding_side", "model_input_names", *_SPECIAL)
        with _hub_options("CLIPTokenizer.from_pretrained", kwargs, own), \
                _checkpoint_processor_files(name_or_path, kwargs.get("subfolder"), cls._FILES) as converted:
            if converted is not None:  # another format's checkpoint: its tokenizer as convert --to hf writes it
                return cls.from_pretrained(converted, **{k: v for k, v in kwargs.items() if k in own})
        with _hub_options("CLIPTokenizer.from_pretrained", kwargs, own):
            folder = _folder(name_or_path, cls._FILES, kwargs.get("subfolder"))
            _optional_files(name_or_path, ("added_tokens.json",), kwargs.get("subfolder"))  # transformers 4's
        settings = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        settings.update({k: v for k, v in kwargs.items() if k in own})
        special = {k: _token_text(settings.pop(k)) for k in _SPECIAL if settings.get(k)}
        if (folder / "tokenizer.json").is_file():
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif is_siglip_sentencepiece(folder, settings):  # transformers' SiglipTokenizer, its defaults
            backend = SiglipSentencePiece.from_folder(folder, settings)
            special = {**_SIGLIP_SPECIAL, **special}
            settings.setdefault("model_max_length", 64)
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            special = {**_CLIP_SPECIAL, **special}
            backend = _bpe_backend(folder, special["bos_token"], special["eos_token"])
            _add_saved_tokens(backend, folder, settings)
        else:
            raise FileNotFoundError(f"{name_or_path}: no tokenizer.json, nor vocab.json with merges.txt, nor SigLIP's "
                                    "spiece.model (another SentencePiece model alone is run by transformers)")
        if backend.token_to_id(_CLIP_SPECIAL["eos_token"]) is not None:  # OpenAI's vocabulary: CLIPTokenizer's defaults
            special = {**_CLIP_SPECIAL, **special}
        named = str(settings.get("tokenizer_class", ""))
        siglip2 = named.startswith("Siglip2Tokenizer") or \
            (named.startswith("GemmaTokenizer") and _model_type(name_or_path, kwargs) == "siglip2")
        if siglip2:
            # transformers 5 reads a SigLIP 2 NaFlex repo's Gemma tokenizer as its Siglip2Tokenizer (and a folder
            # naming that class, as it saves one): lower case first, as SigLIP 2 was trained (transformers 4 did not)
            backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *filter(None, [backend.normalizer])])
        if not isinstance(backend, SiglipSentencePiece):
            _keep_special_whole(backend, special.values())
        backend.no_padding()
        backend.no_truncation()
        # transformers' cap for "no limit" (a huge number) means none: the model's context length bounds it anyway
        max_length = min(int(settings.get("model_max_length", 77)), 10 ** 6)
        names = settings.get("model_input_names") or ("input_ids", "attention_mask")
        side = padding_side(settings)
        tokenizer = cls(backend, max_length, side, names, **special)
        tokenizer.folder_settings = _read_json(folder / "tokenizer_config.json")
        if siglip2:  # saved under the class that lower-cases, as transformers 5 saves it
            tokenizer.folder_settings["tokenizer_class"] = "Siglip2Tokenizer"
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool | None = None, add_special_tokens: bool = True,
                 **kwargs) -> BatchEncoding:
        """``input_ids`` and ``attention_mask``: lists, or with ``return_tensors`` "pt" / "np" a [N, L] array.
        ``padding``: False, True / "longest" (to the longest text), "max_length" (to ``max_length``, by default the
        model's context length); ``truncation``: True / "longest_first" cuts to ``max_length`` keeping the end token
        (``max_length`` alone does not truncate, as in transformers)."""
        if kwargs:
            raise TypeError(f"CLIPTokenizer: {', '.join(sorted(kwargs))} not built here")
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("CLIPTokenizer takes a string or a list of strings")
        if not texts:
            raise ValueError("no texts given")
        if padding not in (False, True, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding={padding!r}: expected False, True, 'longest' or 'max_length'")
        if truncation not in (None, False, True, "do_not_truncate", "longest_first", "only_first"):
            raise ValueError(f"truncation={truncation!r}: expected True, False or 'longest_first'")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: 'pt' and 'np' are built here")
        limit = max_length or self.model_max_length
        with self._truncating:
            if truncation not in (None, False, "do_not_truncate"):
                self._backend.enable_truncation(max_length=limit)  # the template's special tokens kept within it
            try:
                rows = [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
            finally:
                self._backend.no_truncation()
        longest = max(map(len, rows), default=0)
        if longest > self.model_max_length:
            warnings.warn(f"a text is {longest} tokens, longer than this model's {self.model_max_length}: pass "
                          "truncation=True (the model refuses it as it is)", stacklevel=2)
        width = limit if padding == "max_length" else longest if padding in (True, "longest") else None
        if width is not None and self.pad_token_id is None:
            raise ValueError("this tokenizer has no pad token (pad_token): it cannot pad")

        def padded(row: list, value: int) -> list:
            pad = [value] * ((width or len(row)) - len(row))
            return pad + row if self.padding_side == "left" else row + pad

        masks = [padded([1] * len(r), 0) for r in rows]
        rows = [padded(r, self.pad_token_id) for r in rows]
        if return_tensors is not None:
            if len({len(r) for r in rows}) > 1:
                raise ValueError("the texts have different lengths: pass padding=True (or 'max_length') to make "
                                 "one tensor of them")
            convert = (lambda x: torch.tensor(x, dtype=torch.long).reshape(len(x), -1)) if return_tensors == "pt" \
                else (lambda x: np.array(x, dtype=np.int64).reshape(len(x), -1))
            rows, masks = convert(rows), convert(masks)
        elif single:
            rows, masks = rows[0], masks[0]
        out = BatchEncoding(input_ids=rows)
        if return_attention_mask or (return_attention_mask is None and "attention_mask" in self.model_input_names):
            out["attention_mask"] = masks
        return out

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int] | torch.Tensor:
        """One text's ids (``__call__``'s keywords; with ``return_tensors`` a [1, L] array)."""
        if not isinstance(text, str):
            raise TypeError("encode takes one string (call the tokenizer for a list)")
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The text's tokens as strings (CLIP's BPE pieces end a word with ``</w>``; SentencePiece's start one with
        ``▁``). From SigLIP's ``spiece.model``, characters the vocabulary lacks show as its unknown token
        (transformers' Python tokenizer shows their text there; the ids are the same)."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=add_special_tokens))

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, (int, np.integer)) or getattr(ids, "ndim", None) == 0:  # one id: its token
            return self._backend.id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in special]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Each token's id; one not in the vocabulary is the unknown token's (None where there is none)."""
        if isinstance(tokens, str):
            found = self._backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        """Every token and its id, the added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """transformers' ``add_tokens``: each new token (a string or a ``tokenizers.AddedToken``) is matched whole in
        the (lower-cased) text, never split by the BPE, and takes the next id; tokens already known keep theirs.
        Returns how many ids were added: the text model's ``resize_token_embeddings(len(tokenizer))`` makes room for
        them (what textual inversion does with its placeholder tokens). ``special_tokens``: matched as written, and
        dropped by ``decode(..., skip_special_tokens=True)``."""
        if isinstance(self._backend, SiglipSentencePiece):
            raise TypeError("add_tokens is built for tokenizer.json and CLIP's BPE files; this tokenizer is read from "
                            "SigLIP's spiece.model (transformers' SiglipTokenizer adds tokens)")
        if not new_tokens:
            return 0
        tokens = list(new_tokens) if isinstance(new_tokens, (list, tuple)) else [new_tokens]
        return self._backend.add_special_tokens(tokens) if special_tokens else self._backend.add_tokens(tokens)

    @property
    def added_tokens_decoder(self) -> dict:
        """Each added token (CLIP's start and end tokens among them) by id, as ``tokenizers.AddedToken``."""
        if isinstance(self._backend, SiglipSentencePiece):
            return {}
        return self._backend.get_added_tokens_decoder()

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """Each added token's id by its text, in id order (diffusers reads textual inversion's tokens here)."""
        return {token.content: i for i, token in sorted(self.added_tokens_decoder.items())}

    def get_added_vocab(self) -> dict[str, int]:
        return self.added_tokens_encoder

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> tuple[str, ...]:
        """transformers' tokenizer files, which transformers and ``from_pretrained`` read back to the same ids:
        ``tokenizer.json`` (the vocabulary, its rules and every added token), ``tokenizer_config.json`` (the settings
        of the folder it was read from, with this tokenizer's length, padding side, input names, special tokens and
        added tokens) and ``special_tokens_map.json``. Returns the files' paths."""
        from ..files import atomic_path, write_json

        if kwargs:
            raise TypeError(f"CLIPTokenizer.save_pretrained: {', '.join(sorted(kwargs))} not built here")
        if isinstance(self._backend, SiglipSentencePiece):
            raise TypeError("save_pretrained is built for tokenizer.json and CLIP's BPE files; this tokenizer is read "
                            "from SigLIP's spiece.model (copy that folder's files)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        special = {name: getattr(self, name) for name in _SPECIAL if getattr(self, name) is not None}
        added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                          "single_word": t.single_word, "special": t.special}
                 for i, t in sorted(self.added_tokens_decoder.items())}
        settings = {"tokenizer_class": "CLIPTokenizer", **self.folder_settings, **special,
                    "model_max_length": self.model_max_length, "padding_side": self.padding_side,
                    "model_input_names": self.model_input_names, "added_tokens_decoder": added}
        paths = tuple(folder / name for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"))
        with atomic_path(paths[2]) as temporary:
            self._backend.save(str(temporary))
        write_json(paths[0], settings)
        write_json(paths[1], special)
        return tuple(map(str, paths))

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(getattr(self, name) for name in _SPECIAL if getattr(self, name) is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._backend.token_to_id(t) for t in self.all_special_tokens]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of one row of ids (``</w>``, BPE's end of word, as a space)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


def _keep_special_whole(backend, tokens) -> None:
    """Each special token the folder names, registered as transformers registers it: matched whole in the text. It
    matters where one is an ordinary piece of the vocabulary: SDXL's second tokenizer pads with "!", so in
    transformers every "!" of a prompt is that token ("!!" two of them, where the BPE alone makes one piece)."""
    registered = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = [token for token in dict.fromkeys(tokens) if token not in registered]
    if missing:
        backend.add_special_tokens(missing)


def _add_saved_tokens(backend, folder: Path, settings: dict) -> None:
    """The tokens a folder without ``tokenizer.json`` was given, each at its saved id: transformers 4's
    ``CLIPTokenizer`` writes them to ``tokenizer_config.json``'s ``added_tokens_decoder`` and ``added_tokens.json``
    (a textual inversion saved as a full pipeline: its placeholders). Ids that do not follow the vocabulary in order
    are refused by name (the text encoder's rows would not be the tokens')."""
    from tokenizers import AddedToken

    saved = {int(i): dict(spec) for i, spec in (settings.get("added_tokens_decoder") or {}).items()}
    for content, i in _read_json(folder / "added_tokens.json").items():
        saved.setdefault(int(i), {"content": content})
    for token_id in sorted(saved):
        spec = saved[token_id]
        content, special = spec["content"], bool(spec.get("special", False))
        known = backend.token_to_id(content)
        if known is not None and known != token_id:
            raise ValueError(f"{folder}: added token {content!r} is saved as id {token_id}, but its vocabulary holds "
                             f"it as {known}")
        following = backend.get_vocab_size(with_added_tokens=True)
        if known is None and token_id != following:
            raise ValueError(f"{folder}: added token {content!r} is saved as id {token_id}, where the next id after "
                             f"its vocabulary and the tokens before it is {following}")
        if content in {t.content for t in backend.get_added_tokens_decoder().values()}:
            continue  # registered already (CLIP's start and end tokens); one of the vocabulary's is matched whole
        token = AddedToken(content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                           rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", not special),
                           special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])


def _bpe_backend(folder: Path, bos_token: str, eos_token: str):
    """OpenAI's BPE from ``vocab.json`` and ``merges.txt`` as transformers builds it: NFC, white space runs to one
    space, lower case; words, digits and punctuation runs split as OpenAI's pattern splits them, each word's last
    piece marked ``</w>``; the start and end tokens around each text."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = _read_json(folder / "vocab.json")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            unk_token=eos_token, fuse_unk=False))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    words = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([bos_token, eos_token])  # whole tokens, never split, dropped by skip_special_tokens
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A {eos_token}",
        special_tokens=[(bos_token, vocab[bos_token]), (eos_token, vocab[eos_token])])
    return backend
