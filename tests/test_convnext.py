"""LAION's ConvNeXt CLIP models: clipforge's tower against open_clip's (a timm ConvNeXt) on random weights, the zoo
against open_clip's configs and timm's models."""
import json

import pytest
import torch

import clipforge

from conftest import assert_same_outputs

TOL = 1e-5
# convnext_tiny with open_clip's "mlp" projection (the large_d models' head), small enough to test on CPU
MLP_CONFIG = {"embed_dim": 64,
              "vision_cfg": {"timm_model_name": "convnext_tiny", "timm_model_pretrained": False, "timm_pool": "",
                             "timm_proj": "mlp", "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 64},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _randomised(model):
    """open_clip initialises layer scale at 1e-6: blocks would barely count. Random values make every weight
    matter to the comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", ["convnext_tiny", "Test-ConvNeXt-mlp"])
def test_open_clip_convnext_weights_load_by_name_and_inferred_and_export_back(name, tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from clipforge.checkpoint.openai import save_open_clip
    from clipforge.checkpoint.timm_convnext import config_from_open_clip

    if name == "Test-ConvNeXt-mlp":
        monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, MLP_CONFIG)
        monkeypatch.setattr(clipforge.models, "_EXTRA_CONFIGS", {**clipforge.models._EXTRA_CONFIGS})
        clipforge.models.register_model_config(name, config_from_open_clip(MLP_CONFIG))
    torch.manual_seed(0)
    theirs = _randomised(open_clip.create_model(name, pretrained=None)).eval()
    torch.save(theirs.state_dict(), tmp_path / "w.pt")
    ours = clipforge.load(name, pretrained=str(tmp_path / "w.pt"))[0]
    inferred = clipforge.load(str(tmp_path / "w.pt"))[0]  # no name: the zoo architecture with these shapes
    save_open_clip(ours, tmp_path / "oc")
    back = open_clip.create_model("local-dir:" + str(tmp_path / "oc")).eval()
    size = ours.image_size
    images, tokens = torch.randn(2, 3, size, size), clipforge.tokenize(["a dog", "a photo of a cat"])
    with torch.no_grad():
        expected_image, expected_text = theirs.encode_image(images), theirs.encode_text(tokens)
        for model in (ours, inferred, back):
            assert _max_diff(model.encode_image(images), expected_image) <= TOL
            assert _max_diff(model.encode_text(tokens), expected_text) <= TOL
        assert ours.visual.forward_grid(images).shape == (2, ours.config["vision_cfg"]["dims"][-1], size // 32,
                                                          size // 32)
        for kwargs in ({}, {"image_indices": [0, 2], "text_indices": 1, "normalize_intermediates": True,
                            "output_logits": True},
                       {"image_indices": 2, "stop_early": True, "intermediates_only": True}):
            assert_same_outputs(theirs.forward_intermediates(images, tokens, **kwargs),
                                ours.forward_intermediates(images, tokens, **kwargs))


def test_zoo_convnext_configs_are_open_clips_and_timm_models_are_timms():
    open_clip = pytest.importorskip("open_clip")
    timm = pytest.importorskip("timm")
    from pathlib import Path

    from clipforge.checkpoint.timm_convnext import TIMM_CONVNEXT, config_from_open_clip, config_to_open_clip

    configs = sorted((Path(open_clip.__file__).parent / "model_configs").glob("convnext_*.json"))
    assert len(configs) >= 11
    for path in configs:
        theirs = json.loads(path.read_text())
        ours = clipforge.get_model_config(path.stem)
        assert ours == config_from_open_clip(theirs), path.stem
        back = config_to_open_clip(ours)
        assert {k: back["vision_cfg"][k] for k in ("timm_model_name", "timm_proj", "image_size")} == \
            {k: theirs["vision_cfg"][k] for k in ("timm_model_name", "timm_proj", "image_size")}, path.stem
    for name, (depths, dims, eps) in TIMM_CONVNEXT.items():
        with torch.device("meta"):
            tower = timm.create_model(name, pretrained=False)
        assert [len(stage.blocks) for stage in tower.stages] == depths, name
        assert [stage.blocks[0].conv_dw.in_channels for stage in tower.stages] == dims, name
        assert tower.stages[0].blocks[0].norm.eps == tower.head.norm.eps == tower.stem[1].eps == eps, name


def test_a_convnext_model_has_no_hugging_face_export(tmp_path):
    from clipforge.checkpoint import CheckpointError, hf

    model = clipforge.load("convnext_tiny")[0]
    with pytest.raises(CheckpointError, match="ConvNeXt"):
        hf.save(model, tmp_path / "hf")


def test_the_inference_path_computes_the_training_paths_features():
    """No-grad blocks fold the layer scale and residual into one GEMM and run channels-last: the same features as the
    autograd path (which training runs), within float rounding."""
    torch.manual_seed(0)
    model = clipforge.create_model("convnext_tiny", vision_cfg={"image_size": 64}).eval()
    with torch.no_grad():
        for block in model.visual.modules():
            if hasattr(block, "gamma"):
                block.gamma.uniform_(0.5, 1.5)
        images = torch.randn(2, 3, 64, 64)
        fast = model.encode_image(images)
    slow = model.encode_image(images)
    assert slow.requires_grad and _max_diff(fast, slow) <= 1e-4 * slow.abs().max().item()


@pytest.mark.parametrize("name", ["convnext_tiny", "RN-Tiny-64", "ViT-B-16-SigLIP"])
def test_patch_dropout_is_refused_where_no_patches_are_dropped(name):
    with pytest.raises(ValueError, match="patch dropout is built for CLIP's ViT only"):
        clipforge.create_model(name, vision_cfg={"patch_dropout": 0.5})


def test_convnext_exports_to_onnx_with_eager_features(tmp_path):
    pytest.importorskip("onnxruntime")
    from conftest import onnx_feature_differences

    torch.manual_seed(0)
    config = clipforge.get_model_config("convnext_tiny")
    config["vision_cfg"]["image_size"] = 64
    model = clipforge.create_model(config).eval()
    model.config, model.normalisation = config, {}
    assert onnx_feature_differences(model, tmp_path / "onnx", torch.randn(2, 3, 64, 64)) <= 1e-4
