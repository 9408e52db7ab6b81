"""ONNX export and ONNX Runtime inference: the image and text towers as two graphs with a dynamic batch, run by
ONNX Runtime behind the same ``encode_image`` / ``encode_text`` as the PyTorch model, so ``embed``, ``search`` and
``serve`` take either (``--backend onnx``). Optional: ``pip install 'clipforge[onnx]'``.

An exported folder holds ``image.onnx``, ``text.onnx`` (and ``image.int8.onnx`` with ``int8=True``: the image
tower's linear layers quantised dynamically by ONNX Runtime) and ``clipforge_onnx.json``: the model config (for the
tokenizer), image normalisation and temperature.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from .files import atomic_path, read_json, write_json
from .models.inputs import batch_input

MANIFEST = "clipforge_onnx.json"
OPSET = 18


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"the ONNX backend needs {module}: pip install 'clipforge[onnx]'") from error


class _ImageGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


class _TextGraph(nn.Module):
    """The text tower over the whole padded row: the same computation for every batch (no per-batch trimming)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text = model.text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.features_padded(tokens)


def _export(graph: nn.Module, example: torch.Tensor, name: str, path: Path) -> None:
    """``name``: the graph's input, which is also ``graph.forward``'s argument (the batch dimension is dynamic)."""
    _require("onnxscript")  # torch's ONNX exporter
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(graph.eval(), (example,), input_names=[name], output_names=["features"],
                                dynamic_shapes={name: {0: batch}}, opset_version=OPSET,
                                dynamo=True, verbose=False)
    with atomic_path(path) as tmp:
        program.save(str(tmp))


