"""Hugging Face transformers' CLIP and SigLIP classes answered by clipforge: a script that does
``from clipforge.transformers_api import CLIPModel, CLIPProcessor`` (or ``SiglipModel``, ``AutoModel``,
``AutoProcessor``, ``pipeline``) in place of ``from transformers import ...`` gets the same token ids, pixels and
features (``get_image_features`` / ``get_text_features``, ``model(...)``'s logits and loss) from the same folders and
hub repos, without transformers installed.

``get_*_features`` return the features as a tensor, as transformers 4 did, that also answers transformers 5's
``.pooler_output`` (the same values), so scripts written for either run. ``CLIPVisionModel`` / ``CLIPTextModel`` and
``SiglipVisionModel`` / ``SiglipTextModel`` give one tower's hidden states and attention maps (what vision-language
models read); ``interpolate_pos_encoding`` takes images of other sizes; ``Siglip2Model`` (``Siglip2VisionModel``)
with its ``Siglip2ImageProcessor`` takes SigLIP 2's NaFlex patches. What is not built here is refused by name:
SentencePiece tokenizers other than SigLIP's without a ``tokenizer.json`` (``clipforge.load`` reads those), for
one."""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .files import read_json
from .hub_tokenizer import _token_text, is_hub_name, is_siglip_sentencepiece, padding_side
from .models.clip import CLIP
from .preprocess import (INTERPOLATIONS, OPENAI_MEAN, OPENAI_STD, Decoding, Preprocess, _upright, center_crop,
                         open_image, resize_short_side, short_side_size, to_tensor)
from .spiece import SPIECE_FILE, SiglipSentencePiece


