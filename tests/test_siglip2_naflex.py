"""SigLIP 2's NaFlex models (transformers' ``Siglip2Model``: images at their own aspect ratio, as a padded, masked
grid of patches whose learned positions are resized to each image's grid): a folder loads with transformers'
features, ``NaFlexPreprocess`` gives transformers' processor output, and ``convert --to hf`` writes one back.
Random small models, since none can be downloaded."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.preprocess import NaFlexPreprocess, naflex_batch

SIZES = [(100, 300), (333, 500), (64, 64), (500, 120), (97, 97), (40, 7)]  # (height, width): wide, tall, square


def _their_processor(**settings):
    """transformers' Pillow-backed processor (its torchvision backend resizes with torchvision's antialiasing)."""
    try:
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil as processor
    except ImportError:  # transformers 4.x: the slow processor is the Pillow one
        from transformers import Siglip2ImageProcessor as processor
    return processor(**settings)


@pytest.fixture(scope="module")
def naflex_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Siglip2Model"):
        pytest.skip("this transformers has no Siglip2Model (4.49 and later have)")
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.Siglip2Config(
        text_config=dict(tower, vocab_size=100, max_position_embeddings=16, bos_token_id=2, eos_token_id=1),
        vision_config=dict(tower, patch_size=8, num_patches=64))
    torch.manual_seed(0)
    model = transformers.Siglip2Model(config).eval()
    with torch.no_grad():  # LayerNorms, biases and the logit bias off their initial values, so that each is checked
        for parameter in model.parameters():
            if parameter.dim() <= 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    folder = tmp_path_factory.mktemp("siglip2-naflex")
    model.save_pretrained(folder)
    _their_processor(patch_size=8, max_num_patches=64).save_pretrained(folder)
    return folder


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _features(output):
    return getattr(output, "pooler_output", output)  # transformers 5 returns an output object, 4.x the tensor


def test_force_image_size_on_a_naflex_model_names_max_patches(naflex_folder):
    with pytest.raises(ValueError, match="NaFlex model takes each image at its own size.*--max-patches"):
        clipforge.load(str(naflex_folder), force_image_size=256)


def test_a_siglip2_naflex_folder_loads_with_transformers_features_and_inputs(naflex_folder):
    from transformers import Siglip2Model

    from clipforge.preprocess import Preprocess

    theirs = Siglip2Model.from_pretrained(naflex_folder).eval()
    model, preprocess, _ = clipforge.load(str(naflex_folder))
    assert model.config["vision_cfg"]["naflex"] and model.image_size == 64  # the 8 x 8 position grid, in pixels
    assert isinstance(preprocess, NaFlexPreprocess) and preprocess.settings == NaFlexPreprocess(8, 64).settings
    images = _images()
    processor = _their_processor(patch_size=8, max_num_patches=64)
    their_batch = processor(images=images, return_tensors="pt")
    our_batch = naflex_batch([NaFlexPreprocess.for_model(model)(image) for image in images])
    for key, value in their_batch.items():  # the same pixels, patch order, mask and grid shapes
        assert our_batch[key].dtype == value.dtype and torch.equal(our_batch[key], value), key
    for (rows, cols), (height, width) in zip(our_batch["spatial_shapes"].tolist(), SIZES):  # aspect kept, <= 64
        assert rows * cols <= 64 and (rows > cols) == (height > width) and (rows == cols) == (height == width)
    ids = torch.randint(5, 100, (3, 16))
    with torch.no_grad():
        expected = _features(theirs.get_image_features(**their_batch))
        assert (model.encode_image(their_batch) - expected).abs().max() <= 1e-5  # transformers' batch as it is
        assert (model.encode_image(our_batch) - expected).abs().max() <= 1e-5
        assert (model.encode_text(ids) - _features(theirs.get_text_features(input_ids=ids))).abs().max() <= 1e-5
        logits = model(our_batch, ids).logits_per_image
        assert (logits - theirs(input_ids=ids, **their_batch).logits_per_image).abs().max() <= 1e-4
        # a square image goes in as a plain tensor too (what an ONNX export takes): squashed to the tower's own grid,
        # as transformers' processor makes of a square image
        square, squash = [images[2], images[4]], Preprocess(64, **model.normalisation)
        expected = _features(theirs.get_image_features(**processor(images=square, return_tensors="pt")))
        assert (model.encode_image(torch.stack([squash(i) for i in square])) - expected).abs().max() <= 1e-5
    with torch.enable_grad():  # training's path (autograd, no fused inference blocks) takes the mask too
        features = model.encode_image(our_batch)
        features.sum().backward()
    with torch.no_grad():
        assert (features - model.encode_image(our_batch)).abs().max() <= 1e-5
    assert model.visual.positional_embedding.grad.abs().sum() > 0


def test_commands_embed_a_naflex_model_at_each_images_own_aspect_ratio(naflex_folder, tmp_path):
    """`clipforge embed` (and so search, serve, eval, classify: the same batching) runs NaFlex inputs: the stored
    embeddings are transformers' features of its processor's inputs (fp16 shards), at the sequence length
    --max-patches asks for, which the collection records for its image queries."""
    import pyarrow.parquet as pq
    from transformers import Siglip2Model

    from clipforge.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(_images()):
        image.save(folder / f"{i}.png")
    assert main(["embed", str(folder), str(tmp_path / "out"), "--pretrained", str(naflex_folder), "--batch-size",
                 "4", "--no-progress", "--max-patches", "100"]) == 0
    stored = np.load(tmp_path / "out" / "img_emb" / "img_emb_00000.npy").astype(np.float32)
    paths = pq.read_table(tmp_path / "out" / "metadata" / "metadata_00000.parquet").column("path").to_pylist()
    images = [Image.open(folder / Path(path).name) for path in paths]
    with torch.no_grad():
        inputs = _their_processor(patch_size=8, max_num_patches=100)(images=images, return_tensors="pt")
        expected = torch.nn.functional.normalize(
            _features(Siglip2Model.from_pretrained(naflex_folder).eval().get_image_features(**inputs)), dim=-1)
    assert inputs["pixel_values"].shape[1] == 100
    assert len(paths) == len(SIZES) and np.abs(stored - expected.numpy()).max() <= 2e-3
    from clipforge.retrieval.probe import read_probe

    assert set(read_probe(tmp_path / "out")) == {"image"}  # (no tokenizer files in the folder: no text probe)
    from clipforge.inference import load_for_inference

    assert load_for_inference(collection=tmp_path / "out")[1].max_patches == 100  # search, serve: as embedded
    assert load_for_inference(naflex_folder)[1].max_patches == 64  # the model's own grid
    with pytest.raises(ValueError, match="--max-patches sets a SigLIP 2 NaFlex"):
        load_for_inference(str(_square_checkpoint(tmp_path)), max_patches=100)
    _, train_transform, preprocess = clipforge.create_model_and_transforms(str(naflex_folder))  # open_clip's call
    assert isinstance(preprocess, NaFlexPreprocess) and preprocess.max_patches == 64


def _square_checkpoint(tmp_path):
    model = clipforge.create_model("ViT-Tiny-64", vision_cfg={"layers": 1}, text_cfg={"layers": 1})
    config = clipforge.get_model_config("ViT-Tiny-64")
    config["vision_cfg"]["layers"] = config["text_cfg"]["layers"] = 1
    return clipforge.save_pretrained(model, tmp_path / "square", config)


def test_a_naflex_hub_repo_loads_as_its_folder_does(naflex_folder, tmp_path, monkeypatch):
    """hf-hub:OWNER/NAME of a Siglip2Model repo (google/siglip2-*-naflex): config, weights and image processor."""
    from conftest import hub_server

    files = {p.name: p.read_bytes() for p in naflex_folder.iterdir() if p.suffix in (".json", ".safetensors")}
    srv = hub_server(monkeypatch, tmp_path / "cache", "owner/naflex", files)
    try:
        model, preprocess, _ = clipforge.load("hf-hub:owner/naflex")
    finally:
        srv.close()
    local, _, _ = clipforge.load(str(naflex_folder))
    assert preprocess.settings == NaFlexPreprocess(8, 64).settings
    assert model.config["text_cfg"]["hf_tokenizer_name"] == "owner/naflex"  # its tokenizer files: the same repo
    batch = naflex_batch([preprocess(image) for image in _images()])
    with torch.no_grad():
        assert torch.equal(model.encode_image(batch), local.encode_image(batch))


def test_naflex_target_sizes_are_transformers(naflex_folder):
    from transformers.models.siglip2 import image_processing_siglip2 as theirs

    rng = np.random.default_rng(1)
    for patch, most in ((16, 256), (14, 729), (8, 64)):
        preprocess = NaFlexPreprocess(patch, most)
        for height, width in [*rng.integers(1, 3000, (60, 2)).tolist(), (1, 5000), (5000, 1), (224, 224)]:
            assert preprocess.target_size(height, width) == \
                theirs.get_image_size_for_max_num_patches(height, width, patch, most), (patch, most, height, width)


def test_naflex_round_trips_through_convert_to_hf_and_refuses_what_it_cannot(naflex_folder, tmp_path):
    import json

    from transformers import AutoImageProcessor, Siglip2Model

    from clipforge.checkpoint import CheckpointError
    from clipforge.convert import convert

    model, _, _ = clipforge.load(str(naflex_folder))
    out = convert(str(naflex_folder), str(tmp_path / "back"), to="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "siglip2" and config["vision_config"]["num_patches"] == 64
    original, back = Siglip2Model.from_pretrained(naflex_folder), Siglip2Model.from_pretrained(out)
    assert original.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), back.state_dict().values()))
    processor = AutoImageProcessor.from_pretrained(out)
    assert (processor.patch_size, processor.max_num_patches) == (8, 64)
    assert clipforge.load(str(out))[0].config["vision_cfg"] == model.config["vision_cfg"]
    with pytest.raises(CheckpointError, match="open_clip has no NaFlex image tower"):
        convert(str(naflex_folder), str(tmp_path / "oc"), to="open_clip")
    from clipforge.onnx_backend import export_onnx

    with pytest.raises(ValueError, match="ONNX export of a SigLIP 2 NaFlex model is not built"):
        export_onnx(model, tmp_path / "onnx")  # its backend would embed other images than PyTorch's

    with pytest.raises(ValueError, match="whole 8-pixel patches, got 60x64"):
        model.encode_image(torch.zeros(1, 3, 60, 64))
    assert model.encode_image(torch.zeros(2, 3, 32, 128)).shape == (2, 64)  # any grid, positions resized
    batch = naflex_batch([NaFlexPreprocess.for_model(model)(image) for image in _images()[:2]])
    with pytest.raises(ValueError, match=r"spatial_shapes \[\[9, 9\], \[6, 10\]\] do not fit 64 patches"):
        model.encode_image({**batch, "spatial_shapes": torch.tensor([[9, 9], [6, 10]])})
    fixed = clipforge.create_model("ViT-B-16-SigLIP2")
    with pytest.raises(ValueError, match="for SigLIP 2's NaFlex towers; this one takes \\[N, 3, 224, 224\\]"):
        fixed.encode_image(batch)
    with pytest.raises(ValueError, match="NaFlexPreprocess is for SigLIP 2's NaFlex models"):
        NaFlexPreprocess.for_model(fixed)
