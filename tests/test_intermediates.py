"""forward_intermediates and prune_intermediate_layers: open_clip's API for the towers' block outputs, on random
weights loaded into both libraries."""
import json

import pytest
import torch

import clipforge
from clipforge.checkpoint import clipforge_to_openai

from conftest import assert_same_outputs, random_tokens

# the keyword sets a feature-extraction script passes: defaults; some blocks, normalised, with class tokens and
# logits; only the blocks' outputs, run no further than the last one asked for
CALLS = [
    {},
    {"image_indices": 2, "text_indices": [0, -1], "normalize_intermediates": True, "image_output_extra_tokens": True,
     "output_logits": True, "output_logit_scale_bias": True},
    {"image_indices": [1], "text_indices": [1], "stop_early": True, "intermediates_only": True},
]


@pytest.fixture(scope="module", params=["ViT-B-32", "RN50"])
def open_clip_pair(request):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    ours = clipforge.create_model(request.param).eval()
    theirs = open_clip.create_model(request.param, pretrained=None).eval()
    theirs.load_state_dict(clipforge_to_openai(ours.state_dict()))
    return theirs, ours


@pytest.mark.parametrize("call", range(len(CALLS)))
def test_intermediates_equal_open_clips(open_clip_pair, call):
    theirs, ours = open_clip_pair
    images, tokens = torch.randn(2, 3, ours.image_size, ours.image_size), random_tokens(3)
    kwargs = dict(CALLS[call])
    if call == 2 and ours.visual.__class__.__name__ == "VisionTransformer":
        kwargs["image_output_fmt"] = "NLC"
    with torch.no_grad():
        expected, got = theirs.forward_intermediates(images, tokens, **kwargs), ours.forward_intermediates(
            images, tokens, **kwargs)
        assert_same_outputs(expected, got)
        if not kwargs.get("intermediates_only"):  # the embeddings are the ones encode_* give
            assert torch.allclose(got["image_features"], ours.encode_image(images, normalize=True), atol=1e-6)
            assert torch.allclose(got["text_features"], ours.encode_text(tokens, normalize=True), atol=1e-6)
    vit = hasattr(ours.visual, "patch_size")
    if vit and call < 2:  # patch maps [N, width, grid, grid]
        grid = ours.image_size // ours.visual.patch_size
        assert got["image_intermediates"][0].shape == (2, ours.visual.transformer.width, grid, grid)
    assert len(got["image_intermediates"]) == {0: 12 if vit else 5, 1: 2, 2: 1}[call]  # a ResNet: stem + 4 stages
    assert len(got["text_intermediates"]) == {0: 12, 1: 2, 2: 1}[call]


