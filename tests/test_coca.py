"""CoCa: open_clip's contrastive captioners (coca_ViT-B-32, coca_ViT-L-14) load with open_clip's module names;
embeddings, the decoder's caption logits and generated captions match open_clip's on random weights (no pretrained
weights can be downloaded here), for a small CoCa and for the zoo's configs."""
import json

import pytest
import torch

import clipforge
import clipforge.models

# coca_ViT-B-32's layout, shrunk: 64 wide, 2 layers per tower, 16 pooled queries
TINY_COCA = {"embed_dim": 64,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "patch_size": 16, "attentional_pool": True,
                            "attn_pooler_heads": 4, "attn_pooler_queries": 16, "output_tokens": True},
             "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                          "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                                "attn_pooler_heads": 4},
             "custom_text": True}


def _randomised(model):
    """Biases and norms off their initial values (open_clip starts them at 0 and 1), so that every one counts; the
    decoder's vocabulary projection drawn (open_clip leaves it as torch.empty made it, often zeros: every logit
    equal, and "greedy" captions would be uniform samples)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_final" in name or "ln_post" in name:
                p.add_(torch.randn_like(p) * 0.1)
        vocabulary = model.text_decoder.text_projection
        torch.nn.init.normal_(vocabulary, std=vocabulary.shape[0] ** -0.5)
    return model


def _named_open_clip_coca(config, name, monkeypatch, folder):
    """open_clip's CoCa of ``config`` on random weights, saved as open_clip's state dict; both zoos know ``name``."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("transformers")  # open_clip's generate uses its logits processors
    from clipforge.checkpoint.openai import config_from_open_clip

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, config)
    monkeypatch.setattr(clipforge.models, "_EXTRA_CONFIGS", {**clipforge.models._EXTRA_CONFIGS})
    clipforge.models.register_model_config(name, config_from_open_clip(json.loads(json.dumps(config)), "test"))
    torch.manual_seed(0)
    theirs = _randomised(open_clip.create_model(name, pretrained=None)).eval()
    torch.save(theirs.state_dict(), folder / "w.pt")
    return name, theirs, folder / "w.pt"


@pytest.fixture()
def tiny_coca(monkeypatch, tmp_path):
    return _named_open_clip_coca(TINY_COCA, "Test-CoCa-tiny", monkeypatch, tmp_path)


def _greedy_open_clip_generation(monkeypatch):
    """open_clip 3.3's CoCa turns generation off whole when transformers (5.x) lacks BeamSearchScorer, though its
    top-k and top-p paths need only the logits warpers, which transformers has: switched back on for those."""
    from open_clip import coca_model
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", TopKLogitsWarper)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_p", TopPLogitsWarper)