class Features(torch.Tensor):
    """Projected features as transformers 4's ``get_*_features`` returned them (a tensor) that also answer
    transformers 5's ``.pooler_output``, where its ``BaseModelOutputWithPooling`` holds them. Operations on them give
    plain tensors, and ``torch.save`` stores a plain tensor (one ``torch.load(weights_only=True)`` reads)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def pooler_output(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


class ModelOutput(dict):
    """transformers' ``ModelOutput``: fields by attribute, key or position (the fields that are set, in order)."""

    fields: tuple[str, ...] = ()

    def __init__(self, **values):
        unknown = set(values) - set(self.fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        super().__init__((k, values[k]) for k in self.fields if values.get(k) is not None)

    def __getattr__(self, name: str):
        if name in self:
            return self[name]
        if name in self.fields:
            return None
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


class CLIPOutput(ModelOutput):
    """``CLIPModel``'s output: the contrastive ``loss`` (with ``return_loss``), ``logits_per_image`` [images, texts],
    ``logits_per_text`` [texts, images], the L2-normalised ``text_embeds`` and ``image_embeds``, and the towers' own
    outputs (``text_model_output``, ``vision_model_output``: ``model.text_model``'s and ``model.vision_model``'s)."""

    fields = ("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "text_model_output",
              "vision_model_output")


class BatchEncoding(dict):
    """A processor's or tokenizer's output (``input_ids``, ``attention_mask``, ``pixel_values``) by key or attribute;
    ``.to(device)`` moves every tensor, ``.to(dtype)`` casts the floating ones (pixels), as transformers' does."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no {name!r} in this batch (it has {', '.join(self) or 'nothing'})") from None

    def to(self, *args, **kwargs) -> "BatchEncoding":
        device = kwargs.get("device", next((a for a in args if not isinstance(a, torch.dtype)), None))

        def moved(value):
            if not torch.is_tensor(value):
                return value
            if value.is_floating_point():
                return value.to(*args, **kwargs)
            return value if device is None else value.to(device)  # ids and masks keep their integer type
        return BatchEncoding({k: moved(v) for k, v in self.items()})


def _folder(name_or_path: str | os.PathLike, names: tuple[str, ...], subfolder: str | None = None) -> Path:
    """A local folder, or a hub repo's ``names`` (those it has) fetched once into the cache; ``subfolder``: the one
    inside it that holds them (diffusers' ``text_encoder``, ``tokenizer``)."""
    from .pretrained import fetch_hub_files

    inner = _inner(subfolder)
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / inner).is_dir():
            raise FileNotFoundError(f"{path}: no subfolder {inner!r}")
        return path / inner
    repo, root = _hub_cache(name_or_path)
    # one marker per set of names: the tokenizer's files and the processor's are asked for on their own
    marker = f".complete-{inner.replace('/', '--') + '--' if subfolder else ''}{'-'.join(names)}"
    return fetch_hub_files(repo, tuple(f"{inner}/{n}" if subfolder else n for n in names), root, marker) / inner


def _model_type(name_or_path, options: dict) -> str | None:
    """The ``model_type`` of the model a folder or hub repo holds (its ``config.json``), None where it has none; for
    a hub repo never fetched whose config cannot be fetched now (offline), None too."""
    from .pretrained import DownloadError

    try:
        with _hub_options("from_pretrained", {k: v for k, v in options.items() if k in _HUB_KEYWORDS}):
            folder = _folder(name_or_path, ("config.json",), options.get("subfolder"))
    except DownloadError:
        return None
    return _read_json(folder / "config.json").get("model_type")


def _inner(subfolder: str | None) -> str:
    """A ``subfolder`` keyword as a relative path inside the folder or repo ("." for none)."""
    inner = PurePosixPath(subfolder or ".")
    if inner.is_absolute() or ".." in inner.parts:
        raise ValueError(f"subfolder {subfolder!r}: a folder inside the model's folder or repo, not outside it")
    return str(inner)


def _hub_cache(name_or_path) -> tuple[str, Path]:
    """``(OWNER/NAME, where its files are kept)`` for a hub repo's name; anything else named."""
    from .pretrained import cache_dir

    repo = str(name_or_path).removeprefix("hf-hub:")
    if Path(name_or_path).exists() or "/" not in repo or not is_hub_name(repo):
        raise ValueError(f"{name_or_path}: expected a model folder or a Hugging Face Hub repo (OWNER/NAME)")
    return repo, cache_dir() / "transformers-api" / repo.replace("/", "--")


def _model_folder(name_or_path, subfolder: str | None, variant: str | None) -> Path:
    """A model's folder with its config and weights: local, or a hub repo's (``subfolder`` of it) fetched once
    into the cache, the first weights transformers would take (``checkpoint.io.weight_files``' order)."""
    from .checkpoint import CheckpointError
    from .checkpoint.io import weight_files
    from .pretrained import fetch_hub_file

    folder = _folder(name_or_path, ("config.json",), subfolder)
    if Path(name_or_path).is_dir():
        return folder
    try:
        if weight_files(folder, variant):
            return folder
    except CheckpointError:
        pass  # a shard missing: an earlier fetch was cut short, and what is missing is fetched below
    repo, root = _hub_cache(name_or_path)
    prefix = "" if subfolder is None else f"{_inner(subfolder)}/"
    weight_files(folder, variant, fetch=lambda name: fetch_hub_file(repo, prefix + name, root,
                                                                     progress=not name.endswith(".json")))
    return folder


# transformers' from_pretrained keywords that change nothing here: attention is PyTorch's fused kernel (explicit,
# as transformers' eager attention, where output_attentions asks for its maps), the tokenizer and image processor
# are this module's, the weights are read as they are
_HARMLESS = {"attn_implementation", "low_cpu_mem_usage", "use_safetensors", "trust_remote_code", "use_fast"}
_HUB_KEYWORDS = {"cache_dir", "local_files_only", "revision", "subfolder"}


@contextlib.contextmanager
def _hub_options(kind: str, options: dict, own: tuple = ()):
    """transformers' hub keywords for a ``from_pretrained``: ``cache_dir`` (where hub files are kept),
    ``local_files_only`` (nothing fetched: offline), ``revision`` (the main branch only), ``subfolder`` (read by
    ``_folder``); ``own``: the class's other keywords; anything else is named as not built."""
    from .pretrained import cache_at

    unknown = set(options) - _HARMLESS - _HUB_KEYWORDS - set(own)
    if unknown:
        raise TypeError(f"{kind}: {', '.join(sorted(unknown))} not built here")
    if options.get("revision") not in (None, "main"):
        raise ValueError("revision: only a hub repo's main branch is fetched here")
    offline, before = options.get("local_files_only"), os.environ.get("CLIPFORGE_OFFLINE")
    if offline:
        os.environ["CLIPFORGE_OFFLINE"] = "1"
    try:
        with cache_at(options.get("cache_dir")):
            yield
    finally:
        if offline and before is None:
            del os.environ["CLIPFORGE_OFFLINE"]
        elif offline:
            os.environ["CLIPFORGE_OFFLINE"] = before


def _read_json(path: Path) -> dict:
    """A folder's JSON file, or {} where it has none."""
    return read_json(path) if path.is_file() else {}


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
        """From a folder or hub repo holding ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""
        from tokenizers import Tokenizer, normalizers

        own = ("model_max_length", "padding_side", "model_input_names", *_SPECIAL)
        with _hub_options("CLIPTokenizer.from_pretrained", kwargs, own):
            folder = _folder(name_or_path, cls._FILES, kwargs.get("subfolder"))
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
        else:
            raise FileNotFoundError(f"{name_or_path}: no tokenizer.json, nor vocab.json with merges.txt, nor SigLIP's "
                                    "spiece.model (another SentencePiece model alone is run by transformers)")
        if backend.token_to_id(_CLIP_SPECIAL["eos_token"]) is not None:  # OpenAI's vocabulary: CLIPTokenizer's defaults
            special = {**_CLIP_SPECIAL, **special}
        if str(settings.get("tokenizer_class", "")).startswith(("GemmaTokenizer", "Siglip2Tokenizer")) and \
                _model_type(name_or_path, kwargs) == "siglip2":
            # transformers 5 reads a SigLIP 2 NaFlex repo's Gemma tokenizer as its Siglip2Tokenizer: lower case first,
            # as SigLIP 2 was trained (transformers 4 did not)
            backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *filter(None, [backend.normalizer])])
        backend.no_padding()
        backend.no_truncation()
        # transformers' cap for "no limit" (a huge number) means none: the model's context length bounds it anyway
        max_length = min(int(settings.get("model_max_length", 77)), 10 ** 6)
        names = settings.get("model_input_names") or ("input_ids", "attention_mask")
        side = padding_side(settings)
        return cls(backend, max_length, side, names, **special)

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


class CLIPImageProcessor:
    """transformers' ``CLIPImageProcessor``: transparency composited on white, the short side resized (bicubic, or
    as the folder's ``resample`` says), the centre cropped as transformers crops it (half the margin rounded down,
    where open_clip's crop, and ``clipforge.load``'s, rounds half to even: a pixel apart for some sizes), or the whole
    image squashed; scaled and normalised with the folder's mean and std. The 8-bit image is resized by PyTorch's
    antialiased interpolation, as transformers 5 (torchvision) resizes it: its pixels, exactly, faster (1.5-1.7x here).
    ``CLIPImageProcessorPil`` resizes with Pillow instead: transformers' class of that name (4.x's default)."""

    pillow = False

    def __init__(self, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode: str = "shortest",
                 interpolation: str = "bicubic"):
        self.settings = Preprocess(image_size, mean, std, resize_mode, interpolation)  # checked there

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "CLIPImageProcessor":
        from .checkpoint.hf import IMAGE_PROCESSOR_FILES, processor_preprocess, read_image_processor

        with _hub_options(f"{cls.__name__}.from_pretrained", kwargs):
            folder = _folder(name_or_path, IMAGE_PROCESSOR_FILES, kwargs.get("subfolder"))
        config = read_image_processor(folder)
        if not config:
            raise FileNotFoundError(f"{name_or_path}: no image processor ({' or '.join(IMAGE_PROCESSOR_FILES)})")
        kind = config.get("image_processor_type", "CLIPImageProcessor")
        if kind.startswith("Siglip2ImageProcessor"):  # SigLIP 2's NaFlex patches (AutoImageProcessor's answer)
            return (Siglip2ImageProcessorPil if cls.pillow else Siglip2ImageProcessor).from_config(config)
        if not kind.startswith(("CLIPImageProcessor", "SiglipImageProcessor")):
            raise ValueError(f"{name_or_path}: a {kind}, not CLIP's or SigLIP's image processor (clipforge.load "
                             "reads the model with its own preprocessing)")
        if config.get("resample", 3) not in (2, 3):
            raise ValueError(f"{name_or_path}: resample {config['resample']} (PIL's code): bilinear (2) and bicubic "
                             "(3) are built here")
        crop, size = config.get("crop_size"), config.get("size")
        size = crop if config.get("do_center_crop", True) and crop else size
        side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
        if not isinstance(side, int):
            raise ValueError(f"{name_or_path}: its image processor gives no image size (size / crop_size)")
        return cls(side, **processor_preprocess(config))

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchEncoding:
        """``pixel_values`` [N, 3, size, size] from a PIL image, an [H, W, 3] uint8 array or a [3, H, W] uint8
        tensor, or a list of them."""
        pixels = torch.stack([self._pixels(image) for image in _rgb_images(images, return_tensors, kwargs)])
        return BatchEncoding(pixel_values=pixels.numpy() if return_tensors == "np" else pixels)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        p = self.settings
        size, squash = p.image_size, p.resize_mode == "squash"
        if self.pillow:
            image = image.resize((size, size), INTERPOLATIONS[p.interpolation]) if squash else \
                center_crop(resize_short_side(image, size, p.interpolation), size, floor=True)
            return to_tensor(image, p.mean, p.std)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 [3, H, W]
        height, width = pixels.shape[1:]
        target = (size, size) if squash else short_side_size(width, height, size)[::-1]  # (height, width)
        if target != (height, width):  # on the 8-bit image, as torchvision resizes one
            pixels = F.interpolate(pixels[None], size=target, mode=p.interpolation, antialias=True,
                                   align_corners=False)[0]
        top, left = (target[0] - size) // 2, (target[1] - size) // 2
        pixels = pixels[:, top:top + size, left:left + size].float() / 255
        return (pixels - torch.tensor(p.mean).view(3, 1, 1)) / torch.tensor(p.std).view(3, 1, 1)


class CLIPImageProcessorPil(CLIPImageProcessor):
    """``CLIPImageProcessor`` resized by Pillow: transformers' ``CLIPImageProcessorPil`` pixels (transformers 4's
    ``CLIPImageProcessor``), exactly."""

    pillow = True


class Siglip2ImageProcessor:
    """transformers' ``Siglip2ImageProcessor`` (SigLIP 2's NaFlex models): each image resized (bilinear) at its own
    aspect ratio to the most whole patches that fit ``max_num_patches``, normalised, cut into patches and padded:
    ``pixel_values`` [N, max_num_patches, 3 * patch**2], ``pixel_attention_mask`` [N, max_num_patches],
    ``spatial_shapes`` [N, 2]. The 8-bit image is resized by PyTorch's antialiased interpolation, as transformers 5
    (torchvision) resizes it; ``Siglip2ImageProcessorPil`` resizes with Pillow (``preprocess.NaFlexPreprocess``), as
    transformers' class of that name and 4.x's default do."""

    pillow = False

    def __init__(self, patch_size: int = 16, max_num_patches: int = 256, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5)):
        from .preprocess import NaFlexPreprocess

        self.settings = NaFlexPreprocess(patch_size, max_num_patches, image_mean, image_std)  # checked there

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs):
        processor = CLIPImageProcessor.from_pretrained(name_or_path, **kwargs)
        if not isinstance(processor, Siglip2ImageProcessor):
            raise ValueError(f"{name_or_path}: its image processor is not SigLIP 2's (Siglip2ImageProcessor)")
        return processor if processor.pillow == cls.pillow else cls(*processor._arguments())

    @classmethod
    def from_config(cls, config: dict) -> "Siglip2ImageProcessor":
        if config.get("resample", 2) != 2 or not config.get("do_resize", True):
            raise ValueError("a Siglip2ImageProcessor that does not resize bilinearly is not built here")
        return cls(config.get("patch_size", 16), config.get("max_num_patches", 256),
                   config.get("image_mean", (0.5,) * 3), config.get("image_std", (0.5,) * 3))

    def _arguments(self) -> tuple:
        p = self.settings
        return p.patch_size, p.max_patches, p.mean, p.std

    @property
    def patch_size(self) -> int:
        return self.settings.patch_size

    @property
    def max_num_patches(self) -> int:
        return self.settings.max_patches

    def __call__(self, images, return_tensors: str | None = "pt", max_num_patches: int | None = None,
                 **kwargs) -> BatchEncoding:
        """A PIL image, an [H, W, 3] uint8 array or a [3, H, W] uint8 tensor, or a list of them; ``max_num_patches``
        for this call (more detail: up to the model's position grid, which is resized to each image's)."""
        from .preprocess import NaFlexPreprocess, naflex_batch

        batch = _rgb_images(images, return_tensors, kwargs)
        settings = self.settings
        if max_num_patches is not None:
            settings = NaFlexPreprocess(settings.patch_size, max_num_patches, settings.mean, settings.std)
        out = naflex_batch([self._patches(settings, image) for image in batch])
        return BatchEncoding({k: v.numpy() if return_tensors == "np" else v for k, v in out.items()})

    def _patches(self, settings, image: Image.Image) -> dict:
        if self.pillow:
            return settings(image)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 [3, H, W]
        target = settings.target_size(*pixels.shape[1:])
        if target != tuple(pixels.shape[1:]):  # on the 8-bit image, as torchvision resizes one
            pixels = F.interpolate(pixels[None], size=target, mode="bilinear", antialias=True, align_corners=False)[0]
        return settings.patches((pixels.float() / 255 - torch.tensor(settings.mean).view(3, 1, 1))
                                / torch.tensor(settings.std).view(3, 1, 1))


class Siglip2ImageProcessorPil(Siglip2ImageProcessor):
    """``Siglip2ImageProcessor`` resized by Pillow: transformers' ``Siglip2ImageProcessorPil`` pixels."""

    pillow = True


