"""EVA-CLIP, PE-Core and MobileCLIP's ViTs: timm's Eva towers (EVA01-g, EVA02-B/L with rotary positions and SwiGLU,
EVA02-E post-norm; Meta's Perception Encoder with latent attention pooling, with and without a class token) and timm's
plain ViTs (MobileCLIP-B's convolutional stem, MobileCLIP2-L-14's CLIP-style ViT; ViTamin's convolutional backbone,
GeGLU MLPs and mean pooling) under timm's module names. Parity with timm for each kind and with open_clip's EVA02-B-16,
PE-Core-T-16-384, MobileCLIP-B and ViTamin-S both ways, on random weights (no pretrained weights can be downloaded
here)."""
import json

import pytest
import torch

import clipforge

from conftest import assert_same_outputs, forced_size_gap

TINY = {"width": 64, "heads": 4, "layers": 2}


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("timm_name", ["eva_giant_patch14_224", "eva02_base_patch16_clip_224",
                                       "eva02_large_patch14_clip_336", "eva02_enormous_patch14_clip_224",
                                       "vit_pe_core_base_patch16_224", "vit_pe_core_gigantic_patch14_448",
                                       "vit_base_mci_224", "vit_large_patch14_clip_224", "vitamin_small_224",
                                       "vitamin_xlarge_256"])
def test_each_eva_block_kind_matches_timm(timm_name):
    """Each timm EVA-CLIP model, shrunk to two 64-wide blocks (its own kind of block, rotary table, resolution):
    timm's weights load by name with no renaming and give timm's output (weights moved off their initial values, so
    that every bias and norm counts)."""
    timm = pytest.importorskip("timm")
    from clipforge.checkpoint.timm_eva import tower_config
    from clipforge.models.eva import EvaVisionTower

    torch.manual_seed(0)
    cfg = tower_config(timm_name)
    # MobileCLIP's and ViTamin's convolutional stems are built at their own widths, whatever the transformer's
    tiny = {} if cfg.get("stem") in ("mci", "vitamin") else TINY
    theirs = timm.create_model(timm_name, pretrained=False, num_classes=0 if cfg.get("proj") else 32,
                               global_pool=cfg.get("pool", "token"), depth=2,
                               **({"embed_dim": 64, "num_heads": 4} if tiny else {})).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, buffer in theirs.named_buffers():  # MobileCLIP's stem: batch-norm statistics that count
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    cfg.update(tiny or {"layers": 2})
    mlp = theirs.blocks[0].mlp
    cfg["mlp_ratio"] = (mlp.w2 if cfg["mlp"] == "geglu" else mlp.fc2).weight.shape[1] / cfg["width"]
    ours = EvaVisionTower.from_config(cfg, 32).eval()
    ours.trunk.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        assert _max_diff(ours.trunk(images), theirs(images)) <= 1e-5  # ViTamin's projection is open_clip's
        grid = ours.forward_grid(images)  # LiMBer's grid features: the patch tokens the pooling reads
        side = cfg["image_size"] // cfg["patch_size"]
        assert grid.shape == (2, cfg["width"], side, side)
        if ours.trunk.attn_pool is not None and ours.trunk.cls_token is None:
            pooled = ours.trunk.head(ours.trunk.attn_pool(grid.flatten(2).transpose(1, 2)))
            assert _max_diff(pooled, theirs(images)) <= 1e-5
        # forward_intermediates: timm's block outputs (through the final norm, as patch maps), the tower's embedding
        final, expected = theirs.forward_intermediates(images, indices=[0, -1], norm=True)
        got = ours.forward_intermediates(images, [0, -1], normalize_intermediates=True, output_extra_tokens=True)
        assert [t.shape for t in got["image_intermediates"]] == [t.shape for t in expected] == [grid.shape] * 2
        assert max(map(_max_diff, got["image_intermediates"], expected)) <= 1e-5
        assert _max_diff(got["image_features"], ours(images)) <= 1e-6
        assert _max_diff(ours.trunk.forward_head(final), theirs.forward_head(final)) <= 1e-5
        assert ("image_intermediates_prefix" in got) == (ours.trunk.cls_token is not None)


