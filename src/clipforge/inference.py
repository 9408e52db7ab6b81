"""Loading a model to use it, as every command that embeds, evaluates, searches or serves does: the
``--model`` / ``--pretrained`` / ``--device`` flags, what they mean, and the device they land on."""
from __future__ import annotations

import argparse
import os
import sys


def add_model_arguments(p: argparse.ArgumentParser, recorded: bool = False, several: bool = False) -> None:
    """``--model``, ``--pretrained``, ``--device`` (and ``--trust-pickle``). ``recorded``: for commands on an embedded
    collection, where both default to what ``clipforge embed`` recorded; ``several``: ``--pretrained`` takes a list
    (a list then, or None)."""
    note = " [recorded by embed]" if recorded else ""
    p.add_argument("--model", help="zoo architecture, or a checkpoint path when --pretrained is not given" + note)
    p.add_argument("--pretrained", nargs="+" if several else None,
                   help="a pretrained tag or a checkpoint path (a clipforge train step folder, .pt, Hugging Face "
                        "folder)" + (" ; several (a run's checkpoints, say) are evaluated in turn" if several else "")
                        + note)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda if available]")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling (trusted files only)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the weights' dtype: auto = bf16 on a GPU (as OpenAI's CLIP loads fp16 there; features "
                        "differ from fp32's by bf16 rounding, docs/BENCHMARKS.md), fp32 on CPU, where most "
                        "processors multiply bf16 slowly [auto]")
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"], default=None,
                   help="run the model in PyTorch, or in ONNX Runtime (CPU) from a folder written by `clipforge "
                        "export onnx` given as --model; onnx-int8 uses its int8 image tower [onnx for such a "
                        "folder, else torch]")
    p.add_argument("--language", default=None,
                   help="the texts' language, for a model whose tokenizer marks it (NLLB-CLIP's codes: fra_Latn, "
                        "deu_Latn, zho_Hans, ...) [its default, eng_Latn]")
    from .argtypes import positive_int

    p.add_argument("--max-patches", type=positive_int, default=None, metavar="N",
                   help="a SigLIP 2 NaFlex model: the most patches each image is cut into, its sequence length "
                        "(transformers' max_num_patches; more is finer and slower) [the model's own grid, 256 for "
                        "the released models" + ("; for a collection, what embed used" if recorded else "") + "]")
    p.add_argument("--force-image-size", type=positive_int, default=None, metavar="N",
                   help="run the model at N pixels instead of its own size, its position grid resized as "
                        "open_clip's force_image_size does (a model trained on random crops may read larger images "
                        "better) [its own" + ("; for a collection, what embed used" if recorded else "") + "]")


def add_decode_argument(p: argparse.ArgumentParser) -> None:
    """``--full-decode``, for commands that read many photos (embed, classify); ``decoding_from_args`` reads it."""
    p.add_argument("--full-decode", action="store_true",
                   help="decode images as open_clip's preprocess does: every pixel of a JPEG, and as stored (EXIF "
                        "orientation ignored). By default a JPEG over three times the model's input is decoded at "
                        "1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: 12-megapixel photos 3x faster, vectors as "
                        "close to a full decode's as a quality-90 copy's) and a photo is turned upright as its EXIF "
                        "orientation says (phones store portrait photos sideways with that tag; docs/BENCHMARKS.md)")


def decoding_from_args(args, preprocess):
    """How to decode images for ``preprocess`` (``preprocess.Decoding``), None as stored (--full-decode)."""
    from .preprocess import Decoding

    return None if args.full_decode else Decoding.for_model(preprocess)


def load_from_args(args, collection: str | os.PathLike | None = None):
    """``load_for_inference`` with the flags ``add_model_arguments`` defines; for a ``collection``, a warning when
    the model is not the one that embedded it (``retrieval.probe``)."""
    loaded = load_for_inference(args.model, args.pretrained, args.device, args.trust_pickle, collection=collection,
                                backend=args.backend, precision=args.precision, language=args.language,
                                max_patches=args.max_patches, force_image_size=args.force_image_size)
    if collection is not None:
        from .retrieval.probe import warn_if_other_weights

        warn_if_other_weights(collection, *loaded)
    return loaded


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def inference_dtype(precision: str | None, device: str):
    """The dtype ``--precision`` asks for on ``device``: "auto" (or None) is bf16 on CUDA and fp32 elsewhere."""
    import torch

    if precision in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return dtypes[precision]


def weights_dtype(model):
    """The dtype a loaded model computes in (float32 for one that holds no PyTorch weights, e.g. ONNX Runtime's)."""
    import torch

    parameters = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    return next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)