def _rgb_images(images, return_tensors: str | None, unknown: dict) -> list[Image.Image]:
    """An image processor's input (a PIL image, an [H, W, 3] uint8 array or a [3, H, W] uint8 tensor, or a list of
    them) as RGB PIL images; its options checked."""
    if unknown:
        raise TypeError(f"image processor: {', '.join(sorted(unknown))} not built here")
    if return_tensors not in (None, "pt", "np"):
        raise ValueError(f"return_tensors={return_tensors!r}: 'pt' and 'np' are built here")
    batch = images if isinstance(images, (list, tuple)) else [images]
    if not batch:
        raise ValueError("no images given")
    return [_rgb(_as_pil(image)) for image in batch]


def _rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency composited on white (as transformers' processors convert; Pillow's convert drops it)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if torch.is_tensor(image):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
            raise ValueError(f"an image tensor must be [3, H, W] (or [1, H, W]) uint8; got {tuple(image.shape)} "
                             f"{image.dtype}")
        image = image.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"an image array must be [H, W, 3] or [H, W] uint8; got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    raise TypeError(f"expected a PIL image, a uint8 array or tensor; got {type(image).__name__}")


class CLIPProcessor:
    """transformers' ``CLIPProcessor``: ``processor(text=..., images=..., return_tensors="pt", padding=True)`` gives
    ``input_ids``, ``attention_mask`` and ``pixel_values`` in one batch. Text and images may also be given by
    position in either order (transformers 4 took text first, 5 takes images first)."""

    def __init__(self, image_processor: CLIPImageProcessor | None = None, tokenizer: CLIPTokenizer | None = None):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "CLIPProcessor":
        """The folder's (or hub repo's) image processor and tokenizer; transformers' hub keywords as
        ``CLIPModel.from_pretrained`` takes them."""
        return cls(CLIPImageProcessor.from_pretrained(name_or_path, **kwargs),
                   CLIPTokenizer.from_pretrained(name_or_path, **kwargs))

    def __call__(self, *args, text=None, images=None, return_tensors: str | None = None, **kwargs) -> BatchEncoding:
        for value in args:
            is_text = isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                                 and all(isinstance(v, str) for v in value))
            if is_text and text is None:
                text = value
            elif not is_text and images is None:
                images = value
            else:
                raise TypeError("CLIPProcessor takes one text batch and one image batch")
        if text is None and images is None:
            raise ValueError("give text=..., images=..., or both")
        out = BatchEncoding()
        image_options = {k: kwargs.pop(k) for k in ("max_num_patches",) if k in kwargs}  # Siglip2's, per call
        if text is None and kwargs:
            raise TypeError(f"CLIPProcessor: {', '.join(sorted(kwargs))} apply to text, and none was given")
        if isinstance(self.image_processor, Siglip2ImageProcessor):  # Siglip2Processor's text defaults
            kwargs = {"padding": "max_length", "truncation": True, "max_length": 64, **kwargs}
        if text is not None:
            out.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        if images is not None:
            out.update(self.image_processor(images, return_tensors=return_tensors, **image_options))
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens)


class _Config:
    """A config's keys as attributes (``model.config.projection_dim``, ``model.config.vision_config.image_size``)."""

    def __init__(self, values: dict):
        for key, value in values.items():
            setattr(self, key, _Config(value) if isinstance(value, dict) else value)

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, _Config) else v for k, v in vars(self).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


class AutoConfig:
    """transformers' ``AutoConfig`` (``CLIPConfig``, ``SiglipConfig``) ``.from_pretrained``: a model folder's or hub
    repo's ``config.json`` keys as attributes (``config.projection_dim``, ``config.vision_config.image_size``), with
    transformers' values for what the file leaves out (Google's SigLIP configs are sparse); for a checkpoint clipforge
    reads in another format, the config ``CLIPModel.from_pretrained(...).config`` gives; for a folder holding one
    tower (diffusers' ``text_encoder``), that tower's config."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> _Config:
        from .checkpoint.hf import MODEL_TYPES, TOWER_TYPES, config_from_clipforge, config_to_clipforge
        from .checkpoint.hf import tower_config_to_clipforge
        from .models import merge_config

        path = Path(name_or_path)
        if not path.is_file():
            with _hub_options("AutoConfig.from_pretrained", kwargs):
                path = _folder(name_or_path, ("config.json",), kwargs.get("subfolder"))
        own = _read_json(path / "config.json") if path.is_dir() else {}
        scale = own.get("logit_scale_init_value", 2.6592)  # CLIPConfig's default
        if own.get("model_type") in TOWER_TYPES:
            config, side = tower_config_to_clipforge(own)
            return _Config(merge_config(config_from_clipforge(config, scale)[f"{side}_config"], own))
        if own.get("model_type") not in MODEL_TYPES:  # clipforge's, open_clip's or OpenAI's weights
            return CLIPModel.from_pretrained(name_or_path, **kwargs).config
        return _Config(merge_config(config_from_clipforge(config_to_clipforge(own), scale), own))


class CLIPTextConfig(AutoConfig):
    """transformers' ``CLIPTextConfig`` (``SiglipTextConfig``) ``.from_pretrained``: the text tower's config, of a
    whole model's folder or of one holding the tower alone."""

    tower = "text_config"

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> _Config:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        return getattr(config, cls.tower, config)  # a one-tower folder's config is the tower's


class CLIPVisionConfig(CLIPTextConfig):
    """transformers' ``CLIPVisionConfig`` (``SiglipVisionConfig``): the image tower's config."""

    tower = "vision_config"


