"""MobileCLIP-S's image towers: timm's FastViT "MCi" (RepMixer and attention stages, MobileOne branches that fold
into one convolution in eval mode) under timm's module names. Parity with timm for each of the five towers in
training and eval mode (outputs and gradients), with open_clip's MobileCLIP2-S0 both ways, on random weights (no
pretrained weights can be downloaded here)."""
import json

import pytest
import torch

import clipforge

from conftest import assert_same_outputs


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm statistics, layer scales and norm weights off their initial values, so that every branch counts
    (timm starts layer scales at 1e-5 and running statistics at 0 and 1)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                tensor.normal_(0.0, 0.1)
            elif name.endswith("gamma"):
                tensor.uniform_(0.5, 1.0)
            elif name.endswith(("bn.weight", "identity.weight", "norm.weight")):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                tensor.normal_(0.0, 0.02)
    return model


def _relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("timm_name", ["fastvit_mci0", "fastvit_mci1", "fastvit_mci2", "fastvit_mci3",
                                       "fastvit_mci4"])
def test_each_fastvit_tower_matches_timm_in_training_and_eval(timm_name):
    """Each MobileCLIP tower, one block per stage (its own widths, mixers, norms and stem): timm's weights load by
    name; training mode (batch statistics, every branch) gives timm's output and gradients; eval mode, where each
    branch group runs as one convolution, gives timm's output and gradients (as timm's trained form computes them)
    and timm's re-parameterised model's."""
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    from clipforge.checkpoint.timm_fastvit import tower_config
    from clipforge.models.clip import build_vision_tower

    torch.manual_seed(0)
    cfg = tower_config(timm_name, image_size=64)
    cfg["depths"] = [1] * len(cfg["depths"])
    theirs = _randomised(timm.create_model(timm_name, pretrained=False, num_classes=32, global_pool="avg",
                                           layers=tuple(cfg["depths"])))
    ours = build_vision_tower(cfg, 32, False)
    ours.trunk.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    for training in (True, False):
        theirs.train(training), ours.train(training)
        expected, got = theirs(images), ours(images)
        assert _relative_diff(got, expected) <= 1e-5, training
        expected.square().sum().backward(), got.square().sum().backward()
        grads = dict(theirs.named_parameters())
        for name, p in ours.trunk.named_parameters():
            assert _relative_diff(p.grad, grads[name].grad) <= 1e-4, (training, name)
        theirs.zero_grad(), ours.zero_grad()
    for name, buffer in ours.trunk.named_buffers():  # the training step moved the statistics alike
        assert torch.allclose(buffer.float(), theirs.get_buffer(name).float(), atol=1e-6), name
    with torch.no_grad():
        fused = reparameterize_model(theirs).eval()
        assert _relative_diff(ours(images), fused(images)) <= 1e-5
        side = 64 // 2 ** (len(cfg["dims"]) + 1)  # a quarter from the stem, a half per later stage
        assert ours.forward_grid(images).shape == (2, 2 * cfg["dims"][-1], side, side)


def test_zoo_fastvit_configs_are_open_clips_and_timm_towers_are_timms():
    """Every open_clip MobileCLIP-S architecture is in the zoo, translated from open_clip's config and back; each timm
    tower in TIMM_FASTVIT has timm's parameter names and shapes (built on the meta device: no memory)."""
    open_clip = pytest.importorskip("open_clip")
    timm = pytest.importorskip("timm")
    from pathlib import Path

    from clipforge.checkpoint.timm_fastvit import TIMM_FASTVIT, config_from_open_clip, config_to_open_clip, \
        tower_config
    from clipforge.models import get_model_config, tower_kind
    from clipforge.models.clip import build_vision_tower

    folder = Path(open_clip.__file__).parent / "model_configs"
    names = sorted(p.stem for p in folder.glob("MobileCLIP*-S*.json"))
    assert names == ["MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP2-S0", "MobileCLIP2-S2", "MobileCLIP2-S3",
                     "MobileCLIP2-S4"]
    for name in names:
        theirs, ours = json.loads((folder / f"{name}.json").read_text()), get_model_config(name)
        for key in ("timm_drop", "timm_drop_path"):  # training-only regularisation: not carried
            theirs["vision_cfg"].pop(key)
        assert ours == config_from_open_clip(theirs), name
        assert config_to_open_clip(ours) == theirs, name
        assert tower_kind(ours) == "FastViT" and not ours["text_cfg"]["causal"]
        assert [t for _, t in clipforge.list_pretrained(name)] == list(open_clip.list_pretrained_tags_by_model(name))
    for timm_name in TIMM_FASTVIT:
        with torch.device("meta"):
            theirs = timm.create_model(timm_name, pretrained=False, num_classes=512, global_pool="avg")
            ours = build_vision_tower(tower_config(timm_name), 512, False)
        assert {k: v.shape for k, v in ours.trunk.state_dict().items()} == \
            {k: v.shape for k, v in theirs.state_dict().items()}, timm_name