def test_zoo_eva_configs_are_open_clips_and_timm_towers_are_timms():
    """Every open_clip EVA architecture is in the zoo, translated from open_clip's config and back; each timm tower
    in TIMM_EVA has timm's parameter shapes (built on the meta device: no memory)."""
    open_clip = pytest.importorskip("open_clip")
    timm = pytest.importorskip("timm")
    from pathlib import Path

    from clipforge.checkpoint.timm_eva import TIMM_EVA, config_from_open_clip, config_to_open_clip, tower_config
    from clipforge.models import get_model_config
    from clipforge.models.eva import EvaVisionTower

    folder = Path(open_clip.__file__).parent / "model_configs"
    names = sorted(p.stem for p in [*folder.glob("EVA*.json"), *folder.glob("PE-Core*.json"),
                                    *folder.glob("ViTamin*.json")])
    names += ["MobileCLIP-B", "MobileCLIP2-B", "MobileCLIP2-L-14"]
    assert len(names) == 30
    for name in names:
        theirs, ours = json.loads((folder / f"{name}.json").read_text()), get_model_config(name)
        for key in ("timm_drop", "timm_drop_path"):  # training-only regularisation: not carried
            theirs["vision_cfg"].pop(key, None)
        if theirs["text_cfg"].get("no_causal_mask") is False:  # the default, spelled out
            del theirs["text_cfg"]["no_causal_mask"]
        assert ours == config_from_open_clip(theirs), name
        back = config_to_open_clip(ours)
        # timm names one tower several ways (ViTamin-L2's is L's; XL's 336 and 384 built at the size asked): the
        # name written back may be another of them, never another tower
        size, their_tower = theirs["vision_cfg"]["image_size"], theirs["vision_cfg"].pop("timm_model_name")
        assert tower_config(back["vision_cfg"].pop("timm_model_name"), size) == tower_config(their_tower, size), name
        assert back == theirs, name
        assert [t for _, t in clipforge.list_pretrained(name)] == list(open_clip.list_pretrained_tags_by_model(name))
    source = clipforge.pretrained.get_pretrained("ViTamin-S", "datacomp1b")  # a hub repo's one named file
    assert source.url.endswith("/jienengchen/ViTamin-S/resolve/main/pytorch_model.bin") and source.fallback_url is None
    for timm_name in TIMM_EVA:
        cfg = tower_config(timm_name)
        with torch.device("meta"):
            theirs = timm.create_model(timm_name, pretrained=False, num_classes=0 if cfg.get("proj") else 512,
                                       global_pool=cfg.get("pool", "token"))
            ours = EvaVisionTower.from_config(cfg, 512)
        assert {k: v.shape for k, v in ours.trunk.state_dict().items()} == \
            {k: v.shape for k, v in theirs.state_dict().items()}, timm_name
        assert ours.trunk.blocks[0].post_norm == (type(theirs.blocks[0]).__name__ == "EvaBlockPostNorm")
        assert (ours.trunk.rope is not None) == (getattr(theirs, "rope", None) is not None)
        assert (ours.trunk.attn_pool is None) or ours.trunk.attn_pool.heads == theirs.attn_pool.num_heads


@pytest.mark.parametrize("name", ["EVA02-B-16", "PE-Core-T-16-384", "MobileCLIP-B", "ViTamin-S"])
def test_open_clip_eva_and_pe_load_by_name_and_by_shapes_and_export_back(name, tmp_path):
    """open_clip's EVA02-B-16 and PE-Core-T-16-384 (timm towers, rotary positions; PE's latent attention pooling),
    MobileCLIP-B's (a class token without a position) and ViTamin-S's: a state dict loads by name and, without one, by
    its shapes with identical features; `convert --to open_clip` writes a local-dir: folder open_clip loads with them;
    loaded at another image size (``force_image_size``), the features are open_clip's at that size (positions
    resampled as timm's ``set_input_size`` resamples them, rotary frequencies of the trained grid)."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from clipforge.checkpoint.openai import save_open_clip

    torch.manual_seed(0)
    theirs = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():  # timm starts the latent pooling's biases at zero: moved, so that they count
        for key, p in theirs.named_parameters():
            if key.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.02)
    torch.save(theirs.state_dict(), tmp_path / "w.pt")
    named = clipforge.load_model(name, pretrained=str(tmp_path / "w.pt"))
    inferred, _, _ = clipforge.load(str(tmp_path / "w.pt"))
    assert inferred.config["vision_cfg"] == named.config["vision_cfg"]
    save_open_clip(named, tmp_path / "oc")
    back = open_clip.create_model("local-dir:" + str(tmp_path / "oc")).eval()
    size = named.image_size
    images, ids = torch.randn(2, 3, size, size), open_clip.get_tokenizer(name)(["a dog", "a photo of a cat"])
    with torch.no_grad():
        expected_image, expected_text = theirs.encode_image(images), theirs.encode_text(ids)
        for model in (named, inferred, back):
            assert _max_diff(model.encode_image(images), expected_image) <= 1e-4
            assert _max_diff(model.encode_text(ids), expected_text) <= 1e-5
        for kwargs in ({}, {"image_indices": [0, -1], "normalize_intermediates": True, "output_logits": True}):
            assert_same_outputs(theirs.forward_intermediates(images, ids, **kwargs),
                                named.forward_intermediates(images, ids, **kwargs), tolerance=1e-4)
    assert forced_size_gap(open_clip, name, tmp_path / "w.pt", size + 32) <= 1e-4


def test_eva_refuses_what_it_does_not_build_and_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from clipforge.checkpoint import hf
    from conftest import onnx_feature_differences

    overrides = dict(vision_cfg={**TINY, "image_size": 32}, text_cfg={"layers": 1, "width": 64, "heads": 4})
    torch.manual_seed(0)
    model = clipforge.create_model("EVA02-B-16", **overrides).eval()
    model.config = clipforge.models.get_model_config("EVA02-B-16")
    clipforge.models.merge_config(model.config, overrides)
    with pytest.raises(clipforge.CheckpointError, match="no EVA image tower"):
        hf.save(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="patch dropout"):
        clipforge.create_model("EVA02-B-16", vision_cfg={"patch_dropout": 0.5})
    assert onnx_feature_differences(model, tmp_path / "onnx", torch.randn(3, 3, 32, 32)) <= 1e-4
    vitamin = dict(vision_cfg={"layers": 2, "image_size": 64}, text_cfg={"layers": 1})  # its convolutional backbone
    model = clipforge.create_model("ViTamin-S", **vitamin).eval()
    model.config = clipforge.models.get_model_config("ViTamin-S")
    clipforge.models.merge_config(model.config, vitamin)
    with pytest.raises(clipforge.CheckpointError, match="no ViTamin image tower"):
        hf.save(model, tmp_path / "hf")
    assert onnx_feature_differences(model, tmp_path / "onnx-vitamin", torch.randn(3, 3, 64, 64)) <= 1e-4