def test_siglip_and_coca_intermediates_equal_open_clips(monkeypatch, tmp_path):
    """SigLIP's tower (timm's in open_clip: no class token, attention pooling, a logit bias) and CoCa's (attentional
    pooling; a class token appended to the text, returned apart as its suffix)."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from test_coca import TINY_COCA, _named_open_clip_coca

    torch.manual_seed(0)
    theirs = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
    torch.save(theirs.state_dict(), tmp_path / "siglip.pt")
    ours = clipforge.load_model("ViT-B-16-SigLIP", pretrained=str(tmp_path / "siglip.pt"))
    images, ids = torch.randn(2, 3, 224, 224), torch.randint(0, 32000, (3, 64))
    with torch.no_grad():
        for kwargs in CALLS[:2] + [{"image_indices": [0, 5], "image_output_fmt": "NLC", "output_logits": True}]:
            assert_same_outputs(theirs.forward_intermediates(images, ids, **kwargs),
                                 ours.forward_intermediates(images, ids, **kwargs))
        assert ours.forward_intermediates(images, ids)["image_intermediates"][0].shape == (2, 768, 14, 14)

    name, theirs, weights = _named_open_clip_coca(TINY_COCA, "Test-CoCa-tiny", monkeypatch, tmp_path)
    ours = clipforge.load_model(name, pretrained=str(weights))
    images, tokens = torch.randn(2, 3, ours.image_size, ours.image_size), random_tokens(3, ours.context_length)
    extra = {"image_indices": 1, "text_indices": [0], "image_output_extra_tokens": True,
             "text_output_extra_tokens": True, "output_logit_scale_bias": True}
    with torch.no_grad():
        for kwargs in ({}, extra):  # (open_clip's CoCa does not compute logits here: "FIXME")
            expected, got = theirs.forward_intermediates(images, tokens, **kwargs), ours.forward_intermediates(
                images, tokens, **kwargs)
            assert_same_outputs(expected, got)
        assert got["text_intermediates"][0].shape[1] == ours.context_length  # the class token apart, in the suffix
        assert got["text_intermediates_suffix"][0].shape[1] == 1
        with pytest.raises(ValueError, match="pooled queries"):
            ours.forward_intermediates(images, normalize_intermediates=True)


def test_pruned_towers_give_the_kept_blocks_embedding():
    """A ViT pruned to its first blocks embeds as open_clip's pruned alike (the class token of the last kept
    block, through ln_post, unprojected); a text tower pruned gives the features its stop_early intermediates do."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    ours = clipforge.create_model("ViT-Tiny-64").eval()
    config = json.loads(json.dumps(ours.config))
    images, tokens = torch.randn(2, 3, 64, 64), random_tokens(3, ours.context_length)
    with torch.no_grad():
        stopped = ours.forward_intermediates(images, tokens, image_indices=[1], text_indices=[2], stop_early=True,
                                             normalize=False)
        assert ours.visual.prune_intermediate_layers([1], prune_head=False) == [1]
        assert len(ours.visual.transformer.resblocks) == 2
        assert torch.allclose(ours.encode_image(images), stopped["image_features"], atol=1e-6)
        assert ours.text.prune_intermediate_layers([2], prune_head=False) == [2]
        assert torch.allclose(ours.encode_text(tokens), stopped["text_features"], atol=1e-6)
        # pruning the head too: the width of the tower, as open_clip's
        ours.visual.prune_intermediate_layers(1, prune_norm=True)
        assert ours.visual.proj is None and ours.encode_image(images).shape == (2, ours.visual.transformer.width)

    reference = clipforge.create_model("ViT-B-32").eval()
    theirs = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    theirs.load_state_dict(clipforge_to_openai(reference.state_dict()))
    assert theirs.visual.prune_intermediate_layers([3]) == reference.visual.prune_intermediate_layers([3])
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (theirs.visual(images) - reference.visual(images)).abs().max().item() <= 1e-5
    assert config == ours.config  # pruning changes the modules, not the recorded config