def test_open_clip_mobileclip_loads_by_name_and_by_shapes_and_export_back(tmp_path):
    """open_clip's MobileCLIP2-S0 (a FastViT with batch-norm statistics, a bidirectional text tower): a state dict
    loads by name and, without one, by its shapes with identical features; `convert --to open_clip` writes a
    local-dir: folder open_clip (and clipforge) loads with them; preprocessing is the tag's (no normalisation,
    bilinear)."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from clipforge.checkpoint.openai import save_open_clip

    torch.manual_seed(0)
    theirs = _randomised(open_clip.create_model("MobileCLIP2-S0", pretrained=None)).eval()
    torch.save(theirs.state_dict(), tmp_path / "w.pt")
    named = clipforge.load_model("MobileCLIP2-S0", pretrained=str(tmp_path / "w.pt"))
    inferred, _, _ = clipforge.load(str(tmp_path / "w.pt"))
    assert inferred.config["vision_cfg"] == named.config["vision_cfg"]
    assert inferred.config["text_cfg"] == {**named.config["text_cfg"], "mlp_ratio": 4.0}  # causal: False, 8 heads
    save_open_clip(named, tmp_path / "oc")
    back = open_clip.create_model("local-dir:" + str(tmp_path / "oc")).eval()
    again = clipforge.load(str(tmp_path / "oc"))[0]  # the open_clip folder, read back by clipforge
    images, ids = torch.randn(2, 3, 256, 256), open_clip.get_tokenizer("MobileCLIP2-S0")(["a dog", "a photo of a cat"])
    with torch.no_grad():
        expected_image, expected_text = theirs.encode_image(images), theirs.encode_text(ids)
        for model in (named, inferred, back, again):
            assert _relative_diff(model.encode_image(images), expected_image) <= 1e-5
            assert _relative_diff(model.encode_text(ids), expected_text) <= 1e-5
        for kwargs in ({}, {"image_indices": [0, 2], "text_indices": 1, "output_logits": True},
                       {"image_indices": 2, "stop_early": True, "intermediates_only": True}):
            assert_same_outputs(theirs.forward_intermediates(images, ids, **kwargs),
                                named.forward_intermediates(images, ids, **kwargs))
    source = clipforge.pretrained.get_pretrained("MobileCLIP2-S0", "dfndr2b")
    assert source.preprocess == {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "bilinear"}


def test_fastvit_trains_refuses_what_it_does_not_build_and_exports_to_onnx(tmp_path):
    """A CLIP with a FastViT tower takes a training step (batch statistics move, every weight gets a gradient); the
    Hugging Face export, patch dropout and malformed stage lists are refused by name; ONNX export matches eager."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from clipforge.checkpoint import hf
    from clipforge.loss import ClipLoss
    from conftest import onnx_feature_differences

    overrides = dict(vision_cfg={"image_size": 64, "depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]},
                     text_cfg={"layers": 1, "width": 64, "heads": 4})
    torch.manual_seed(0)
    model = clipforge.create_model("MobileCLIP2-S0", **overrides)
    model.config = clipforge.models.get_model_config("MobileCLIP2-S0")
    clipforge.models.merge_config(model.config, overrides)
    images, tokens = torch.randn(4, 3, 64, 64), clipforge.tokenize(["a dog", "a cat", "a car", "a tree"])
    before = model.visual.trunk.stem[0].conv_kxk[0].bn.running_mean.clone()
    out = model(images, tokens)
    ClipLoss()(out.image_features, out.text_features, out.logit_scale).backward()
    assert all(p.grad is not None for p in model.visual.parameters())
    assert not torch.equal(before, model.visual.trunk.stem[0].conv_kxk[0].bn.running_mean)
    model.eval()
    with pytest.raises(clipforge.CheckpointError, match="no FastViT image tower"):
        hf.save(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="patch dropout"):
        clipforge.create_model("MobileCLIP2-S0", vision_cfg={"patch_dropout": 0.5})
    with pytest.raises(ValueError, match="one depth, width and mixer"):
        clipforge.create_model("MobileCLIP2-S0", vision_cfg={"depths": [1, 1, 1]})
    assert onnx_feature_differences(model, tmp_path / "onnx", torch.randn(3, 3, 64, 64)) <= 1e-4