def test_coca_embeddings_and_caption_logits_match_open_clip_by_name_by_shapes_and_back(tiny_coca, tmp_path):
    """A CoCa state dict loads by name and, without one, by its shapes; image and text embeddings and the decoder's
    logits (teacher forcing, padding in the batch) equal open_clip's; `convert --to open_clip` writes a folder, and
    `--to openai` a state dict, that open_clip loads with the same outputs."""
    open_clip = pytest.importorskip("open_clip")
    from clipforge.checkpoint.openai import save_open_clip

    name, theirs, weights = tiny_coca
    named = clipforge.load_model(name, pretrained=str(weights))
    inferred = clipforge.load(str(weights))[0]
    assert {tower: {k: v for k, v in inferred.config[tower].items() if (k, v) != ("mlp_ratio", 4.0)}
            for tower in ("vision_cfg", "text_cfg", "multimodal_cfg")} == \
        {tower: named.config[tower] for tower in ("vision_cfg", "text_cfg", "multimodal_cfg")}  # heads from the zoo
    save_open_clip(named, tmp_path / "oc")
    back = open_clip.create_model("local-dir:" + str(tmp_path / "oc")).eval()
    images = torch.randn(3, 3, 64, 64)
    tokens = open_clip.get_tokenizer(name)(["a dog", "a photo of a cat on a mat", "red"])
    assert tokens.shape == (3, 76) and (clipforge.get_tokenizer(name)(["a dog"]) == tokens[:1]).all()
    with torch.no_grad():
        expected = theirs(images, tokens)
        for model in (named, inferred):
            # open_clip's CoCa normalises by default
            expected_image, expected_text = theirs.encode_image(images, False), theirs.encode_text(tokens, False)
            assert (model.encode_image(images) - expected_image).abs().max() <= 1e-5
            assert (model.encode_text(tokens) - expected_text).abs().max() <= 1e-5
            logits = model.caption_logits(images, tokens[:, :-1])  # open_clip's forward aligns inputs with labels
            assert (logits - expected["logits"]).abs().max() <= 1e-4
        assert (back(images, tokens)["logits"] - expected["logits"]).abs().max() <= 1e-4
    # `convert --to openai`: CLIP's text weights at the top level, CoCa's class token left under text., which
    # open_clip's reader expects; both libraries read the file back
    from clipforge.checkpoint import openai

    openai.save(named, tmp_path / "openai.pt")
    assert "text.cls_emb" in torch.load(tmp_path / "openai.pt", weights_only=True)
    theirs_again = open_clip.create_model(name, pretrained=str(tmp_path / "openai.pt")).eval()
    ours_again = clipforge.load_model(name, pretrained=str(tmp_path / "openai.pt"))
    with torch.no_grad():
        assert (theirs_again(images, tokens)["logits"] - expected["logits"]).abs().max() <= 1e-4
        assert (ours_again.caption_logits(images, tokens[:, :-1]) - expected["logits"]).abs().max() <= 1e-4


def test_coca_generates_open_clips_captions_and_trains(tiny_coca, monkeypatch):
    """Greedy captions (open_clip's ``generate`` with top_k=1) are token for token open_clip's, minimum length and
    the forced end-of-text included; top-p sampling keeps only tokens open_clip's warper keeps; the captioning loss is
    open_clip's CoCaLoss's, and with the contrastive loss reaches every tower, with the same gradients under
    gradient checkpointing."""
    from transformers import TopPLogitsWarper

    name, theirs, weights = tiny_coca
    _greedy_open_clip_generation(monkeypatch)
    ours = clipforge.load_model(name, pretrained=str(weights))
    images = torch.randn(4, 3, 64, 64)
    expected = theirs.generate(images, generation_type="top_k", top_k=1, seq_len=12, min_seq_len=5)
    got = ours.generate(images, max_length=12, min_length=5)
    assert torch.equal(got, expected)
    assert (got[:, 1:5] != 49407).all() and got.shape[1] <= 12
    from clipforge.models.coca import _filter_top_p
    logits = torch.randn(5, 300)
    assert torch.equal(_filter_top_p(logits, 0.3), TopPLogitsWarper(0.3)(None, logits.clone()))
    sampled = ours.generate(images, max_length=8, min_length=2, top_k=None, top_p=0.9,
                            generator=torch.Generator().manual_seed(0))
    assert sampled.shape[0] == 4 and (sampled[:, 0] == 49406).all()

    ours.train()
    tokens = clipforge.get_tokenizer(name)(["a dog", "a cat", "a car", "a tree"])
    from open_clip.loss import CoCaLoss

    with torch.no_grad():
        expected = theirs(images, tokens)
        _, expected_caption = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)(
            expected["image_features"], expected["text_features"], expected["logits"], expected["labels"],
            expected["logit_scale"])
        ours.eval()
        assert abs(ours.caption_loss(images, tokens).item() - expected_caption.item()) <= 1e-5
        ours.train()

    def gradients():
        ours.zero_grad()
        out = ours(images, tokens)
        (ours.caption_loss(images, tokens) + (out.image_features @ out.text_features.T).logsumexp(1).mean()).backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    plain = gradients()
    assert all(n in plain for n, _ in ours.named_parameters() if not n.startswith("logit"))
    ours.set_grad_checkpointing(True)  # the decoder's blocks too: the same gradients
    assert ours.text_decoder.grad_checkpointing
    for key, grad in gradients().items():
        torch.testing.assert_close(grad, plain[key], atol=1e-5, rtol=1e-4, msg=key)