def test_bad_requests_are_named():
    model = clipforge.create_model("ViT-Tiny-64").eval()
    images, tokens = torch.randn(2, 3, 64, 64), random_tokens(2, model.context_length)
    layers = model.visual.transformer.layers
    with pytest.raises(ValueError, match=f"index {layers} out of range for {layers} blocks"):
        model.forward_intermediates(images, image_indices=[layers])
    with pytest.raises(ValueError, match="last 0 of"):
        model.forward_intermediates(images, image_indices=0)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(images, image_output_fmt="NHWC")
    with pytest.raises(ValueError, match="text tower's intermediates are token sequences"):
        model.forward_intermediates(text=tokens, text_output_fmt="NCHW")
    with pytest.raises(ValueError, match="output_logits needs both"):
        model.forward_intermediates(images, output_logits=True)
    # patch dropout in training drops tokens: no grid to shape them into, tokens as they are
    dropping = clipforge.create_model("ViT-Tiny-64", vision_cfg={"patch_dropout": 0.5}).train()
    with pytest.raises(ValueError, match="ask for output_fmt='NLC'"):
        dropping.forward_intermediates(images)
    kept = dropping.forward_intermediates(images, image_output_fmt="NLC", image_indices=1)["image_intermediates"]
    assert kept[0].shape[1] == (64 // dropping.visual.patch_size) ** 2 // 2
    resnet = clipforge.create_model("RN-Tiny-64").eval()
    with pytest.raises(ValueError, match="ask for intermediates_only"):
        resnet.forward_intermediates(images, image_indices=[1], stop_early=True)
    assert len(resnet.forward_intermediates(images, image_indices=[1], stop_early=True,
                                            intermediates_only=True)["image_intermediates"]) == 1
    model.text = torch.nn.Identity()  # a kind of tower added without the call
    with pytest.raises(NotImplementedError, match="text tower, a Identity, has none"):
        model.forward_intermediates(images, tokens)


def test_a_hugging_face_text_tower_gives_transformers_hidden_states():
    """The recipe's MiniLM tower (clipforge's BERT): its layers' outputs are those transformers' BertModel gives as
    hidden_states (open_clip's Hugging Face towers have no forward_intermediates), its features encode_text's."""
    transformers = pytest.importorskip("transformers")
    from clipforge.models.hf_text import resolve_hf_model

    model = clipforge.create_model("ViT-Tiny-64-MiniLM").eval()
    tokens = clipforge.get_tokenizer("ViT-Tiny-64-MiniLM")(["a dog runs on the grass", "two girls in a fountain"])
    theirs = transformers.AutoModel.from_pretrained(resolve_hf_model("all-minilm-l6-v2"),
                                                    add_pooling_layer=False).eval()
    with torch.no_grad():
        out = model.forward_intermediates(text=tokens, text_indices=[0, -1], normalize=False)
        states = theirs(input_ids=tokens, attention_mask=tokens.ne(0).long(), output_hidden_states=True).hidden_states
        assert len(out["text_intermediates"]) == 2
        for got, expected in zip(out["text_intermediates"], (states[1], states[-1])):
            assert got.shape == expected.shape == (2, model.context_length, 384)
            assert (got - expected).abs().max() <= 1e-5
        assert torch.allclose(out["text_features"], model.encode_text(tokens), atol=1e-6)
        with pytest.raises(ValueError, match="ask for intermediates_only"):
            model.forward_intermediates(text=tokens, text_indices=[0], stop_early=True)


def test_a_cached_text_tower_still_runs_its_blocks():
    """A locked text tower with a feature cache (training's --text-cache) gives its blocks' outputs, and the
    features the cache holds."""
    model = clipforge.create_model("ViT-Tiny-64").eval()
    model.lock_text_tower()
    tokens = random_tokens(4, model.context_length)
    cache = model.text.cache_features()
    cache.fill(tokens)
    with torch.no_grad():
        out = model.forward_intermediates(text=tokens, normalize=False)
    assert len(out["text_intermediates"]) == model.text.transformer.layers
    assert torch.allclose(out["text_features"], model.encode_text(tokens), atol=1e-6)


def test_a_pruned_model_is_not_saved_as_a_checkpoint_its_config_no_longer_describes(tmp_path):
    """Every format refuses it by name (it would otherwise write weights that no loader takes back); the same model
    saved before pruning loads."""
    from clipforge.checkpoint import hf, openai
    from clipforge.checkpoint.errors import CheckpointError
    from clipforge.checkpoint.io import save_pretrained

    model = clipforge.create_model("ViT-Tiny-64").eval()
    save_pretrained(model, tmp_path / "before")
    model.text.prune_intermediate_layers([1])
    for save in (lambda: save_pretrained(model, tmp_path / "ours"), lambda: hf.save(model, tmp_path / "hf"),
                 lambda: openai.save(model, tmp_path / "openai.pt"),
                 lambda: openai.save_open_clip(model, tmp_path / "oc")):
        with pytest.raises(CheckpointError, match="text: pruned by prune_intermediate_layers"):
            save()
    assert not any((tmp_path / name).exists() for name in ("ours", "hf", "openai.pt", "oc"))
    loaded, _, _ = clipforge.load(str(tmp_path / "before"))
    assert len(loaded.text.transformer.resblocks) == model.config["text_cfg"]["layers"]