class CLIPModel(torch.nn.Module):
    """transformers' ``CLIPModel`` over a clipforge ``CLIP`` (``self.clip``): ``from_pretrained`` reads what
    ``clipforge.load`` reads (transformers' folders and hub repos, open_clip's, OpenAI's, clipforge's); the state
    dict is clipforge's, under ``clip.``, and ``save_pretrained`` writes a folder transformers loads."""

    def __init__(self, clip: CLIP):
        super().__init__()
        if not isinstance(clip, CLIP):
            raise TypeError(f"CLIPModel wraps a clipforge CLIP model, not a {type(clip).__name__}")
        self.clip = clip

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype=None, torch_dtype=None, device_map=None,
                        **kwargs) -> "CLIPModel":
        """A folder, a hub repo (``OWNER/NAME``, fetched once into clipforge's cache, or ``cache_dir``; nothing
        fetched with ``local_files_only``) or a checkpoint file. ``dtype`` (``torch_dtype``): float32 unless given
        ("auto" keeps float32: the weights are read into clipforge's float32 model). ``device_map``: a device, or
        "auto" (a GPU where there is one)."""
        clip = _load_clip(name_or_path, dtype if dtype is not None else torch_dtype, device_map, kwargs)
        model_class = AutoModel.model_class(clip)
        if model_class is not cls and cls is not AutoModel:
            raise ValueError(f"{name_or_path}: a {model_class.__name__[:-5]} model; load it with "
                             f"{model_class.__name__}.from_pretrained")
        return model_class(clip).eval()

    @property
    def config(self) -> _Config:
        """transformers' config for this model (``CLIPConfig``'s keys, or ``SiglipConfig``'s); one that neither
        can hold (a Hugging Face text encoder, a ResNet) is named."""
        from .checkpoint.hf import config_from_clipforge

        return _Config(config_from_clipforge(self.clip.config, float(self.clip.logit_scale.detach())))

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.visual.parameters()).dtype

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        return self.clip.logit_scale

    @property
    def vision_model(self) -> "CLIPVisionModel":
        """transformers' ``model.vision_model``: the image tower's states (``last_hidden_state``, the post-norm
        ``pooler_output``, ``hidden_states``, ``attentions``), sharing this model's weights."""
        return _tower_classes(self)[0](self.clip)

    @property
    def text_model(self) -> "CLIPTextModel":
        """transformers' ``model.text_model``: the text transformer's states, sharing this model's weights."""
        return _tower_classes(self)[1](self.clip)

    @property
    def visual_projection(self) -> "Projection":
        """transformers' ``model.visual_projection``: the image tower's pooled state to the joint space."""
        return Projection(self.clip.visual.proj)

    @property
    def text_projection(self) -> "Projection":
        return Projection(self.clip.text.text_projection)

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> None:
        """A transformers ``CLIPModel`` folder (``config.json``, ``model.safetensors``, the tokenizer and processor
        files), as ``clipforge convert --to hf`` writes it."""
        from .checkpoint import hf

        if set(kwargs) - {"safe_serialization"} or not kwargs.get("safe_serialization", True):
            raise TypeError("save_pretrained writes safetensors; other options are not built here")
        hf.save(self.clip, folder)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, **kwargs) -> Features:
        """The projected text features [N, D], not normalised."""
        _refuse(kwargs, position_ids=position_ids)
        text = self.clip.text
        if attention_mask is not None and not bool(attention_mask.all()):
            if not hasattr(text, "features_masked"):
                raise ValueError("attention_mask masks padding, which this model's text tower (a Hugging Face "
                                 "encoder) is not given here: pass input_ids alone")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                                 f"{tuple(input_ids.shape)}")
            if not text.causal:  # SigLIP's: every position would see the padding; transformers hides it
                return text.features_masked(input_ids, attention_mask).as_subclass(Features)
            _check_right_padded(input_ids, attention_mask, text)
        return self.clip.encode_text(input_ids).as_subclass(Features)

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                           **kwargs) -> Features:
        """The projected image features [N, D], not normalised. ``interpolate_pos_encoding``: images of another size
        than the model's, its position grid resized to theirs as transformers resizes it (bicubic)."""
        _refuse(kwargs)
        if not interpolate_pos_encoding:
            return self.clip.encode_image(pixel_values).as_subclass(Features)
        tower = _positioned_tower(self.clip)
        return tower(_pixels_for(tower, pixel_values), interpolate_positions=True).as_subclass(Features)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_loss: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, interpolate_pos_encoding: bool = False,
                **kwargs) -> CLIPOutput:
        """Both towers, their normalised embeddings and the scaled cosine similarities (the temperature unclamped,
        as transformers'); ``return_loss``: CLIP's symmetric cross-entropy over the batch's pairs. The towers'
        outputs, ``vision_model_output`` and ``text_model_output``, as transformers 5 gives them: the projected
        features as ``pooler_output`` (transformers 4's was the tower's own: ``model.vision_model(...)`` gives it)
        and, with ``output_hidden_states`` / ``output_attentions``, ``last_hidden_state``, ``hidden_states`` and
        ``attentions``. Without either, the last blocks run for the pooled token alone (about a tenth less work):
        reading ``last_hidden_state`` then names the flag to pass."""
        return self._forward({"pixel_values": pixel_values, "interpolate_pos_encoding": interpolate_pos_encoding},
                             input_ids, attention_mask, position_ids, return_loss,
                             {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions},
                             kwargs)

    def _forward(self, image_inputs: dict, input_ids, attention_mask, position_ids, return_loss, asked: dict,
                 kwargs: dict) -> CLIPOutput:
        """``forward`` for the image inputs each model takes (``get_image_features``' keywords)."""
        if input_ids is None or image_inputs["pixel_values"] is None:
            raise ValueError(f"{type(self).__name__}'s forward takes both input_ids and pixel_values; "
                             "get_text_features and get_image_features take one")
        _refuse(kwargs)
        if any(asked.values()):  # a tower that is not transformers' kind (a ResNet, a BERT) is named here
            vision_model, text_model = self.vision_model, self.text_model
            # as transformers 5 gives them: each tower's states with its projected features as pooler_output
            # (transformers 4's was the tower's own, unprojected: model.vision_model(...) gives that)
            vision_output = vision_model(**image_inputs, **asked)
            text_output = text_model(input_ids, attention_mask, position_ids, **asked)
            image_features, text_features = vision_model.embeds(vision_output), text_model.embeds(text_output)
            vision_output = BaseModelOutputWithPooling(**{**vision_output, "pooler_output": image_features})
            text_output = BaseModelOutputWithPooling(**{**text_output, "pooler_output": text_features})
        else:
            image_features = self.get_image_features(**image_inputs)
            text_features = self.get_text_features(input_ids, attention_mask, position_ids)
            vision_output = _PooledOutput(pooler_output=image_features)
            text_output = _PooledOutput(pooler_output=text_features)
        image_embeds, text_embeds = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        logits_per_text, loss, output = self._logits_and_loss(text_embeds, image_embeds, return_loss)
        return output(loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                      text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_output,
                      vision_model_output=vision_output)

    def _logits_and_loss(self, text_embeds, image_embeds, return_loss):
        logits_per_text = self.clip.logit_scale.exp() * text_embeds @ image_embeds.t()
        loss = None
        if return_loss:
            labels = torch.arange(len(logits_per_text), device=logits_per_text.device)
            loss = (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2
        return logits_per_text, loss, CLIPOutput


class Projection(torch.nn.Module):
    """A tower's projection as transformers holds it (a ``Linear`` without bias: ``weight`` is [out, in]) over
    clipforge's [in, out] matrix, the same tensor."""

    def __init__(self, matrix: torch.Tensor | None):
        super().__init__()
        if matrix is None:
            raise ValueError("this tower has no projection (pruned by prune_intermediate_layers)")
        self.matrix = matrix

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


class SiglipOutput(CLIPOutput):
    """``SiglipModel``'s output: ``CLIPOutput``'s fields, the logits with SigLIP's bias and its sigmoid loss."""


class SiglipModel(CLIPModel):
    """transformers' ``SiglipModel`` over a clipforge SigLIP model: ``CLIPModel``'s calls, the logits
    ``scale * cos + bias`` and, with ``return_loss``, the pairwise sigmoid loss. Without an ``attention_mask`` the
    text tower attends to every position, padding included, as SigLIP was trained (Google's SigLIP tokenizers give
    none); with one (SigLIP 2's Gemma tokenizer gives one) padding is hidden, as transformers hides it."""

    def _logits_and_loss(self, text_embeds, image_embeds, return_loss):
        from .loss import SigLipLoss

        scale, bias = self.clip.logit_scale.exp(), self.clip.logit_bias
        logits_per_text = scale * text_embeds @ image_embeds.t() + bias
        loss = SigLipLoss()(image_embeds, text_embeds, scale, bias) if return_loss else None
        return logits_per_text, loss, SiglipOutput

    def _absent(self):
        raise AttributeError  # then nn.Module's __getattr__ names the attribute, as for any other it lacks

    # transformers' SiglipModel has neither (its heads are in its towers): hasattr is False here too
    visual_projection = text_projection = property(_absent)


class Siglip2Model(SiglipModel):
    """transformers' ``Siglip2Model`` over a SigLIP 2 NaFlex model: images as its image processor gives them, each at
    its own aspect ratio (``pixel_values`` [N, patches, 3 * patch**2], ``pixel_attention_mask``, ``spatial_shapes``),
    the position grid resized to each image's; ``SiglipModel``'s logits and sigmoid loss; its towers
    ``Siglip2VisionModel`` / ``Siglip2TextModel``."""

    def get_image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                           spatial_shapes: torch.Tensor | None = None, **kwargs) -> Features:
        """The image embeddings [N, D], not normalised."""
        _refuse(kwargs)
        batch = _naflex_inputs(pixel_values, pixel_attention_mask, spatial_shapes, "Siglip2Model")
        return self.clip.encode_image(batch).as_subclass(Features)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                pixel_attention_mask: torch.Tensor | None = None, spatial_shapes: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_loss: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs) -> SiglipOutput:
        """Both towers, their normalised embeddings, the logits ``scale * cos + bias`` and, with ``return_loss``,
        the pairwise sigmoid loss; the towers' outputs as ``CLIPModel``'s forward gives them."""
        image_inputs = {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask,
                        "spatial_shapes": spatial_shapes}
        return self._forward(image_inputs, input_ids, attention_mask, position_ids, return_loss,
                             {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions},
                             kwargs)