# Run by open_clip itself in a process whose transformers is 4.56 (open_clip's beam search needs BeamSearchScorer)
OPEN_CLIP_GENERATE = """
import json, sys, torch, open_clip
from open_clip import coca_model
assert coca_model._has_transformers, "open_clip's generate is off: transformers 4.x is not first on the path"
config, weights, images, settings, out = sys.argv[1:]
open_clip.factory._MODEL_CONFIGS["Test-CoCa-tiny"] = json.load(open(config))
model = open_clip.create_model("Test-CoCa-tiny", pretrained=weights).eval()
images = torch.load(images)
forward, results = model.forward, {}


def log_prob_forward(*args, **kwargs):  # its beam search over log-probabilities: the logits log-softmaxed
    out = forward(*args, **kwargs)
    return {**out, "logits": out["logits"].log_softmax(-1)}


for name, (kwargs, _) in json.load(open(settings)).items():
    model.forward = log_prob_forward if kwargs.pop("log_probs", False) else forward
    results[name] = model.generate(images, **kwargs)
torch.save(results, out)
"""


def test_a_coca_text_tower_with_layer_scale_captions_and_embeds_as_open_clips(monkeypatch, tmp_path):
    """open_clip's ``text_cfg.ls_init_value`` in a CoCa: the position-at-a-time decoder scales the text tower's
    branches as the full forward does, so greedy captions, text embeddings and the caption loss are open_clip's; a
    bare state dict shows the scales."""
    from open_clip.loss import CoCaLoss

    config = {**TINY_COCA, "text_cfg": {**TINY_COCA["text_cfg"], "ls_init_value": 1e-4}}
    name, theirs, weights = _named_open_clip_coca(config, "Test-CoCa-tiny-ls", monkeypatch, tmp_path)
    with torch.no_grad():
        for name_, p in theirs.named_parameters():
            if name_.endswith("gamma"):  # LayerScale's, moved far off 1e-4 so that they count
                p.uniform_(-1, 1)
    torch.save(theirs.state_dict(), weights)
    _greedy_open_clip_generation(monkeypatch)
    ours = clipforge.load_model(name, pretrained=str(weights))
    assert ours.text.transformer.resblocks[1].ls_2.gamma.abs().max() > 0.1
    images = torch.randn(3, 3, 64, 64)
    tokens = clipforge.get_tokenizer(name)(["a dog runs", "a cat", "two children on a swing"])
    with torch.no_grad():
        expected = theirs.generate(images, generation_type="top_k", top_k=1, seq_len=12, min_seq_len=3)
        assert torch.equal(ours.generate(images, max_length=12, min_length=3), expected)
        assert (ours.encode_text(tokens, normalize=True) - theirs.encode_text(tokens)).abs().max() <= 1e-5
        out = theirs(images, tokens)
        _, their_loss = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
        assert abs(ours.caption_loss(images, tokens).item() - their_loss.item()) <= 1e-5
    from clipforge.checkpoint.infer import infer_config

    assert infer_config(ours.state_dict())["text_cfg"]["ls_init_value"] is not None