def default_device(device: str | None = None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(model: str | None = None, pretrained: str | None = None, device: str | None = None,
                       trust_pickle: bool = False, collection: str | os.PathLike | None = None,
                       backend: str | None = None, precision: str | None = "fp32", language: str | None = None,
                       max_patches: int | None = None, force_image_size: int | None = None):
    """``(model, preprocess, tokenizer)`` in eval mode on ``device``.

    ``model`` alone: a zoo name (random weights) or a checkpoint path; ``pretrained`` alone: a checkpoint path; both:
    the named architecture with those weights (a tag or a path). ``collection``: an embedded collection (checked to
    be one before anything loads) whose recorded ``--model``/``--pretrained`` are used when neither is given.
    ``backend``: "torch", "onnx" or "onnx-int8" (clipforge.onnx_backend); by default an ONNX export folder runs
    in ONNX Runtime and anything else in PyTorch. ``precision``: the weights' dtype (``inference_dtype``); images
    are cast to it by ``encode_image``, and callers take features back as float32. ``language``: the texts'
    language, set on the tokenizer (``set_language``); an error for a tokenizer without source languages.
    ``max_patches``: a SigLIP 2 NaFlex model's sequence length (``NaFlexPreprocess``); for a collection embedded with
    one, what it recorded (query images must be cut as its images were); an error for any other model.
    ``force_image_size``: the model at that image size (``clipforge.load``); for a collection embedded with one, what
    it recorded.
    """
    from . import load

    model, pretrained = (os.fspath(x) if x is not None else None for x in (model, pretrained))  # paths too
    recorded_patches = None
    if max_patches is not None and max_patches < 1:
        raise ValueError(f"--max-patches {max_patches}: expected a whole number of at least 1")
    if collection is not None:
        from .retrieval.collection import check_collection, model_spec

        check_collection(collection)
        spec = model_spec(collection)
        recorded_patches = spec.get("max_patches")
        recorded_size = spec.get("force_image_size")
        if force_image_size is not None and recorded_size is not None and force_image_size != recorded_size:
            print(f"warning: the collection was embedded with --force-image-size {recorded_size}; image queries at "
                  f"{force_image_size} px give other features than its images'", file=sys.stderr)
        force_image_size = force_image_size or recorded_size
        if model is None and pretrained is None:
            model, pretrained = spec.get("model"), spec.get("pretrained")
    if model is None and pretrained is None:
        raise ValueError("give --model NAME (with --pretrained TAG_OR_PATH) or --pretrained CHECKPOINT_PATH")
    from .onnx_backend import is_onnx_export, load_onnx

    path = pretrained or model
    if backend in ("onnx", "onnx-int8") or (backend is None and is_onnx_export(path)):
        if device not in (None, "cpu"):
            raise ValueError(f"the ONNX backend runs on CPU; got --device {device}")
        if precision not in (None, "auto", "fp32"):
            raise ValueError(f"the ONNX backend runs the exported fp32 graph; got --precision {precision}")
        if not is_onnx_export(path):
            raise ValueError(f"--backend {backend} runs a folder written by `clipforge export onnx`, and {path} is "
                             f"not one: run `clipforge export onnx {path} OUT`, then pass --model OUT")
        if max_patches is not None:
            raise ValueError("--max-patches sets a SigLIP 2 NaFlex model's sequence length; the ONNX backend runs "
                             "square-image graphs (NaFlex models are not exported)")
        if force_image_size is not None:
            raise ValueError("--force-image-size: an ONNX export runs at the image size it was exported at; export "
                             "the model at that size instead (clipforge export onnx MODEL OUT --force-image-size N)")
        return _set_language(load_onnx(path, int8=backend == "onnx-int8"), language)
    device = default_device(device)
    dtype = inference_dtype(precision, device)  # checked before anything loads
    if model is None or (pretrained is None and os.path.exists(model)):
        loaded = load(pretrained or model, device=device, trust_pickle=trust_pickle, force_image_size=force_image_size)
    else:
        if pretrained is None and not model.startswith("hf-hub:"):  # open_clip warns the same: an easy slip
            from .models import get_model_config

            get_model_config(model)  # an unknown name is the error to give, not this warning
            print(f"warning: --model {model} without --pretrained has random weights, whose features mean nothing; "
                  f"give --pretrained TAG_OR_CHECKPOINT (`clipforge models` lists the tags)", file=sys.stderr)
        loaded = load(model, pretrained=pretrained, device=device, trust_pickle=trust_pickle,
                      force_image_size=force_image_size)
    if dtype != weights_dtype(loaded[0]):
        loaded[0].to(dtype)
    return _set_language(_set_max_patches(loaded, max_patches, recorded_patches, path), language)


def _set_max_patches(loaded, max_patches: int | None, recorded: int | None, name: str):
    """``loaded`` with a NaFlex model's preprocessing cut into ``max_patches`` (else what the collection recorded)."""
    from .models import is_naflex
    from .preprocess import NaFlexPreprocess

    model, preprocess, tokenizer = loaded
    if not is_naflex(getattr(model, "config", {}) or {}):
        if max_patches is not None:
            raise ValueError(f"--max-patches sets a SigLIP 2 NaFlex model's sequence length; {name} takes square "
                             f"images of {model.image_size} px: leave --max-patches out")
        return loaded
    if max_patches is None and recorded is None:
        return loaded
    if max_patches is not None and recorded is not None and max_patches != recorded:
        print(f"warning: the collection was embedded with --max-patches {recorded}; image queries cut into "
              f"{max_patches} patches give slightly different features", file=sys.stderr)
    return model, NaFlexPreprocess.for_model(model, max_patches or recorded), tokenizer


def _set_language(loaded, language: str | None):
    """``loaded`` with ``language`` set on its tokenizer; where it changes nothing, an error (a flag that does
    nothing is a mistake on the command line, where the Python call warns as open_clip's)."""
    if language is None:
        return loaded
    import warnings

    from .hub_tokenizer import LanguageIgnoredWarning

    tokenizer = loaded[2]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LanguageIgnoredWarning)
            if tokenizer is None or not hasattr(tokenizer, "set_language"):
                raise LanguageIgnoredWarning()
            tokenizer.set_language(language)
    except LanguageIgnoredWarning:
        raise ValueError(f"--language {language}: this model's tokenizer has no source languages to choose from "
                         "(NLLB-CLIP's has); leave --language out") from None
    return loaded