def _naflex_inputs(pixel_values, pixel_attention_mask, spatial_shapes, who: str) -> dict:
    """A NaFlex batch (``models.siglip_vision.is_naflex_batch``) from a Siglip2 image processor's outputs."""
    if spatial_shapes is None:
        raise ValueError(f"{who} takes its image processor's pixel_values with spatial_shapes (and "
                         "pixel_attention_mask)")
    batch = {"pixel_values": pixel_values, "spatial_shapes": spatial_shapes}
    if pixel_attention_mask is not None:
        batch["pixel_attention_mask"] = pixel_attention_mask
    return batch


class AutoModel(CLIPModel):
    """transformers' ``AutoModel`` for the models these classes answer: ``from_pretrained`` gives a ``CLIPModel``
    or a ``SiglipModel``, as the folder's model is."""

    @staticmethod
    def model_class(clip: CLIP) -> type:
        from .checkpoint.hf import is_siglip
        from .models import is_naflex

        if is_naflex(clip.config):
            return Siglip2Model
        return SiglipModel if is_siglip(clip.config) else CLIPModel


class BaseModelOutputWithPooling(ModelOutput):
    """A tower's output (``CLIPVisionModel``'s, ``CLIPTextModel``'s, the Siglip ones'): ``last_hidden_state`` and
    ``pooler_output`` as each class describes them; with ``output_hidden_states`` ``hidden_states``: the blocks'
    input and every block's output, as transformers counts them (``hidden_states[-2]``: the next-to-last block's,
    which LLaVA reads); with ``output_attentions`` ``attentions``: every block's attention map [N, heads, L, L]."""

    fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class _PooledOutput(BaseModelOutputWithPooling):
    """A tower's output from ``CLIPModel``'s forward without ``output_hidden_states`` / ``output_attentions``: the
    projected features as ``pooler_output``; the states were not computed, and asking for them says how to."""

    def __getattr__(self, name: str):
        if name == "last_hidden_state":
            raise AttributeError("last_hidden_state: CLIPModel's forward computes the towers' states with "
                                 "output_hidden_states=True (or output_attentions=True); model.vision_model(...) and "
                                 "model.text_model(...) give them too")
        return super().__getattr__(name)


class CLIPVisionModelOutput(ModelOutput):
    """``CLIPVisionModelWithProjection``'s output: the projected ``image_embeds`` beside the states."""

    fields = ("image_embeds", "last_hidden_state", "hidden_states", "attentions")


class CLIPTextModelOutput(ModelOutput):
    """``CLIPTextModelWithProjection``'s output: the projected ``text_embeds`` beside the states."""

    fields = ("text_embeds", "last_hidden_state", "hidden_states", "attentions")


def _run_blocks(transformer, x: torch.Tensor, output_hidden_states, output_attentions, causal: bool = False,
                attn_mask: torch.Tensor | None = None):
    """A tower's blocks over their input ``x``: ``(last output, hidden_states or None, attentions or None)`` as
    transformers gives them (the hidden states: ``x`` and every block's output)."""
    maps = None
    if output_attentions:
        last, blocks, maps = transformer.forward_attentions(x, causal, attn_mask)
    elif output_hidden_states:
        last, blocks = transformer.forward_intermediates(x, causal=causal, attn_mask=attn_mask)
    else:
        last = transformer(x, causal=causal, attn_mask=attn_mask)
    return last, (x, *blocks) if output_hidden_states else None, None if maps is None else tuple(maps)


class _TowerModel(torch.nn.Module):
    """One tower of a CLIP or SigLIP model, as transformers' tower classes load it: from a whole model's folder, or
    from a folder transformers saved one tower in (``CLIPTextModel`` ... alone: diffusers' ``text_encoder``,
    IP-Adapter's ``image_encoder``, a vision-language model's SigLIP tower). ``config``: that tower's part of
    transformers' config (``config_key``)."""

    config_key = ""
    family = "CLIPModel"  # the whole model's class, as AutoModel.model_class names it
    projected = False  # the ...WithProjection classes: a one-tower folder must hold the projection

    def __init__(self, clip: CLIP | None = None, *, tower: torch.nn.Module | None = None,
                 model_config: dict | None = None):
        """``clip``: a whole model, whose tower this is (sharing its weights); or ``tower`` alone with the clipforge
        ``model_config`` it was built from (a one-tower folder's, ``checkpoint.hf.tower_config_to_clipforge``)."""
        super().__init__()
        self._logit_scale = 2.6592  # CLIPConfig's default, for a tower saved alone
        if clip is not None:
            tower, model_config = self._tower_of(clip), clip.config
            self._logit_scale = float(clip.logit_scale.detach())
        self._model_config = model_config
        self._attach(tower)

    @property
    def config(self) -> _Config:
        from .checkpoint.hf import config_from_clipforge

        return _Config(config_from_clipforge(self._model_config, self._logit_scale)[self.config_key])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype=None, torch_dtype=None, device_map=None,
                        **kwargs):
        """As ``CLIPModel.from_pretrained`` reads a whole model's folder or hub repo; or a one-tower folder
        (``subfolder``: the one inside a repo or folder that holds it, diffusers' "text_encoder"; ``variant``: its
        weights' variant, diffusers' "fp16": ``model.fp16.safetensors``)."""
        dtype = dtype if dtype is not None else torch_dtype
        folder = _one_tower_folder(name_or_path, kwargs)
        if folder is not None:
            return _placed(cls._from_tower_folder(folder, name_or_path, kwargs.get("variant")), dtype,
                           device_map).eval()
        clip = _load_clip(name_or_path, dtype, device_map, kwargs)
        family = AutoModel.model_class(clip).__name__
        if family != cls.family:
            raise ValueError(f"{name_or_path}: a {family[:-5]} model; {cls.__name__} reads a {cls.family[:-5]} "
                             "model's towers")
        return cls(clip).eval()

    @classmethod
    def _from_tower_folder(cls, folder: Path, name, variant: str | None) -> "_TowerModel":
        """The tower a one-tower folder holds, built from its ``config.json`` and loaded from its weights."""
        from .checkpoint import CheckpointError
        from .checkpoint.hf import TOWER_TYPES, to_clipforge, tower_config_to_clipforge
        from .checkpoint.io import read_weight_files, weight_file_names, weight_files
        from .models.clip import build_text_tower, build_vision_tower

        folder_config = _read_json(folder / "config.json")
        model_type = folder_config["model_type"]
        family, side = TOWER_TYPES[model_type]
        if ({"clip": "CLIPModel", "siglip": "SiglipModel"}[family], side) != (cls.family, cls.config_key[:-7]):
            raise ValueError(f"{name}: a transformers {model_type} folder; {cls.__name__} reads a {cls.family[:-5]} "
                             f"model's {cls.config_key[:-7]} tower")
        config, _ = tower_config_to_clipforge(folder_config)
        build = build_text_tower if side == "text" else build_vision_tower
        tower = build(config[f"{side}_cfg"], config["embed_dim"], config.get("quick_gelu", False))
        files = weight_files(folder, variant)
        if not files:
            raise FileNotFoundError(f"{name}: no weights (none of {', '.join(weight_file_names(variant))})")
        # transformers 4 saved a tower under its model's prefix (text_model.), 5 may save it bare
        prefix, projections = f"{side}_model.", ("text_projection.", "visual_projection.")
        state = {k if k.startswith((prefix, *projections)) else prefix + k: v
                 for k, v in read_weight_files(files).items()}
        mine = "text." if side == "text" else "visual."
        state = to_clipforge(state)
        strays = sorted(k for k in state if not k.startswith(mine))
        if strays:
            raise CheckpointError(f"{name}: a {model_type} folder holding another tower's weights ({strays[0]})")
        loaded = tower.load_state_dict({k[len(mine):]: v for k, v in state.items()}, strict=False)
        projection = "text_projection" if side == "text" else "proj"
        absent = set(loaded.missing_keys)
        optional = {projection} | ({k for k in absent if k.startswith("head.")} if family == "siglip" else set())
        if absent - optional or loaded.unexpected_keys:
            wrong = sorted(absent - optional) or sorted(loaded.unexpected_keys)
            raise CheckpointError(f"{name}: its weights do not fit the {model_type} its config describes "
                                  f"({'missing' if absent - optional else 'unexpected'} {wrong[0]})")
        if projection in absent:  # a CLIPTextModel / CLIPVisionModel saved without its projection
            if cls.projected:
                raise ValueError(f"{name}: a {folder_config.get('architectures', [model_type])[0]} folder holds no "
                                 f"projection; {cls.__name__} needs one ({cls.__name__[:-14]} reads it)")
            setattr(tower, projection, None)
        if family == "siglip" and side == "vision" and "head.probe" in absent:  # vision_use_head: false
            tower.head = None
        return cls(tower=tower, model_config=config)