def test_a_coca_decoding_a_plain_vits_tokens_is_open_clips(monkeypatch, tmp_path):
    """coca_base's kind: no attentional pooling, the decoder reads the ViT's own patch tokens (after ``ln_post``, not
    projected, as wide as the decoder): embeddings, greedy captions and the caption loss are open_clip's, by name and
    from bare weights; `convert --to open_clip` gives a folder open_clip reads back (``output_tokens`` written)."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.loss import CoCaLoss

    from clipforge.checkpoint.openai import save_open_clip

    vision = {k: v for k, v in TINY_COCA["vision_cfg"].items() if not k.startswith(("attn", "attentional"))}
    config = {**TINY_COCA, "vision_cfg": {**vision, "width": 64},
              "multimodal_cfg": {**TINY_COCA["multimodal_cfg"], "n_queries": 256, "dim_head": 64}}
    name, theirs, weights = _named_open_clip_coca(config, "Test-CoCa-tiny-base", monkeypatch, tmp_path)
    _greedy_open_clip_generation(monkeypatch)
    named = clipforge.load_model(name, pretrained=str(weights))
    inferred = clipforge.load(str(weights))[0]
    assert not hasattr(named.visual, "attn_pool") and "attentional_pool" not in inferred.config["vision_cfg"]
    images = torch.randn(3, 3, 64, 64)
    tokens = clipforge.get_tokenizer(name)(["a dog runs", "a cat", "two children on a swing"])
    with torch.no_grad():
        expected = theirs.generate(images, generation_type="top_k", top_k=1, seq_len=12, min_seq_len=3)
        out = theirs(images, tokens)
        _, their_loss = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
        for ours in (named, inferred):
            assert torch.equal(ours.generate(images, max_length=12, min_length=3), expected)
            assert (ours.encode_image(images, normalize=True) - theirs.encode_image(images)).abs().max() <= 1e-5
            assert (ours.encode_text(tokens, normalize=True) - theirs.encode_text(tokens)).abs().max() <= 1e-5
            assert abs(ours.caption_loss(images, tokens).item() - their_loss.item()) <= 1e-5
    save_open_clip(named, tmp_path / "oc")
    back = open_clip.create_model("local-dir:" + str(tmp_path / "oc")).eval()
    with torch.no_grad():
        assert (back(images, tokens)["logits"] - out["logits"]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="multimodal_cfg.width 96"):  # the decoder must read tokens its own width
        clipforge.create_model({**named.config, "multimodal_cfg": {**config["multimodal_cfg"], "width": 96}})


def test_coca_beam_search_and_repetition_penalty_are_open_clips(tiny_coca, tmp_path):
    """open_clip's default generation (beam search, 6 beams in 3 groups), a 4-beam search with a repetition penalty,
    one over log-probabilities, and greedy decoding with a repetition penalty give open_clip's captions token for
    token, open_clip run by itself with transformers 4.56 (over log-probabilities: its model's logits log-softmaxed),
    on captions that end at different lengths (some at max_length, unfinished); bad settings are refused."""
    import os
    import subprocess
    import sys

    from conftest import transformers4_peer

    peer = transformers4_peer()
    name, theirs, _ = tiny_coca
    with torch.no_grad():  # end-of-text likelier, so that captions end at different lengths
        eot = theirs.text_decoder.text_projection[:, 49407]
        eot.add_(3.0 * eot.sign())
    torch.save(theirs.state_dict(), tmp_path / "w.pt")
    torch.save(torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)), tmp_path / "images.pt")
    (tmp_path / "config.json").write_text(json.dumps(TINY_COCA))
    settings = {  # open_clip's arguments, clipforge's
        "default": ({"seq_len": 12, "min_seq_len": 3},
                    {"max_length": 12, "min_length": 3, "num_beams": 6, "num_beam_groups": 3}),
        "four_beams": ({"seq_len": 15, "min_seq_len": 2, "num_beams": 4, "num_beam_groups": 1,
                        "repetition_penalty": 1.3},
                       {"max_length": 15, "min_length": 2, "num_beams": 4, "repetition_penalty": 1.3}),
        "log_probs": ({"seq_len": 15, "min_seq_len": 2, "num_beams": 3, "num_beam_groups": 1, "log_probs": True},
                      {"max_length": 15, "min_length": 2, "num_beams": 3, "beam_scores": "log_probs"}),
        "greedy": ({"generation_type": "top_k", "top_k": 1, "seq_len": 12, "min_seq_len": 3,
                    "repetition_penalty": 1.5}, {"max_length": 12, "min_length": 3, "repetition_penalty": 1.5})}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    subprocess.run([sys.executable, "-c", OPEN_CLIP_GENERATE, *(str(tmp_path / f) for f in (
        "config.json", "w.pt", "images.pt", "settings.json", "out.pt"))], check=True,
        env={**os.environ, "PYTHONPATH": str(peer)})
    expected = torch.load(tmp_path / "out.pt", weights_only=True)
    ours = clipforge.load_model(name, pretrained=str(tmp_path / "w.pt"))
    images = torch.load(tmp_path / "images.pt", weights_only=True)
    for setting, (_, kwargs) in settings.items():
        got = ours.generate(images, **kwargs)
        assert got.shape == expected[setting].shape and torch.equal(got, expected[setting]), setting
        lengths = (got != 0).sum(1)
        assert len(set(lengths.tolist())) > 1, setting  # captions of several lengths: finishing is exercised
    beams = expected["default"]
    assert ((beams == 49407).any(1) & ((beams != 0).sum(1) < 12)).any()  # some end early ...
    assert ((beams != 0).sum(1) == 12).any() and (beams[:, -1] != 49407).any()  # ... some run out unfinished
    with pytest.raises(ValueError, match="at most one"):
        ours.generate(images, top_k=2, num_beams=4)
    assert not torch.equal(expected["log_probs"], ours.generate(images, **{**settings["log_probs"][1],
                                                                          "beam_scores": "logits"}))
    with pytest.raises(ValueError, match="multiple of num_beam_groups"):
        ours.generate(images, num_beams=5, num_beam_groups=3)
    with pytest.raises(ValueError, match="beam_scores"):
        ours.generate(images, num_beams=2, beam_scores="probabilities")
    with pytest.raises(ValueError, match="repetition_penalty must be positive"):
        ours.generate(images, repetition_penalty=0)


def test_zoo_coca_configs_are_open_clips_and_hf_export_is_refused(tmp_path):
    """coca_ViT-B-32, coca_ViT-L-14 (and their four tags) and coca_base (no tags: a plain ViT's tokens for its
    decoder) are in the zoo, translated from open_clip's configs and back; the zoo model's parameters are open_clip's, name for name and shape for shape (built on the meta device), and
    a fresh decoder's attention biases start at zero as open_clip's; transformers has no CoCa, so the Hugging Face export is refused by name."""
    open_clip = pytest.importorskip("open_clip")
    from pathlib import Path

    from clipforge.checkpoint import hf
    from clipforge.checkpoint.openai import config_from_open_clip, config_to_open_clip

    folder = Path(open_clip.__file__).parent / "model_configs"
    for name in ("coca_ViT-B-32", "coca_ViT-L-14", "coca_base"):
        theirs = json.loads((folder / f"{name}.json").read_text())
        ours = clipforge.models.get_model_config(name)
        assert ours == config_from_open_clip(json.loads(json.dumps(theirs)), name)
        assert config_to_open_clip(ours) == theirs, name
        assert [t for _, t in clipforge.list_pretrained(name)] == list(open_clip.list_pretrained_tags_by_model(name))
        with torch.device("meta"):
            reference = open_clip.create_model(name, pretrained=None, device="meta")
            model = clipforge.create_model(name)
        assert {k: v.shape for k, v in model.state_dict().items()} == \
            {k: v.shape for k, v in reference.state_dict().items()}, name
    torch.manual_seed(0)
    overrides = dict(vision_cfg={"layers": 1}, text_cfg={"layers": 1}, multimodal_cfg={"layers": 1})
    small = clipforge.create_model("coca_ViT-B-32", **overrides)
    # a fresh decoder starts as open_clip's: attention biases at zero (nn.MultiheadAttention's), weights drawn
    for block in (*small.text_decoder.resblocks, *small.text_decoder.cross_attn):
        assert not block.attn.out_proj.bias.any() and not block.attn.in_proj_bias.any()
        assert block.attn.out_proj.weight.std() > 0
    small.config = clipforge.models.get_model_config("coca_ViT-B-32")
    clipforge.models.merge_config(small.config, overrides)
    with pytest.raises(clipforge.CheckpointError, match="CoCa"):
        hf.save(small, tmp_path / "hf")


def test_caption_generate_with_coca_prints_the_models_captions(tiny_coca, tmp_path, capsys):
    """`clipforge caption generate --coca FOLDER IMAGES --json`: each image's caption by the default decoding (3 beams
    on log-probabilities), greedy with a repetition penalty (`--beams 1 --repetition-penalty`), or open_clip's beam
    search (`--beams 2 --beam-scores logits`), as ``generate`` and ``decode_captions`` give it; a CLIP that is not a
    CoCa is refused by name, and --beam-scores without --coca or without beams."""
    from PIL import Image

    from clipforge import cli
    from clipforge.checkpoint.io import save_pretrained
    from clipforge.models.coca import decode_captions

    name, _, weights = tiny_coca
    model, preprocess, tokenizer = clipforge.load(name, pretrained=str(weights))
    save_pretrained(model, tmp_path / "coca")
    paths = []
    for i, colour in enumerate(("red", "navy")):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (80, 64), colour).save(paths[-1])
    images = torch.stack([preprocess(Image.open(p)) for p in paths])
    printed_captions = []
    for decoding, flags in (({"num_beams": 3, "beam_scores": "log_probs"}, []),
                            ({"repetition_penalty": 1.5}, ["--beams", "1", "--repetition-penalty", "1.5"]),
                            ({"num_beams": 2, "beam_scores": "logits"}, ["--beams", "2", "--beam-scores", "logits"])):
        assert cli.main(["caption", "generate", "--coca", str(tmp_path / "coca"), *paths, "--json",
                         "--max-new-tokens", "6", *flags]) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        expected = decode_captions(model.generate(images, max_length=8, **decoding), tokenizer)
        assert [p["caption"] for p in printed] == expected and [p["image"] for p in printed] == paths
        assert all(caption for caption in expected)
        printed_captions.append(expected)
    assert len({tuple(captions) for captions in printed_captions}) == 3  # the flags reached generate
    assert cli.main(["caption", "generate", "--mapping", str(tmp_path), "--beams", "3", "--beam-scores", "logits",
                     paths[0]]) == 2
    assert "ranks a --coca model's beams" in capsys.readouterr().err
    assert cli.main(["caption", "generate", "--coca", str(tmp_path / "coca"), "--beams", "1", "--beam-scores",
                     "logits", paths[0]]) == 2
    assert "goes with --beams" in capsys.readouterr().err
    save_pretrained(clipforge.create_model("ViT-Tiny-64"), tmp_path / "clip")
    capsys.readouterr()
    assert cli.main(["caption", "generate", "--coca", str(tmp_path / "clip"), paths[0]]) == 2
    assert "not a CoCa model" in capsys.readouterr().err
    assert cli.main(["caption", "generate", "--mapping", str(tmp_path), "--pretrained", "x", paths[0]]) == 2
    assert "goes with --coca" in capsys.readouterr().err


def test_coca_embeddings_export_to_onnx(tiny_coca, tmp_path):
    """`clipforge export onnx` of a CoCa: its image and text embeddings (the retrieval side) match eager PyTorch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from conftest import onnx_feature_differences

    name, _, weights = tiny_coca
    model = clipforge.load_model(name, pretrained=str(weights))
    tokens = clipforge.get_tokenizer(name)(["a dog", "a photo of a cat on a mat"])
    assert max(onnx_feature_differences(model, tmp_path / "onnx", torch.randn(2, 3, 64, 64), tokens)) <= 1e-4


