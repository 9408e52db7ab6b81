"""LiMBer's frozen image encoders: clipforge towers and Hugging Face vision models, pooled and grid features."""
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.captioning import limber
from clipforge.captioning.encoders import grid_shape, open_encoder, pool_grid

transformers = pytest.importorskip("transformers", reason="Hugging Face vision models need transformers")


def _images(n=3):
    return [Image.new("RGB", (48, 40), colour) for colour in ("red", "green", "blue", "white")[:n]]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    return str(clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64"), tmp_path_factory.mktemp("c") / "m"))


def _hf_folder(tmp_path, kind):
    """A small randomly initialised Hugging Face vision model with its image processor, saved to disk."""
    torch.manual_seed(0)
    if kind == "vit":
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=96)
        model, processor = transformers.ViTModel(config), transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    elif kind == "beit":
        config = transformers.BeitConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=96, use_mean_pooling=True)
        model, processor = transformers.BeitModel(config), transformers.BeitImageProcessor(
            size={"height": 32, "width": 32}, do_center_crop=False)
    elif kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                           layer_type="basic")
        model, processor = transformers.ResNetModel(config), transformers.ConvNextImageProcessor(
            size={"shortest_edge": 64}, crop_pct=1.0)
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
        model, processor = transformers.ConvNextModel(config), transformers.ConvNextImageProcessor(
            size={"shortest_edge": 64}, crop_pct=1.0)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder), config


def test_grid_shapes_are_the_most_square_factorisations():
    assert [grid_shape(k) for k in (1, 2, 4, 8, 16)] == [(1, 1), (1, 2), (2, 2), (2, 4), (4, 4)]
    feature_map = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    pooled = pool_grid(feature_map, 4)
    assert pooled.shape == (2, 4, 3)
    torch.testing.assert_close(pooled[0, 0], feature_map[0, :, :2, :2].mean(dim=(1, 2)))  # top-left quarter first


@pytest.mark.parametrize("kind", ["vit", "beit", "resnet", "convnext"])
def test_hugging_face_vision_models_give_pooled_and_grid_features(tmp_path, kind):
    folder, config = _hf_folder(tmp_path, kind)
    width = config.hidden_size if kind in ("vit", "beit") else config.hidden_sizes[-1]
    pooled = open_encoder(folder, features="pooled").features(_images())
    grid = open_encoder(folder, features="grid", k=4).features(_images())
    assert pooled.shape == (3, width) and grid.shape == (3, 4, width)
    assert not torch.allclose(pooled[0], pooled[1])  # different images, different features


def test_clipforge_towers_give_pooled_and_grid_features(clip_folder):
    model, preprocess, _ = clipforge.load(clip_folder)
    pooled = open_encoder(clip_folder).features(_images())
    with torch.no_grad():
        expected = model.encode_image(torch.stack([preprocess(i) for i in _images()]))
    torch.testing.assert_close(pooled, expected)
    grid = open_encoder(clip_folder, features="grid", k=16).features(_images())
    assert grid.shape == (3, 16, 128)  # ViT-Tiny-64: an 8 x 8 patch grid of width 128, pooled to 4 x 4


def test_siglip_and_convnext_towers_are_encoders_too(tmp_path):
    """A transformers SiglipModel folder is read as clipforge's SigLIP (not as a bare vision model, whose forward
    would want text); SigLIP's patch grid has no class token, ConvNeXt's is its last stage's map."""
    torch.manual_seed(0)
    tower = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower))).save_pretrained(tmp_path / "siglip")
    encoder = open_encoder(str(tmp_path / "siglip"), features="grid", k=16)
    assert encoder.kind == "clipforge" and encoder.features(_images()).shape == (3, 16, 48)  # the 4 x 4 patch grid
    assert open_encoder(str(tmp_path / "siglip")).features(_images()).shape == (3, 48)
    model = clipforge.create_model("convnext_tiny", vision_cfg={"image_size": 64})
    clipforge.save_pretrained(model, tmp_path / "convnext")
    assert open_encoder(str(tmp_path / "convnext"), features="grid", k=4).features(_images()).shape == (3, 4, 768)
    assert open_encoder(str(tmp_path / "convnext")).features(_images()).shape == (3, 1024)


@pytest.mark.parametrize("features, k", [("pooled", 4), ("grid", 4), ("grid", 1)])
def test_the_map_takes_either_reading_and_only_it_trains(features, k):
    dim, lm_dim = 8, 6
    mapping = limber.ImageToPrefix(limber.MappingConfig(dim, lm_dim, k, features=features))
    inputs = torch.randn(5, k, dim) if features == "grid" else torch.randn(5, dim)
    mapping.fit_scale(inputs)
    out = mapping(inputs)
    assert out.shape == (5, k, lm_dim)
    expected_weights = dim * lm_dim * (1 if features == "grid" else k)
    assert mapping.proj.weight.numel() == expected_weights  # grid: one layer shared by every position
    with pytest.raises(ValueError, match="expected image features"):
        mapping(torch.randn(5, dim + 1))


def _tiny_lm():
    """A small random Llama: enough to backpropagate a caption loss into the map."""
    from conftest import tiny_llama

    lm, tokenizer = tiny_llama(["</s>", "<unk>", "a", "red", "green", "shape"], hidden_size=16, layers=1, heads=2)
    return lm.eval().requires_grad_(False), tokenizer


@pytest.mark.parametrize("kind", ["clipforge", "hf", "random"])
def test_training_the_map_changes_the_map_and_nothing_else(tmp_path, clip_folder, kind):
    spec = {"clipforge": clip_folder, "hf": _hf_folder(tmp_path, "vit")[0], "random": "ViT-Tiny-64"}[kind]
    features = "grid" if kind == "hf" else "pooled"
    encoder = open_encoder(spec, features=features, k=2, seed=3, save_random_to=tmp_path / "random-tower")
    lm, tokenizer = _tiny_lm()
    snapshot = lambda module: {k: v.clone() for k, v in module.state_dict().items()}  # noqa: E731
    encoder_before, lm_before = snapshot(encoder.model), snapshot(lm)
    image_features = encoder.features(_images(4))
    mapping = limber.ImageToPrefix(limber.MappingConfig(image_features.shape[-1], 16, 2, features=features))
    mapping.fit_scale(image_features)
    mapping.start_from(lm)
    map_before = snapshot(mapping)
    losses, _ = limber.train_mapping(mapping, lm, tokenizer, image_features, [["a red shape"], ["a green shape"]] * 2,
                                     steps=3, batch_size=2, progress=False)
    assert len(losses) == 3
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert all(torch.equal(v, encoder.model.state_dict()[k]) for k, v in encoder_before.items())
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in lm_before.items())
    assert not torch.equal(map_before["proj.weight"], mapping.proj.weight)  # the map, and only it, moved
    if kind == "random":  # the seeded random tower was saved, and reloads to the same features
        again = open_encoder(str(tmp_path / "random-tower"), features=features, k=2)
        torch.testing.assert_close(again.features(_images(4)), image_features)