def _one_tower_folder(name_or_path, options: dict) -> Path | None:
    """The folder of a one-tower model (``config.json``'s model_type a tower's: ``checkpoint.hf.TOWER_TYPES``),
    local or fetched from the hub with its weights; None where ``name_or_path`` is a whole model's."""
    from .checkpoint.hf import TOWER_TYPES
    from .pretrained import DownloadError

    subfolder, path = options.get("subfolder"), Path(name_or_path)
    with _hub_options("from_pretrained", dict(options), own=("variant",)):
        if path.is_dir():
            folder = path / _inner(subfolder)
        elif path.exists():
            return None  # a checkpoint file
        else:
            try:
                folder = _folder(name_or_path, ("config.json",), subfolder)
            except DownloadError:
                if subfolder is not None:
                    raise
                return None  # offline, a whole model fetched before by load_model: _load_clip reads it
        if _read_json(folder / "config.json").get("model_type") not in TOWER_TYPES:
            return None
        return _model_folder(name_or_path, subfolder, options.get("variant"))


class _VisionTowerModel(_TowerModel):
    config_key = "vision_config"

    @staticmethod
    def _tower_of(clip: CLIP) -> torch.nn.Module:
        return clip.visual

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                interpolate_pos_encoding: bool = False, output_attentions: bool | None = None,
                **kwargs) -> BaseModelOutputWithPooling:
        """``interpolate_pos_encoding``: images of another size than the model's, its position grid resized to
        theirs as transformers resizes it (bicubic)."""
        last, pooled, hidden, maps = self._states(pixel_values, output_hidden_states, output_attentions,
                                                  interpolate_pos_encoding, kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden,
                                          attentions=maps)

    def _states(self, pixel_values, output_hidden_states, output_attentions, interpolate_pos_encoding, kwargs):
        _refuse(kwargs)
        tower = self.vision
        x = tower._tokens(_pixels_for(tower, pixel_values), interpolate_pos_encoding)
        last, hidden, maps = _run_blocks(tower.transformer, x, output_hidden_states, output_attentions)
        return (*self._pooled(last), hidden, maps)


class CLIPVisionModel(_VisionTowerModel):
    """transformers' ``CLIPVisionModel``: a CLIP model's ViT image tower alone (``self.vision``, clipforge's
    ``VisionTransformer``; the text tower is not kept): ``last_hidden_state`` [N, 1 + patches, width] (the last
    block's, before ``post_layernorm``), ``pooler_output`` [N, width] (the class token after it); what
    vision-language models (LLaVA's ``hidden_states[-2]``) load for patch features. ``config``: the vision config's
    keys (``hidden_size``, ``image_size``, ``patch_size`` ...)."""

    def _attach(self, tower: torch.nn.Module) -> None:
        from .models.vision_transformer import VisionTransformer

        if type(tower) is not VisionTransformer or tower.pool != "tok" or tower.final_ln_after_pool:
            averaged = " pooled by averaging" if getattr(tower, "pool", "") == "avg" else ""
            raise ValueError("CLIPVisionModel is CLIP's ViT image tower pooled at its class token; this model's is "
                             f"a {type(tower).__name__}{averaged}")
        self.vision = tower

    def _pooled(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return last, self.vision.ln_post(last[:, 0])

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        """The projected image features (``get_image_features``'), from this tower's output."""
        return self.vision._project(output.pooler_output)


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """transformers' ``CLIPVisionModelWithProjection``: ``CLIPVisionModel``'s states and the projected
    ``image_embeds`` (what ``CLIPModel.get_image_features`` gives)."""

    projected = True

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                interpolate_pos_encoding: bool = False, output_attentions: bool | None = None,
                **kwargs) -> CLIPVisionModelOutput:
        output = super().forward(pixel_values, output_hidden_states, interpolate_pos_encoding, output_attentions,
                                 **kwargs)
        return CLIPVisionModelOutput(image_embeds=self.embeds(output), last_hidden_state=output.last_hidden_state,
                                     hidden_states=output.hidden_states, attentions=output.attentions)


