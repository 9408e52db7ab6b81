"""ONNX export and the ONNX Runtime backend: parity with PyTorch, dynamic batch, int8 tolerance, and the commands
(export, embed, search, eval) running on an exported folder."""
import json

import numpy as np
import pytest
import torch

import clipforge
from clipforge import cli
from clipforge.data import ShapesSource

from conftest import random_tokens

pytest.importorskip("onnxruntime", reason="onnxruntime is in the onnx and test extras")
pytest.importorskip("onnxscript", reason="onnxscript (torch's ONNX exporter) is in the onnx and test extras")

from clipforge.onnx_backend import OnnxCLIP, export_onnx, is_onnx_export, load_onnx  # noqa: E402

# Normalised features: fp32 graphs must match eager PyTorch to this (the bar); int8 to the looser one.
FP32_TOLERANCE = 1e-4
INT8_MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained-looking (random, seeded) ViT-Tiny-64 saved as a checkpoint and exported with --int8 by the CLI."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(1)
    model = clipforge.create_model("ViT-Tiny-64")
    ckpt = clipforge.save_pretrained(model, root / "model")
    assert cli.main(["export", "onnx", str(ckpt), str(root / "onnx"), "--int8"]) == 0
    return {"root": root, "ckpt": str(ckpt), "onnx": root / "onnx", "model": clipforge.load(str(ckpt))[0]}


def test_export_writes_both_towers_and_a_manifest(exported):
    folder = exported["onnx"]
    assert is_onnx_export(folder) and not is_onnx_export(exported["root"])
    assert {p.name for p in folder.iterdir()} >= {"image.onnx", "image.int8.onnx", "text.onnx", "clipforge_onnx.json"}
    manifest = json.loads((folder / "clipforge_onnx.json").read_text())
    assert manifest["image_size"] == 64 and manifest["embed_dim"] == exported["model"].embed_dim
    assert abs(manifest["logit_scale"] - exported["model"].logit_scale.item()) < 1e-6
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())  # written atomically


@pytest.mark.parametrize("batch", [1, 7])
def test_fp32_graphs_match_pytorch_for_any_batch(exported, batch):
    model, onnx_model = exported["model"], OnnxCLIP(exported["onnx"])
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, 64, 64, generator=generator)
    tokens = random_tokens(batch, model.context_length, generator=generator)
    with torch.no_grad():
        image_gap = (model.encode_image(images, normalize=True) - onnx_model.encode_image(images, normalize=True))
        text_gap = (model.encode_text(tokens, normalize=True) - onnx_model.encode_text(tokens, normalize=True))
    assert image_gap.abs().max() <= FP32_TOLERANCE
    assert text_gap.abs().max() <= FP32_TOLERANCE


def test_int8_image_tower_stays_close_to_fp32(exported):
    model, int8 = exported["model"], OnnxCLIP(exported["onnx"], int8=True)
    images = torch.stack([clipforge.Preprocess(64)(ShapesSource(16, seed=5).item(i)[0]) for i in range(16)])
    with torch.no_grad():
        reference = model.encode_image(images, normalize=True)
    quantised = int8.encode_image(images, normalize=True)
    cosine = (reference * quantised).sum(-1)
    assert cosine.min() >= INT8_MIN_COSINE
    assert not torch.equal(reference, quantised)  # it really is a different (quantised) graph
    # the nearest neighbours among the 16 images hardly move
    assert (reference @ reference.T).argsort(-1)[:, -2].eq((quantised @ quantised.T).argsort(-1)[:, -2]).float().mean() >= 0.8


def test_hugging_face_text_tower_exports_with_parity(tmp_path):
    pytest.importorskip("transformers", reason="transformers is in the test extras")
    try:
        model, _, tokenizer = clipforge.load("ViT-Tiny-64-MiniLM")
    except Exception as error:  # the MiniLM package is in the test extras
        pytest.skip(f"MiniLM text tower unavailable: {error}")
    export_onnx(model, tmp_path / "onnx")
    onnx_model, _, onnx_tokenizer = load_onnx(tmp_path / "onnx")
    texts = ["a dog runs through the water", "two children on a swing in a park at dusk", "a"]
    tokens = onnx_tokenizer(texts)
    assert torch.equal(tokens, tokenizer(texts))
    with torch.no_grad():
        gap = model.encode_text(tokens, normalize=True) - onnx_model.encode_text(tokens, normalize=True)
    assert gap.abs().max() <= FP32_TOLERANCE


def test_wrong_shapes_and_missing_files_are_named(exported, tmp_path, capsys):
    onnx_model = OnnxCLIP(exported["onnx"])
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]"):
        onnx_model.encode_image(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="tokens of shape"):
        onnx_model.encode_text(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="token ids"):
        onnx_model.encode_text("a dog")
    # an empty batch: empty features, as from the eager model (was "an empty batch")
    assert onnx_model.encode_image(torch.zeros(0, 3, 64, 64)).shape == (0, onnx_model.embed_dim)
    assert onnx_model.encode_text(torch.zeros(0, 32, dtype=torch.long)).shape == (0, onnx_model.embed_dim)
    with pytest.raises(FileNotFoundError, match="not a clipforge ONNX export"):
        OnnxCLIP(tmp_path)
    # --backend onnx on an ordinary checkpoint says how to export it
    assert cli.main(["embed", str(tmp_path), str(tmp_path / "out"), "--pretrained", exported["ckpt"],
                     "--backend", "onnx"]) == 2
    assert "clipforge export onnx" in capsys.readouterr().err


def test_embed_and_search_run_on_the_exported_folder(exported, tmp_path, capsys):
    pytest.importorskip("faiss", reason="faiss-cpu is in the test extras")
    pytest.importorskip("pyarrow", reason="pyarrow is in the test extras")
    images = tmp_path / "images"
    images.mkdir()
    source = ShapesSource(12, seed=3)
    for i in range(12):
        image, attrs = source.item(i)
        image.save(images / f"shape{i:03d}.png")
    from clipforge.retrieval import load_embeddings

    vectors = {}
    for backend, spec in (("torch", ["--pretrained", exported["ckpt"]]), ("onnx", ["--model", str(exported["onnx"])])):
        out = tmp_path / f"emb-{backend}"
        assert cli.main(["embed", str(images), str(out), *spec, "--no-progress"]) == 0
        vectors[backend] = load_embeddings(out)[0]
    # stored as float16: the two backends agree to that precision
    assert np.abs(vectors["torch"].astype(np.float32) - vectors["onnx"].astype(np.float32)).max() < 2e-3
    out = tmp_path / "emb-onnx"
    assert cli.main(["index", "build", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["search", str(out), "a red circle", "-k", "3", "--json"]) == 0  # reloads the recorded export
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert cli.main(["search", str(out), "--image", str(images / "shape005.png"), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"].endswith("shape005.png")