def test_coca_training_loss_is_open_clips_and_exact_under_gradient_accumulation(tiny_coca):
    """In training, one forward gives the contrastive features and the decoder's logits for every caption token
    (decoded only as far as the batch's longest caption): the same logits as open_clip's full forward at those
    positions, and ``CoCaLoss`` equal to open_clip's CoCaLoss at its default weights. A step of two micro-batches
    (captions of different lengths) gives the gradients and the reported loss of one step on the whole batch."""
    from contextlib import nullcontext

    from open_clip.loss import CoCaLoss as OpenClipCoCaLoss

    from clipforge.loss import ClipLoss, CoCaLoss
    from clipforge.train import TrainConfig
    from clipforge.train.step import train_step

    name, theirs, weights = tiny_coca
    ours = clipforge.load_model(name, pretrained=str(weights)).train()
    theirs.train()
    images = torch.randn(6, 3, 64, 64)
    tokens = clipforge.get_tokenizer(name)(["a dog", "a photo of a black cat sitting on a red mat", "two birds",
                                            "a car", "a man riding a bike down a long hill in the rain", "red"])
    loss_fn = CoCaLoss(ClipLoss())
    with torch.no_grad():
        expected = theirs(images, tokens)
        expected_clip, expected_caption = OpenClipCoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
            expected["image_features"], expected["text_features"], expected["logits"], expected["labels"],
            expected["logit_scale"])
    out = ours(images, tokens)
    labelled = tokens[:, 1:] != 0
    assert torch.equal(out.caption_labels, tokens[:, 1:][labelled])
    # the summed cross-entropy of open_clip's logits at the labelled positions, without logits of its own
    expected_nll = torch.nn.functional.cross_entropy(expected["logits"][labelled], out.caption_labels, reduction="sum")
    assert out.caption_nll.shape == () and abs(out.caption_nll.item() - expected_nll.item()) <= 1e-5 * expected_nll
    with torch.no_grad():
        logits, labels = ours.caption_predictions(ours.visual.forward_tokens(images)[1],
                                                  ours.text.forward_tokens(tokens)[1], tokens)
    assert torch.equal(labels, out.caption_labels) and (logits - expected["logits"][labelled]).abs().max() <= 1e-4
    loss = loss_fn(*out[:3], caption_nll=out.caption_nll, caption_labels=out.caption_labels)
    assert abs(loss.item() - (expected_clip + expected_caption).item()) <= 1e-5
    with torch.no_grad():  # without autograd (accumulation's cached pass) the decoder is skipped
        cached = ours(images, tokens)
    assert cached.caption_nll is None and torch.equal(cached.caption_labels, out.caption_labels)
    assert ours.eval()(images, tokens).caption_labels is None and ours.train().training

    reported = []

    def gradients(micro):
        optimizer = torch.optim.SGD(ours.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        reported.append(train_step(ours, micro, loss_fn, optimizer, scaler, nullcontext(), torch.device("cpu"),
                                   TrainConfig(accum_freq=len(micro))).item())
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    whole = gradients([{"images": images, "tokens": tokens}])
    assert any(n.startswith("text_decoder.") for n in whole) and any(n.startswith("visual.") for n in whole)
    halves = gradients([{"images": images[:3], "tokens": tokens[:3]}, {"images": images[3:], "tokens": tokens[3:]}])
    assert reported[0] == pytest.approx(loss.item(), abs=1e-5) and reported[1] == pytest.approx(loss.item(), abs=1e-5)
    assert whole.keys() == halves.keys()
    for key, grad in whole.items():
        torch.testing.assert_close(halves[key], grad, atol=1e-5, rtol=1e-4, msg=lambda m: key + m)


def test_clipforge_train_trains_a_coca_with_its_caption_loss_and_validates_it(tiny_coca, tmp_path, capsys):
    """`clipforge train --model <a CoCa>` optimises CoCa's two losses at open_clip's weights (settable); validation
    reports the held-out caption loss beside retrieval recall; the checkpoint loads and captions. A text cache (pooled
    features only) and the CoCa weight flags on a model that is not a CoCa are refused by name."""
    import math

    from conftest import shapes_shard

    from clipforge import cli
    from clipforge.train import TrainConfig, train
    from clipforge.train.validation import coca_caption_loss

    name, _, _ = tiny_coca
    shard = shapes_shard(tmp_path / "s-000000.tar", 24)
    cfg = TrainConfig(model=name, train_data=str(shard), val_data=str(shard), val_samples=8, batch_size=8, steps=4,
                      lr=1e-3, workers=0, output=str(tmp_path / "run"), progress=False)
    summary = train(cfg)
    assert summary["steps"] == 4 and math.isfinite(summary["loss"])
    metrics = summary["val"]
    assert math.isfinite(metrics["caption_loss"]) and 0 < metrics["caption_loss"] < math.log(49408) + 1
    assert any("R@1" in k or "r1" in k.lower() for k in metrics), metrics
    # the metric is the mean per-token cross-entropy: the same, computed image by image
    from clipforge.data import evaluation_set, open_source
    from clipforge.preprocess import Preprocess

    model = summary["model"].eval()
    val_set = evaluation_set(open_source(str(shard), shuffle_buffer=0), Preprocess(64), 8, None, None, False, seed=0)
    tokenizer = clipforge.get_tokenizer(name)
    total = count = 0
    with torch.no_grad():
        for i, caption in enumerate(val_set.captions):
            tokens = tokenizer([caption])
            image = val_set.images[val_set.caption_images[i]][None]
            n = int((tokens[:, 1:] != 0).sum())
            total += model.caption_loss(image, tokens).item() * n
            count += n
    assert abs(coca_caption_loss(model, tokenizer, val_set, "cpu", batch_size=3) - total / count) <= 1e-4
    loaded = clipforge.load(summary["checkpoint"])[0]
    assert loaded.generate(torch.randn(1, 3, 64, 64), max_length=8).shape[0] == 1

    with pytest.raises(ValueError, match="CoCa's decoder reads every token"):
        train(TrainConfig(model=name, train_data=str(shard), lock_text=True, text_cache=True, batch_size=8, steps=1,
                          workers=0, output=str(tmp_path / "cached"), progress=False))
    assert cli.main(["train", "--model", "ViT-Tiny-64", "--train-data", str(shard), "--steps", "1", "--workers", "0",
                     "--coca-caption-loss-weight", "1", "--output", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert "not a CoCa" in capsys.readouterr().err


def test_caption_eval_with_coca_scores_the_models_own_captions(tiny_coca, tmp_path, capsys):
    """`clipforge caption eval --coca MODEL --data SHARDS`: the CoCa captions each image by its default decoding (3
    beams on log-probabilities, as ``generate``, in batches; recorded in the report) and its captions are scored as a
    LiMBer map's are, CLIPScore judged by the CoCa itself unless --judge names another model; --prompt (a LiMBer
    setting) is refused."""
    from conftest import shapes_shard

    from clipforge import cli
    from clipforge.captioning.cli import _open_captioned
    from clipforge.captioning.metrics import clip_scores
    from clipforge.checkpoint.io import save_pretrained
    from clipforge.data.pipeline import iter_captioned_images
    from clipforge.models.coca import decode_captions

    name, _, weights = tiny_coca
    model, preprocess, tokenizer = clipforge.load(name, pretrained=str(weights))
    shard = shapes_shard(tmp_path / "s-000000.tar", 7)
    source, _ = _open_captioned(str(shard), False)
    images, references = [], []
    for image, lines, _ in iter_captioned_images(source, None, 0, {}):
        images.append(image)
        references.append(lines)
    images, references = images[:5], references[:5]
    pixels = torch.stack([preprocess(image) for image in images])
    decoding = {"repetition_penalty": 1.0, "num_beams": 3, "beam_scores": "log_probs"}
    expected = decode_captions(model.generate(pixels, max_length=8, **decoding), tokenizer)
    with torch.no_grad():
        # random towers disagree in sign as often as not (CLIPScore 0 throughout): these two are made to agree (the
        # text projection is not what the decoder reads, so the captions stay)
        if (model.encode_image(pixels) @ model.encode_text(tokenizer(expected)).T).diagonal().mean() < 0:
            model.text.text_projection.neg_()
        judged = clip_scores(model, tokenizer, model.encode_image(pixels), expected, references)
    save_pretrained(model, tmp_path / "coca")
    out = tmp_path / "eval.json"
    assert cli.main(["caption", "eval", "--coca", str(tmp_path / "coca"), "--data", str(shard), "--max-images", "5",
                     "--batch-size", "2", "--max-new-tokens", "6", "--no-word-similarity", "--no-progress",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [c["caption"] for c in report["captions"]] == expected
    assert [c["references"] for c in report["captions"]] == references
    assert report["scores"]["clip_score"] == pytest.approx(float(judged["clip_score"].mean()), abs=1e-5)
    assert report["scores"]["clip_score"] > 0, report["scores"]
    assert report["coca"] == str(tmp_path / "coca") and report["scores"]["images"] == 5
    assert report["decoding"] == decoding
    assert cli.main(["caption", "eval", "--coca", str(tmp_path / "coca"), "--data", str(shard),
                     "--prompt", "A picture of"]) == 2
    assert "--prompt is for a LiMBer --mapping" in capsys.readouterr().err