class SiglipVisionModel(_VisionTowerModel):
    """transformers' ``SiglipVisionModel``: a SigLIP model's image tower alone (``self.vision``, clipforge's
    ``SigLIPVisionTransformer``), what vision-language models (PaliGemma's, LLaVA-OneVision's) load:
    ``last_hidden_state`` [N, patches, width] after the final LayerNorm (``post_layernorm``), ``pooler_output`` the
    attention pooling's [N, width] (SigLIP's image embedding)."""

    family = "SiglipModel"

    def _attach(self, tower: torch.nn.Module) -> None:
        from .models.siglip_vision import SigLIPVisionTransformer

        if type(tower) is not SigLIPVisionTransformer or tower.naflex:
            kind = type(tower).__name__ + (" (NaFlex)" if getattr(tower, "naflex", False) else "")
            raise ValueError(f"SiglipVisionModel is SigLIP's fixed-size image tower; this model's is a {kind}")
        self.vision = tower

    def _pooled(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        last = self.vision.ln_post(last)
        return last, None if self.vision.head is None else self.vision.head(last)  # None: saved without its head

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        return output.pooler_output


class _TextTowerModel(_TowerModel):
    config_key = "text_config"

    @staticmethod
    def _tower_of(clip: CLIP) -> torch.nn.Module:
        return clip.text

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The token embedding, as transformers' ``get_input_embeddings`` gives it (textual inversion reads it)."""
        return self.text.token_embedding

    @property
    def final_layer_norm(self) -> torch.nn.Module:
        """The last LayerNorm, where scripts reach for it (diffusers' clip skip applies it to an earlier block's
        output): transformers 5's ``model.final_layer_norm``, 4's ``model.text_model.final_layer_norm``."""
        return self.text.ln_final

    @property
    def embeddings(self) -> SimpleNamespace:
        """``embeddings.token_embedding`` (transformers 5's layout; 4's under ``text_model``)."""
        return SimpleNamespace(token_embedding=self.text.token_embedding)

    @property
    def text_model(self) -> SimpleNamespace:
        """transformers 4's ``model.text_model``: ``final_layer_norm`` and ``embeddings``, this tower's own."""
        return SimpleNamespace(final_layer_norm=self.final_layer_norm, embeddings=self.embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        last, pooled, hidden, maps = self._states(input_ids, attention_mask, position_ids, output_hidden_states,
                                                  output_attentions, kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden,
                                          attentions=maps)

    def _states(self, input_ids, attention_mask, position_ids, output_hidden_states, output_attentions, kwargs):
        from .models.inputs import check_token_batch

        _refuse(kwargs, position_ids=position_ids)
        tower = self.text
        check_token_batch(input_ids, tower.context_length)
        x, mask = tower._embed(input_ids), None
        if attention_mask is not None and not bool(attention_mask.all()):
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                                 f"{tuple(input_ids.shape)}")
            mask = self._visible(attention_mask.to(device=x.device, dtype=torch.bool))
        last, hidden, maps = _run_blocks(tower.transformer, x, output_hidden_states, output_attentions,
                                         causal=tower.causal and mask is None, attn_mask=mask)
        last = tower.ln_final(last)
        pooled = last[torch.arange(len(last), device=last.device), tower._pool_index(input_ids)]
        return last, self._head(pooled), hidden, maps


class CLIPTextModel(_TextTowerModel):
    """transformers' ``CLIPTextModel``: a CLIP model's text transformer alone (``self.text``; the image tower is not
    kept). ``last_hidden_state`` [N, L, width] after ``final_layer_norm``, ``pooler_output`` at each text's end token.
    An ``attention_mask`` hides padding from every position, as transformers' does (the states of the text's own
    tokens are the same either way: they see nothing after them)."""

    def _attach(self, tower: torch.nn.Module) -> None:
        from .models.text_transformer import TextTransformer

        if type(tower) is not TextTransformer or not tower.causal:
            kind = type(tower).__name__ + ("" if getattr(tower, "causal", True) else " attending both ways")
            raise ValueError(f"CLIPTextModel is CLIP's causal text transformer; this model's text tower is a {kind}")
        self.text = tower

    @staticmethod
    def _visible(attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, 1, L, L]: the keys each position sees: those before it that the mask keeps."""
        length = attention_mask.shape[-1]
        causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        mask = attention_mask[:, None, None, :] & causal
        return (mask | ~mask.any(dim=-1, keepdim=True)) & causal  # a row left nothing to see sees all it may

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        """The projected text features (``get_text_features``'), from this tower's output."""
        return self.text._project(output.pooler_output)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' ``CLIPTextModelWithProjection``: ``CLIPTextModel``'s states and the projected ``text_embeds``
    (what ``CLIPModel.get_text_features`` gives)."""

    projected = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, **kwargs) -> CLIPTextModelOutput:
        output = super().forward(input_ids, attention_mask, position_ids, output_hidden_states, output_attentions,
                                 **kwargs)
        return CLIPTextModelOutput(text_embeds=self.embeds(output), last_hidden_state=output.last_hidden_state,
                                   hidden_states=output.hidden_states, attentions=output.attentions)


class SiglipTextModel(_TextTowerModel):
    """transformers' ``SiglipTextModel``: a SigLIP model's text transformer alone (``self.text``), attending both
    ways: ``last_hidden_state`` [N, L, width] after ``final_layer_norm``, ``pooler_output`` the last position's
    through the head (SigLIP's text embedding). Without an ``attention_mask`` every position sees the padding, as
    SigLIP was trained; with one the padding is hidden, as transformers hides it."""

    family = "SiglipModel"

    def _attach(self, tower: torch.nn.Module) -> None:
        from .models.text_transformer import TextTransformer

        if type(tower) is not TextTransformer or tower.causal:
            raise ValueError(f"SiglipTextModel is SigLIP's text transformer; this model's text tower is a "
                             f"{type(tower).__name__}")
        self.text = tower

    @staticmethod
    def _visible(attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, 1, 1, L]: the keys every position sees (all of a row that keeps none, as ``features_masked``)."""
        return (attention_mask | ~attention_mask.any(dim=-1, keepdim=True))[:, None, None, :]

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text._project(pooled)

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        return output.pooler_output


class Siglip2VisionModel(_TowerModel):
    """transformers' ``Siglip2VisionModel``: a SigLIP 2 NaFlex model's image tower alone (``self.vision``), on its
    image processor's ``pixel_values``, ``pixel_attention_mask`` and ``spatial_shapes``: ``last_hidden_state`` [N,
    patches, width] after ``post_layernorm`` (padding positions included, as transformers gives them),
    ``pooler_output`` the attention pooling's over the image's own patches."""

    config_key, family = "vision_config", "Siglip2Model"

    @staticmethod
    def _tower_of(clip: CLIP) -> torch.nn.Module:
        return clip.visual

    def _attach(self, tower: torch.nn.Module) -> None:
        from .models.siglip_vision import SigLIPVisionTransformer

        if type(tower) is not SigLIPVisionTransformer or not tower.naflex:
            raise ValueError(f"Siglip2VisionModel is SigLIP 2's NaFlex image tower; this model's is a "
                             f"{type(tower).__name__}{'' if getattr(tower, 'naflex', True) else ' of a fixed size'}")
        self.vision = tower

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                spatial_shapes: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        _refuse(kwargs)
        batch = _naflex_inputs(pixel_values, pixel_attention_mask, spatial_shapes, "Siglip2VisionModel")
        x, visible = self.vision._naflex_tokens(batch)
        mask = None if visible is None else visible[:, None, None, :]  # the keys every token may see
        last, hidden, maps = _run_blocks(self.vision.transformer, x, output_hidden_states, output_attentions,
                                         attn_mask=mask)
        last = self.vision.ln_post(last)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=self.vision.head(last, visible),
                                          hidden_states=hidden, attentions=maps)

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        return output.pooler_output


class Siglip2TextModel(SiglipTextModel):
    """transformers' ``Siglip2TextModel``: SigLIP's text tower, as a SigLIP 2 NaFlex model holds it."""

    family = "Siglip2Model"


def _tower_classes(model: CLIPModel) -> tuple[type, type]:
    """The tower classes of ``model.vision_model`` / ``model.text_model``."""
    if isinstance(model, Siglip2Model):
        return Siglip2VisionModel, Siglip2TextModel
    if isinstance(model, SiglipModel):
        return SiglipVisionModel, SiglipTextModel
    return CLIPVisionModel, CLIPTextModel


def _pixels_for(tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixels in the tower's dtype (a model cast to bf16 takes the processor's float32), integers left for the tower's
    own check to name."""
    dtype = next(tower.parameters()).dtype
    return pixel_values.to(dtype) if pixel_values.is_floating_point() else pixel_values


def _positioned_tower(clip: CLIP) -> torch.nn.Module:
    """The image tower, where it has a learned position grid that ``interpolate_pos_encoding`` can resize."""
    from .models.siglip_vision import SigLIPVisionTransformer
    from .models.vision_transformer import VisionTransformer

    tower = clip.visual
    if type(tower) not in (VisionTransformer, SigLIPVisionTransformer) or getattr(tower, "naflex", False):
        raise ValueError(f"interpolate_pos_encoding: this model's image tower (a {type(tower).__name__}) has no "
                         "position grid to resize here")
    return tower


