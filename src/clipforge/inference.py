"""Loading a model to use it, as every command that embeds, evaluates, searches or serves does: the
``--model`` / ``--pretrained`` / ``--device`` flags, what they mean, and the device they land on."""
from __future__ import annotations

import argparse
import os


def add_model_arguments(p: argparse.ArgumentParser, recorded: bool = False) -> None:
    """``--model``, ``--pretrained``, ``--device`` (and ``--trust-pickle``). ``recorded``: for commands on an embedded
    collection, where both default to what ``clipforge embed`` recorded."""
    note = " [recorded by embed]" if recorded else ""
    p.add_argument("--model", help="zoo architecture, or a checkpoint path when --pretrained is not given" + note)
    p.add_argument("--pretrained", help="a pretrained tag or a checkpoint path (a clipforge train step folder, .pt, "
                                        "Hugging Face folder)" + note)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda if available]")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling (trusted files only)")
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"], default=None,
                   help="run the model in PyTorch, or in ONNX Runtime (CPU) from a folder written by `clipforge "
                        "export onnx` given as --model; onnx-int8 uses its int8 image tower [onnx for such a "
                        "folder, else torch]")


def default_device(device: str | None = None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(model: str | None = None, pretrained: str | None = None, device: str | None = None,
                       trust_pickle: bool = False, collection: str | os.PathLike | None = None,
                       backend: str | None = None):
    """``(model, preprocess, tokenizer)`` in eval mode on ``device``.

    ``model`` alone: a zoo name (random weights) or a checkpoint path; ``pretrained`` alone: a checkpoint path; both:
    the named architecture with those weights (a tag or a path). ``collection``: an embedded collection (checked to
    be one before anything loads) whose recorded ``--model``/``--pretrained`` are used when neither is given.
    ``backend``: "torch", "onnx" or "onnx-int8" (clipforge.onnx_backend); by default an ONNX export folder runs
    in ONNX Runtime and anything else in PyTorch.
    """
    from . import load

    if collection is not None:
        from .retrieval.collection import check_collection, model_spec

        check_collection(collection)
        if model is None and pretrained is None:
            spec = model_spec(collection)
            model, pretrained = spec.get("model"), spec.get("pretrained")
    if model is None and pretrained is None:
        raise ValueError("give --model NAME (with --pretrained TAG_OR_PATH) or --pretrained CHECKPOINT_PATH")
    from .onnx_backend import is_onnx_export, load_onnx

    path = pretrained or model
    if backend in ("onnx", "onnx-int8") or (backend is None and is_onnx_export(path)):
        if not is_onnx_export(path):
            raise ValueError(f"--backend {backend} runs a folder written by `clipforge export onnx`, and {path} is "
                             f"not one: run `clipforge export onnx {path} OUT`, then pass --model OUT")
        if device not in (None, "cpu"):
            raise ValueError(f"the ONNX backend runs on CPU; got --device {device}")
        return load_onnx(path, int8=backend == "onnx-int8")
    device = default_device(device)
    if model is None or (pretrained is None and os.path.exists(model)):
        return load(pretrained or model, device=device, trust_pickle=trust_pickle)
    return load(model, pretrained=pretrained, device=device, trust_pickle=trust_pickle)