def export_onnx(model: nn.Module, output: str | os.PathLike, int8: bool = False) -> Path:
    """Write ``model``'s towers as ONNX graphs into the folder ``output``; returns it."""
    from .models import is_naflex

    if is_naflex(getattr(model, "config", {})):  # a graph of square images would differ
        raise ValueError("ONNX export of a SigLIP 2 NaFlex model is not built: its graph would take square images, "
                         "where the model takes each image at its own aspect ratio (PyTorch, the default backend)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    with torch.no_grad():
        image = torch.zeros(2, 3, model.image_size, model.image_size)
        _export(_ImageGraph(model), image, "images", out / "image.onnx")
        tokens = torch.zeros(2, model.context_length, dtype=torch.long)
        tokens[:, :3] = torch.tensor([1, 2, 3])  # a real row shape; the values do not matter to the graph
        _export(_TextGraph(model), tokens, "tokens", out / "text.onnx")
    if int8:
        quantize_image_tower(out)
    write_json(out / MANIFEST, {"config": model.config, "normalisation": getattr(model, "normalisation", {}),
                                "logit_scale": float(model.logit_scale.detach()),
                                "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
                                "embed_dim": model.embed_dim, "image_size": model.image_size,
                                "context_length": model.context_length, "opset": OPSET})
    return out


def quantize_image_tower(folder: str | os.PathLike) -> Path:
    """``image.int8.onnx``: the image graph with its MatMul/Gemm weights in int8 and activations quantised per call
    (ONNX Runtime's dynamic quantisation: no calibration data needed)."""
    quantization = _require("onnxruntime.quantization")
    folder = Path(folder)
    target = folder / "image.int8.onnx"
    with atomic_path(target) as tmp:
        quantization.quantize_dynamic(str(folder / "image.onnx"), str(tmp), op_types_to_quantize=["MatMul", "Gemm"],
                                      weight_type=quantization.QuantType.QInt8)
    return target


def is_onnx_export(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


class OnnxCLIP(nn.Module):
    """An exported model run by ONNX Runtime, usable where a CLIP model is: ``encode_image``, ``encode_text``,
    ``logit_scale``, ``image_size``. Always on CPU. ``int8``: use the quantised image graph."""

    def __init__(self, folder: str | os.PathLike, int8: bool = False, threads: int | None = None):
        super().__init__()
        ort = _require("onnxruntime")
        folder = Path(folder)
        if not is_onnx_export(folder):
            raise FileNotFoundError(f"{folder} is not a clipforge ONNX export (no {MANIFEST}); "
                                    f"make one with `clipforge export onnx MODEL {folder}`")
        manifest = read_json(folder / MANIFEST)
        self.config, self.normalisation = manifest["config"], manifest.get("normalisation") or {}
        self.embed_dim, self._image_size = manifest["embed_dim"], manifest["image_size"]
        self._context_length = manifest["context_length"]
        # parameters() is how callers find the device: these two make it CPU, as the sessions are
        self.logit_scale = nn.Parameter(torch.tensor(manifest["logit_scale"]), requires_grad=False)
        bias = manifest.get("logit_bias")
        from .models.clip import LOGIT_SCALE_MAX

        self.logit_scale_max = self.config.get("logit_scale_max", LOGIT_SCALE_MAX)  # None: SigLIP's, unclamped
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(bias), requires_grad=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        image_file = folder / ("image.int8.onnx" if int8 else "image.onnx")
        if not image_file.is_file():
            raise FileNotFoundError(f"{image_file} is missing: export with --int8 to quantise the image tower")
        providers = ["CPUExecutionProvider"]
        self._image = ort.InferenceSession(str(image_file), options, providers=providers)
        self._text = ort.InferenceSession(str(folder / "text.onnx"), options, providers=providers)
        self.folder, self.int8 = folder, int8

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        images = batch_input(images, "encode_image")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected images of shape [N, 3, {self.image_size}, {self.image_size}], "
                             f"got {tuple(images.shape)}")
        return self._run(self._image, "images", images.float(), normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        tokens = batch_input(tokens, "encode_text")
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"expected tokens of shape [N, {self.context_length}], got {tuple(tokens.shape)}")
        return self._run(self._text, "tokens", tokens.long(), normalize)

    def _run(self, session, name: str, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        if len(x) == 0:  # as the eager model answers
            return torch.zeros(0, self.embed_dim)
        features = torch.from_numpy(session.run(None, {name: x.detach().cpu().contiguous().numpy()})[0])
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        from .models.clip import CLIPOutput
        from .zeroshot import temperature

        return CLIPOutput(None if images is None else self.encode_image(images, normalize=True),
                          None if tokens is None else self.encode_text(tokens, normalize=True),
                          torch.tensor(temperature(self)), self.logit_bias)


def load_onnx(folder: str | os.PathLike, int8: bool = False, threads: int | None = None):
    """``(model, preprocess, tokenizer)`` for an exported folder, as ``clipforge.load`` returns for a checkpoint."""
    from .preprocess import Preprocess
    from .tokenizer import get_tokenizer

    model = OnnxCLIP(folder, int8=int8, threads=threads)
    return model, Preprocess(model.image_size, **model.normalisation), get_tokenizer(model.config)


def add_export_arguments(p) -> None:
    from .argtypes import positive_int

    p.description = ("Export a model's image and text towers as ONNX graphs (dynamic batch) that ONNX Runtime runs "
                     "on CPU: pass the folder as --model to embed, search, serve and eval (--backend onnx, or "
                     "onnx-int8 with --int8). Needs pip install 'clipforge[onnx]'.")
    p.epilog = "example: clipforge export onnx runs/flickr8k/step_002400 runs/flickr8k-onnx --int8"
    p.add_argument("format", choices=["onnx"])
    p.add_argument("model", help="zoo architecture or checkpoint path (as --model elsewhere)")
    p.add_argument("output", help="folder to write image.onnx, text.onnx and clipforge_onnx.json into")
    p.add_argument("--pretrained", help="a pretrained tag or checkpoint path for MODEL")
    p.add_argument("--int8", action="store_true", help="also write image.int8.onnx (dynamic int8 quantisation)")
    p.add_argument("--force-image-size", type=positive_int, metavar="N",
                   help="export the model at N pixels, its position grid resized (clipforge.load's force_image_size)")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling (trusted files only)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare the graphs with PyTorch on a random batch and report the largest difference")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from .inference import load_for_inference

    model, _, tokenizer = load_for_inference(args.model, args.pretrained, "cpu", args.trust_pickle, backend="torch",
                                             force_image_size=args.force_image_size)
    out = export_onnx(model, args.output, int8=args.int8)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    if args.check:
        for int8 in (False, True) if args.int8 else (False,):
            gaps = parity(model, OnnxCLIP(out, int8=int8), tokenizer)
            print(f"{'int8' if int8 else 'fp32'} largest difference from PyTorch, normalised features: "
                  f"image {gaps['image']:.2e}, text {gaps['text']:.2e}")
    return 0


@torch.no_grad()
def parity(model: nn.Module, exported: OnnxCLIP, tokenizer, batch: int = 8, seed: int = 0) -> dict:
    """Largest absolute difference between PyTorch's and the exported graphs' normalised features on a random
    image batch and a few captions of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, model.image_size, model.image_size, generator=generator)
    texts = ["a dog", "a child in a pink dress is climbing up a set of stairs in an entry way", "",
             "two dogs on pavement moving toward each other"]
    tokens = tokenizer(texts)
    return {"image": float((model.encode_image(images, normalize=True)
                            - exported.encode_image(images, normalize=True)).abs().max()),
            "text": float((model.encode_text(tokens, normalize=True)
                           - exported.encode_text(tokens, normalize=True)).abs().max())}