def _load_clip(name_or_path, dtype, device_map, options: dict) -> CLIP:
    from . import load_model
    from .checkpoint.hf import TOWER_TYPES

    name = os.fspath(name_or_path)
    with _hub_options("from_pretrained", options):
        if options.get("subfolder") is not None:
            name = os.fspath(_model_folder(name, options["subfolder"], None))
        tower_type = _read_json(Path(name) / "config.json").get("model_type") if os.path.isdir(name) else None
        if tower_type in TOWER_TYPES:
            kind = {"clip": "CLIP", "siglip": "Siglip"}[TOWER_TYPES[tower_type][0]]
            raise ValueError(f"{name}: a transformers {tower_type} folder (one tower alone, as diffusers' text "
                             f"encoders are): load it with {kind}TextModel / {kind}VisionModel.from_pretrained")
        if not os.path.exists(name) and not name.startswith("hf-hub:"):
            if "/" not in name or not is_hub_name(name):
                raise ValueError(f"{name}: expected a model folder, a checkpoint file or a Hugging Face Hub repo "
                                 "(OWNER/NAME); zoo names load with clipforge.load")
            name = f"hf-hub:{name}"
        clip = load_model(name)
    return _placed(_checked_clip(clip, name_or_path), dtype, device_map)


def _checked_clip(clip, name_or_path) -> CLIP:
    if type(clip) is not CLIP:
        raise ValueError(f"{name_or_path}: a {type(clip).__name__}, not a CLIP model")
    return clip


def _placed(model: torch.nn.Module, dtype, device_map) -> torch.nn.Module:
    """``model`` in ``from_pretrained``'s ``dtype`` and on its ``device_map`` (one device, or "auto")."""
    if dtype not in (None, "auto"):
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if isinstance(device_map, dict):
        raise ValueError("device_map: one device (a string or torch.device) or 'auto'; models are not split here")
    if device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device_map) if device_map is not None else model


def _refuse(kwargs: dict, position_ids=None) -> None:
    """What transformers' CLIPModel takes and this one does not build, named."""
    if position_ids is not None:
        raise ValueError("position_ids: only the positions 0..L-1 are built here")
    if kwargs.pop("return_dict", True) is False:
        raise ValueError("return_dict=False: features come as a tensor, outputs as a CLIPOutput (index it by "
                         "position for the tuple's order)")
    for asked in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(asked, False):
            raise ValueError(f"{asked}: get_*_features give the features; the model's forward, model.vision_model "
                             "and model.text_model (CLIPVisionModel, CLIPTextModel ...) give the towers' states")
    if kwargs:
        raise TypeError(f"CLIPModel: {', '.join(sorted(kwargs))} not built here")


def _check_right_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, text: torch.nn.Module) -> None:
    """CLIP's causal text tower pools one position, which sees nothing after it: a mask that pads after that position
    changes nothing (the tower skips that padding anyway); one that masks a token at or before it (left padding, which
    transformers then pools at a padding token) is refused."""
    pooled = text._pool_index(input_ids).to(attention_mask.device)
    leading = attention_mask.to(torch.long).cumprod(dim=-1).sum(dim=-1)  # each row's unmasked start
    if bool((leading <= pooled).any()):
        raise ValueError("attention_mask masks a token at or before a text's end-of-text token (left padding?): "
                         "CLIP's text is padded on the right")


class ZeroShotImageClassificationPipeline:
    """transformers' ``pipeline("zero-shot-image-classification")``: ``classifier(image, candidate_labels=[...])``
    gives ``[{"score", "label"}, ...]`` best first (a list of those for a list of images), each label's softmax
    probability over ``hypothesis_template`` filled with the labels (a SigLIP model's: each label's sigmoid). The
    labels' features are computed once for all the images (transformers' runs them again for each image)."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor):
        self.model, self.processor = model, processor

    def __call__(self, image, candidate_labels: list[str] | None = None,
                 hypothesis_template: str = "This is a photo of {}.", timeout: float | None = None,
                 tokenizer_kwargs: dict | None = None):
        """``image``: a PIL image, a path, an http(s) URL, or a list of them; turned upright as its EXIF says."""
        if not candidate_labels or isinstance(candidate_labels, str):
            raise ValueError("candidate_labels: give a list of one or more labels")
        single = not isinstance(image, (list, tuple))
        images = [_load_image(i, timeout) for i in ([image] if single else image)]
        texts = [hypothesis_template.format(label) for label in candidate_labels]
        model = self.model
        siglip = isinstance(model, SiglipModel)  # as trained: padded to 64 tokens, each label's own sigmoid
        padding = {"padding": "max_length", "max_length": 64, "truncation": True} if siglip else {"padding": True}
        tokens = self.processor.tokenizer(texts, return_tensors="pt", **{**padding, **(tokenizer_kwargs or {})})
        pixels = self.processor.image_processor(images, return_tensors="pt")  # Siglip2's: patches, mask, shapes
        with torch.no_grad():
            text = F.normalize(model.get_text_features(**tokens.to(model.device)), dim=-1)
            pictures = F.normalize(model.get_image_features(**pixels.to(model.device)), dim=-1)
            logits = model.logit_scale.exp() * pictures @ text.t()
            probs = (logits + model.clip.logit_bias).sigmoid() if siglip else logits.softmax(dim=-1)
            probs = probs.float().cpu()
        results = [[{"score": score, "label": label}
                    for score, label in sorted(zip(row.tolist(), candidate_labels), key=lambda pair: -pair[0])]
                   for row in probs]
        return results[0] if single else results


def _load_image(image, timeout: float | None) -> Image.Image:
    """transformers' ``load_image``: a PIL image, a path or an http(s) URL, upright as its EXIF orientation says."""
    if isinstance(image, Image.Image):
        return _upright(image)[0]
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(image, timeout=timeout) as response:
            return open_image(response.read(), name=image, decoding=Decoding(upright=True))
    if isinstance(image, (str, os.PathLike)):
        return open_image(os.fspath(image), decoding=Decoding(upright=True))
    raise TypeError(f"expected a PIL image, a path or an http(s) URL; got {type(image).__name__}")


def pipeline(task: str, model: str | os.PathLike | CLIPModel, processor: CLIPProcessor | str | None = None,
             device=None, dtype=None, torch_dtype=None, **kwargs) -> ZeroShotImageClassificationPipeline:
    """transformers' ``pipeline`` for ``"zero-shot-image-classification"`` over a CLIP or SigLIP folder or hub repo
    (or a ``CLIPModel`` / ``SiglipModel`` with its ``processor``). ``device``: a device, or a GPU's index (-1: the
    CPU)."""
    if task != "zero-shot-image-classification":
        raise ValueError(f"pipeline {task!r}: only 'zero-shot-image-classification' is built here")
    if kwargs:
        raise TypeError(f"pipeline: {', '.join(sorted(kwargs))} not built here")
    if isinstance(device, int):
        device = "cpu" if device < 0 else f"cuda:{device}"
    if isinstance(model, CLIPModel):
        if processor is None:
            raise ValueError("pipeline: a CLIPModel instance needs its processor (processor=...)")
        if device is not None:
            model = model.to(device)
    else:
        processor = processor or model
        model = AutoModel.from_pretrained(model, dtype=dtype, torch_dtype=torch_dtype, device_map=device)
    if not isinstance(processor, CLIPProcessor):
        processor = CLIPProcessor.from_pretrained(processor)
    return ZeroShotImageClassificationPipeline(model.eval(), processor)

# transformers' other names for the classes above, for the CLIP and SigLIP folders and repos these read
AutoProcessor, AutoTokenizer, AutoImageProcessor = CLIPProcessor, CLIPTokenizer, CLIPImageProcessor
CLIPConfig = SiglipConfig = AutoConfig
SiglipTextConfig, SiglipVisionConfig = CLIPTextConfig, CLIPVisionConfig
AutoModelForZeroShotImageClassification = AutoModel
CLIPFeatureExtractor = CLIPImageProcessor  # transformers 4's older name
CLIPTokenizerFast, CLIPImageProcessorFast = CLIPTokenizer, CLIPImageProcessor
SiglipProcessor, SiglipImageProcessor, SiglipImageProcessorFast = CLIPProcessor, CLIPImageProcessor, CLIPImageProcessor
Siglip2Processor, Siglip2ImageProcessorFast = CLIPProcessor, Siglip2ImageProcessor
SiglipTokenizer = GemmaTokenizerFast = CLIPTokenizer
