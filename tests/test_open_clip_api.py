"""open_clip's model-making calls with open_clip's own keywords, side by side with open_clip: a script that changes only
its import gets the same model, features and preprocessing, or an error naming what clipforge does not do."""
import json

import pytest
import torch
from PIL import Image

import clipforge
import clipforge.models
from clipforge.checkpoint import save_safetensors

from conftest import FileServer

open_clip = pytest.importorskip("open_clip")

TINY = {"embed_dim": 48,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 160, "head_width": 40, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 2}}


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """"Test-Tiny" in both zoos (GELU), and open_clip's random weights for it in a file."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "Test-Tiny", TINY)
    monkeypatch.setattr(clipforge.models, "_EXTRA_CONFIGS", {**clipforge.models._EXTRA_CONFIGS})
    clipforge.models.register_model_config("Test-Tiny", TINY)
    torch.manual_seed(0)
    save_safetensors(open_clip.create_model("Test-Tiny").state_dict(), tmp_path / "w.safetensors")
    return str(tmp_path / "w.safetensors")


def test_open_clips_keywords_give_open_clips_model_features_and_transforms(tiny, tmp_path):
    image = Image.radial_gradient("L").convert("RGB").resize((90, 60))
    keywords = dict(pretrained=tiny, precision="fp32", device="cpu", jit=False, force_quick_gelu=True,
                    force_custom_text=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25),
                    image_interpolation="bilinear", image_resize_mode="squash", aug_cfg={"scale": (1.0, 1.0)},
                    cache_dir=str(tmp_path / "cache"), output_dict=True, weights_only=True)

    def script(library):
        model, train, preprocess = library.create_model_and_transforms("Test-Tiny", **keywords)
        model.eval()
        pixels, tokens = preprocess(image)[None], library.get_tokenizer("Test-Tiny")(["a diagram", "a dog"])
        with torch.no_grad():
            out = model(pixels, tokens)
        return out["image_features"], out["text_features"], pixels, train(image)

    theirs, ours = script(open_clip), script(clipforge)
    assert (theirs[2] - ours[2]).abs().max() <= 1e-6  # squashed, bilinear, their mean and std
    assert (theirs[3] - ours[3]).abs().max() <= 1e-6  # the training crop at scale 1.0: the whole image, 4:3
    assert (theirs[0] - ours[0]).abs().max() <= 1e-5 and (theirs[1] - ours[1]).abs().max() <= 1e-5
    gelu = clipforge.create_model_and_transforms("Test-Tiny", pretrained=tiny)[0]
    with torch.no_grad():  # force_quick_gelu took effect: the weights' own GELU model is another one
        assert (gelu.encode_image(ours[2]) - ours[0]).abs().max() > 1e-3

    model, preprocess = clipforge.create_model_from_pretrained("Test-Tiny", tiny, image_mean=(0.5, 0.5, 0.5))
    assert not model.training and preprocess.mean == (0.5, 0.5, 0.5)
    assert isinstance(clipforge.create_model_from_pretrained("Test-Tiny", tiny, return_transform=False),
                      clipforge.CLIP)


def test_create_model_takes_open_clips_call_and_its_size_and_precision_keywords(tiny):
    """``clipforge.create_model(name, pretrained=...)`` is open_clip's ``create_model`` (weights loaded, training mode,
    as open_clip returns it); ``force_*`` resize the towers (and the weights' positions) as open_clip's do;
    ``precision`` casts as open_clip's."""
    ours = clipforge.create_model("Test-Tiny", pretrained=tiny, device="cpu")
    theirs = open_clip.create_model("Test-Tiny", pretrained=tiny)
    assert ours.training and theirs.training
    images, tokens = torch.randn(2, 3, 64, 64), clipforge.tokenize(["a dog", "a cat"])
    with torch.no_grad():
        assert (ours.eval().encode_image(images) - theirs.eval().encode_image(images)).abs().max() <= 1e-5
        assert (ours.encode_text(tokens) - theirs.encode_text(tokens)).abs().max() <= 1e-5

    sizes = dict(force_image_size=96, force_context_length=32, force_patch_dropout=0.5)
    ours, theirs = clipforge.create_model("Test-Tiny", **sizes), open_clip.create_model("Test-Tiny", **sizes)
    assert ours.image_size == 96 and ours.context_length == 32 and ours.visual.patch_dropout == 0.5
    assert {k: v.shape for k, v in clipforge.checkpoint.clipforge_to_openai(ours.state_dict()).items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}
    # with weights: their position grid (bicubic) and text positions (linear) resized as open_clip resizes them
    ours = clipforge.create_model("Test-Tiny", pretrained=tiny, force_image_size=96, force_context_length=32).eval()
    theirs = open_clip.create_model("Test-Tiny", pretrained=tiny, force_image_size=96, force_context_length=32).eval()
    images, tokens = torch.randn(2, 3, 96, 96), clipforge.tokenize(["a dog", "a cat"], context_length=32)
    with torch.no_grad():
        assert (ours.encode_image(images) - theirs.encode_image(images)).abs().max() <= 1e-5
        assert (ours.encode_text(tokens) - theirs.encode_text(tokens)).abs().max() <= 1e-5
    with pytest.raises(clipforge.CheckpointError, match="text_projection"):  # what cannot be resized is named
        clipforge.create_model("Test-Tiny", pretrained=tiny, embed_dim=32)

    for precision, dtype in (("bf16", torch.bfloat16), ("pure_fp16", torch.float16), ("amp", torch.float32)):
        model = clipforge.create_model("Test-Tiny", precision=precision)
        assert model.visual.conv1.weight.dtype == dtype, precision
    assert clipforge.create_model("Test-Tiny", embed_dim=32).embed_dim == 32  # config overrides, as before


@pytest.mark.parametrize("keywords, named", [
    ({"jit": True}, "jit=True: TorchScript"),
    ({"pretrained_image": True}, "pretrained_image=True"),
    ({"pretrained_text_path": "text.bin"}, "pretrained_text_path"),
    ({"precision": "fp8"}, "precision 'fp8'"),
    ({"aug_cfg": {"scale": (0.5, 1.0), "re_prob": 0.25, "use_timm": True}}, "aug_cfg: re_prob, use_timm not built here"),
    ({"require_pretrained": True}, "require_pretrained=True"),
])
def test_what_clipforge_does_not_do_is_refused_by_name(tiny, keywords, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        clipforge.create_model_and_transforms("Test-Tiny", **keywords)


def test_openai_names_and_hub_and_folder_tokenizers(tmp_path, monkeypatch):
    """OpenAI's "ViT-B/32" names the architecture, as open_clip reads it; ``get_tokenizer`` takes what ``load`` takes:
    an ``hf-hub:`` repo (its config alone is fetched, not its weights), and a model folder, ``local-dir:`` or not,
    with ``cache_dir`` where the files are kept."""
    assert clipforge.load("ViT-B/32")[0].config == clipforge.get_model_config("ViT-B-32")

    monkeypatch.delenv("CLIPFORGE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "default-cache"))
    config = {**TINY, "text_cfg": {**TINY["text_cfg"], "context_length": 24}}
    srv = FileServer({"/owner/repo/resolve/main/open_clip_config.json": json.dumps({"model_cfg": config}).encode()})
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    try:  # the weights are not on the server: asking for them would fail
        tokenizer = clipforge.get_tokenizer("hf-hub:owner/repo", cache_dir=str(tmp_path / "mine"))
    finally:
        srv.close()
    assert tokenizer(["a dog"]).shape == (1, 24)
    assert any((tmp_path / "mine").iterdir()) and not (tmp_path / "default-cache").exists()

    model = clipforge.create_model(config)
    clipforge.save_pretrained(model, tmp_path / "folder")
    for name in (str(tmp_path / "folder"), f"local-dir:{tmp_path / 'folder'}"):
        assert clipforge.get_tokenizer(name)(["a dog"]).shape == (1, 24)
    loaded = clipforge.create_model(f"local-dir:{tmp_path / 'folder'}")  # open_clip's create_model of a folder
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval().encode_image(images), model.eval().encode_image(images))


def test_zero_shot_and_captioning_helpers_give_open_clips_values(tiny, tmp_path):
    """What open_clip's zero-shot and CoCa scripts take beside the model: ImageNet's class names and templates
    (callables, as open_clip's), ``build_zero_shot_classifier``'s weights, ``decode``, the tag lists, and
    ``add_model_config`` reading open_clip's own config files (a timm-tower one translated as a folder's is)."""
    from pathlib import Path

    assert list(clipforge.IMAGENET_CLASSNAMES) == list(open_clip.IMAGENET_CLASSNAMES)
    for name in ("OPENAI_IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES"):
        ours, theirs = getattr(clipforge, name), getattr(open_clip, name)
        assert [t("dog") for t in ours] == [t("dog") for t in theirs], name
    assert clipforge.OPENAI_DATASET_MEAN == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert clipforge.OPENAI_DATASET_STD == tuple(open_clip.OPENAI_DATASET_STD)

    ours = clipforge.create_model_from_pretrained("Test-Tiny", tiny, return_transform=False)
    theirs = open_clip.create_model("Test-Tiny", pretrained=tiny).eval()
    classnames = open_clip.IMAGENET_CLASSNAMES[:7]
    for their_templates, our_templates in ((open_clip.SIMPLE_IMAGENET_TEMPLATES, clipforge.SIMPLE_IMAGENET_TEMPLATES),
                                           (["a photo of a {}."],) * 2):
        a = open_clip.build_zero_shot_classifier(theirs, open_clip.get_tokenizer("Test-Tiny"), classnames,
                                                 their_templates, num_classes_per_batch=3)
        b = clipforge.build_zero_shot_classifier(ours, clipforge.get_tokenizer("Test-Tiny"), classnames,
                                                 our_templates, num_classes_per_batch=3, use_tqdm=True)
        assert a.shape == b.shape == (48, 7) and (a - b).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="at least one class name"):
        clipforge.build_zero_shot_classifier(ours, clipforge.get_tokenizer("Test-Tiny"), [], ["{}"])

    ids = open_clip.tokenize(["a photo of a dog, naïve café 🐕"])[0]
    assert clipforge.decode(ids) == open_clip.decode(ids)
    assert sorted(clipforge.list_pretrained_tags_by_model("ViT-B-32")) == \
        sorted(open_clip.list_pretrained_tags_by_model("ViT-B-32"))
    assert set(clipforge.list_pretrained_models_by_tag("openai")) <= \
        set(open_clip.list_pretrained_models_by_tag("openai"))
    assert "ViT-L-14-336" in clipforge.list_pretrained_models_by_tag("openai")

    configs = Path(open_clip.__file__).parent / "model_configs"
    for name in ("ViT-B-32", "ViT-B-16-SigLIP"):
        (tmp_path / f"Mine-{name}.json").write_text((configs / f"{name}.json").read_text())
    clipforge.add_model_config(tmp_path)
    for name in ("ViT-B-32", "ViT-B-16-SigLIP"):
        assert clipforge.get_model_config(f"Mine-{name}") == clipforge.get_model_config(name), name
    for augmentation in (clipforge.AugmentationCfg(scale=(0.5, 1.0)), open_clip.AugmentationCfg(scale=(0.5, 1.0))):
        assert clipforge.create_model_and_transforms("Test-Tiny", aug_cfg=augmentation)[1].scale == (0.5, 1.0)
    # open_clip's own colour changes, as its transform applies them: the jitter only with a probability
    colour = {"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8, "gray_scale_prob": 0.2}
    for augmentation in (clipforge.AugmentationCfg(**colour), open_clip.AugmentationCfg(**colour)):
        train = clipforge.create_model_and_transforms("Test-Tiny", aug_cfg=augmentation)[1]
        assert train.augmentation() == {"scale": (0.9, 1.0), "ratio": (3 / 4, 4 / 3), **colour}
    unused = clipforge.create_model_and_transforms("Test-Tiny", aug_cfg={"color_jitter": (0.4,) * 4})[1]
    assert unused.color_jitter_prob == 0 and unused.gray_scale_prob == 0
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="not an open_clip model config"):
        clipforge.add_model_config(tmp_path / "bad.json")


def test_training_and_feature_script_helpers_answer_as_open_clips(tiny, tmp_path):
    """The rest of open_clip's namespace a training or feature script takes: dtypes for a precision,
    ``load_checkpoint`` (open_clip's training checkpoint into a model, positions resized to its size),
    the preprocess and tokenize configs, the OpenAI list and loader, ``SimpleTokenizer``, and the losses with
    open_clip's keywords and ``output_dict``; ``trace_model`` refused by name."""
    for precision in ("fp32", "amp", "amp_bf16", "bf16", "pure_bf16", "fp16", "pure_fp16"):
        assert clipforge.get_cast_dtype(precision) == open_clip.get_cast_dtype(precision), precision
        assert clipforge.get_input_dtype(precision) == open_clip.get_input_dtype(precision), precision

    # an open_clip training checkpoint (DDP's "module." names beside the optimiser's state), into a fresh model of
    # the same size and of a larger one (positions resized as open_clip's loader resizes them)
    trained = open_clip.create_model("Test-Tiny", pretrained=tiny)
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "epoch_3.pt")
    images, tokens = torch.randn(2, 3, 96, 96), open_clip.tokenize(["a dog", "two cats on a red sofa"])
    for size in (64, 96):
        theirs = open_clip.create_model("Test-Tiny", force_image_size=size).eval()
        ours = clipforge.create_model("Test-Tiny", vision_cfg={"image_size": size}).eval()
        open_clip.load_checkpoint(theirs, str(tmp_path / "epoch_3.pt"))
        keys = clipforge.load_checkpoint(ours, tmp_path / "epoch_3.pt")
        assert not keys.missing_keys and not keys.unexpected_keys
        with torch.no_grad():
            pixels = images[..., :size, :size]
            assert (theirs.encode_image(pixels) - ours.encode_image(pixels)).abs().max() <= 1e-5
            assert (theirs.encode_text(tokens) - ours.encode_text(tokens)).abs().max() <= 1e-5
    with pytest.raises(clipforge.CheckpointError, match="does not fit the model"):
        clipforge.load_checkpoint(clipforge.create_model("ViT-Tiny-64"), tmp_path / "epoch_3.pt")
    partial = {k: v for k, v in trained.state_dict().items() if k != "logit_scale"}
    torch.save(partial, tmp_path / "partial.pt")
    keys = clipforge.load_checkpoint(clipforge.create_model("Test-Tiny"), tmp_path / "partial.pt", strict=False)
    assert keys.missing_keys == ["logit_scale"] and not keys.unexpected_keys

    overrides = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25), image_interpolation="bilinear",
                     image_resize_mode="squash")
    theirs = open_clip.create_model_and_transforms("Test-Tiny", pretrained=tiny, **overrides)[0]
    ours = clipforge.create_model_and_transforms("Test-Tiny", pretrained=tiny, **overrides)[0]
    assert clipforge.get_model_preprocess_cfg(ours) == open_clip.get_model_preprocess_cfg(theirs)
    assert clipforge.get_model_preprocess_cfg(clipforge.create_model_from_pretrained("Test-Tiny", tiny)[0]) == \
        open_clip.get_model_preprocess_cfg(open_clip.create_model_from_pretrained("Test-Tiny", tiny)[0])
    assert clipforge.get_model_tokenize_cfg(ours) == open_clip.get_model_tokenize_cfg(theirs)

    assert set(clipforge.list_openai_models()) <= set(open_clip.list_openai_models())
    assert "ViT-B-32" in clipforge.list_openai_models()
    # (OpenAI's weights are fp16 values, which open_clip's loader rounds to: random ones made so first)
    torch.save({k: v.half().float() for k, v in open_clip.create_model("ViT-B-32").state_dict().items()},
               tmp_path / "openai-layout.pt")
    theirs = open_clip.load_openai_model(str(tmp_path / "openai-layout.pt"), device="cpu")
    ours = clipforge.load_openai_model(str(tmp_path / "openai-layout.pt"), device="cpu")
    assert not ours.training and next(ours.parameters()).dtype == torch.float32
    with torch.no_grad():  # OpenAI's QuickGELU, which the state dict does not show
        assert (theirs.encode_text(tokens) - ours.encode_text(tokens)).abs().max() <= 1e-5

    texts = ["a photo of a dog, naïve café 🐕", "<start_of_text>TWO   cats&amp;dogs", ""]
    from open_clip.tokenizer import default_bpe

    for ours in (clipforge.SimpleTokenizer(), clipforge.SimpleTokenizer(default_bpe(), context_length=77)):
        assert torch.equal(ours(texts), open_clip.SimpleTokenizer()(texts))
        assert ours.encode(texts[0]) == open_clip.SimpleTokenizer().encode(texts[0])
    assert torch.equal(clipforge.SimpleTokenizer(context_length=16)(texts),
                       open_clip.SimpleTokenizer(context_length=16)(texts))
    with pytest.raises(ValueError, match="clean='whitespace'"):
        clipforge.SimpleTokenizer(clean="whitespace")
    (tmp_path / "other.txt.gz").write_bytes(__import__("gzip").compress(b"#version\na b\n"))
    for other in (tmp_path / "other.txt.gz", tmp_path / "epoch_3.pt", tmp_path / "missing.gz"):
        with pytest.raises(ValueError, match="only OpenAI's vocabulary"):
            clipforge.SimpleTokenizer(str(other))

    a, b = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1), torch.nn.functional.normalize(
        torch.randn(8, 16), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    keywords = dict(cache_labels=True, rank=0, world_size=1)
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            expected = open_clip.ClipLoss(local_loss, gather_with_grad, **keywords)(a, b, scale, output_dict=True)
            got = clipforge.ClipLoss(local_loss, gather_with_grad, **keywords)(a, b, scale, output_dict=True)
            assert got.keys() == expected.keys() == {"contrastive_loss"}
            torch.testing.assert_close(got["contrastive_loss"], expected["contrastive_loss"])
    expected = open_clip.loss.SigLipLoss(dist_impl="bidir", **keywords)(a, b, scale, bias, output_dict=True)
    got = clipforge.SigLipLoss(dist_impl="bidir", **keywords)(a, b, scale, bias, output_dict=True)
    torch.testing.assert_close(got["contrastive_loss"], expected["contrastive_loss"])
    with pytest.raises(ValueError, match=r"torch.distributed says rank 0 of 1"):
        clipforge.ClipLoss(rank=1, world_size=2)(a, b, scale)
    with pytest.raises(ValueError, match="Horovod is not supported"):
        clipforge.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl 'ring'"):
        clipforge.SigLipLoss(dist_impl="ring")
    with pytest.raises(NotImplementedError, match="TorchScript is not built here"):
        clipforge.trace_model(ours)
    from clipforge.models.coca import CoCa

    assert clipforge.CoCa is CoCa and "load_checkpoint" in dir(clipforge)  # isinstance(model, open_clip.CoCa)


def test_pretrained_lookups_preprocess_settings_and_low_precision_answer_as_open_clips(tiny, tmp_path, monkeypatch):
    """get_pretrained_cfg / get_pretrained_url / is_pretrained_cfg for OpenAI's tags (the same URLs and
    preprocessing) and for a tag neither has; download_pretrained(_from_url) from a local stand-in, into cache_dir;
    set_model_preprocess_cfg read back by get_model_preprocess_cfg as open_clip's; convert_weights_to_fp16 / _lp."""
    for model in clipforge.list_openai_models():
        ours, theirs = clipforge.get_pretrained_cfg(model, "openai"), open_clip.get_pretrained_cfg(model, "openai")
        assert ours == {k: theirs[k] for k in ours}, model
        assert clipforge.get_pretrained_url(model, "openai") == open_clip.get_pretrained_url(model, "openai")
    defaults = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD, "quick_gelu": False,
                "interpolation": "bicubic", "resize_mode": "shortest"}  # what open_clip's entries leave out
    shared = [(m, t) for m, t in clipforge.list_pretrained() if open_clip.get_pretrained_cfg(m, t)]
    assert len(shared) >= 160
    for model, tag in shared:  # every tag both know: the same preprocessing and activation
        ours, theirs = clipforge.get_pretrained_cfg(model, tag), open_clip.get_pretrained_cfg(model, tag)
        assert {k: v for k, v in ours.items() if k != "url"} == \
            {k: tuple(theirs.get(k, defaults[k])) if k in ("mean", "std") else theirs.get(k, defaults[k])
             for k in defaults}, (model, tag)
    assert clipforge.get_pretrained_cfg("ViT-B-32", "nope") == open_clip.get_pretrained_cfg("ViT-B-32", "nope") == {}
    assert clipforge.get_pretrained_url("ViT-B-32", "nope") == open_clip.get_pretrained_url("ViT-B-32", "nope") == ""
    assert clipforge.is_pretrained_cfg("ViT-B-32", "openai") and not clipforge.is_pretrained_cfg("ViT-B-32", "nope")

    monkeypatch.delenv("CLIPFORGE_OFFLINE", raising=False)
    server = FileServer({"/weights/w.bin": b"weights"})
    try:
        path = clipforge.download_pretrained_from_url(f"{server.url}/weights/w.bin", cache_dir=str(tmp_path / "c"))
        assert open(path, "rb").read() == b"weights" and path.startswith(str(tmp_path / "c"))
        assert clipforge.download_pretrained({"url": f"{server.url}/weights/w.bin"}, cache_dir=tmp_path / "c") == path
    finally:
        server.close()
    assert clipforge.download_pretrained({}) == ""

    ours, theirs = clipforge.create_model("Test-Tiny", pretrained=tiny), open_clip.create_model("Test-Tiny",
                                                                                                 pretrained=tiny)
    settings = {"size": (64, 64), "mode": "RGB", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0}
    clipforge.set_model_preprocess_cfg(ours, settings)
    open_clip.set_model_preprocess_cfg(theirs, settings)
    assert clipforge.get_model_preprocess_cfg(ours) == open_clip.get_model_preprocess_cfg(theirs)
    with pytest.raises(ValueError, match="64-pixel RGB"):
        clipforge.set_model_preprocess_cfg(ours, {**settings, "size": 96})
    with pytest.raises(ValueError):
        clipforge.set_model_preprocess_cfg(ours, {**settings, "resize_mode": "sideways"})

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = ours.encode_image(images, normalize=True)
        clipforge.convert_weights_to_fp16(ours)
        assert {p.dtype for p in ours.parameters()} == {torch.float16}
        half = ours.encode_image(images.half(), normalize=True).float()
    assert torch.nn.functional.cosine_similarity(full, half).min() > 0.999
    clipforge.convert_weights_to_lp(ours, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


def test_coca_and_distillation_losses_take_open_clips_signatures_and_give_its_terms():
    """open_clip's CoCaLoss(caption_loss_weight, clip_loss_weight, pad_id, ...)(image, text, logits, labels, scale)
    and DistillClipLoss()(image, text, scale, teacher image, teacher text, teacher scale): the same two terms (as a
    tuple, or a dict with output_dict) and the same gradients."""
    torch.manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).requires_grad_() for _ in range(2))
    logits, labels = torch.randn(8, 5, 30, requires_grad=True), torch.randint(0, 30, (8, 5))
    labels[:, -2:] = 0  # padding, ignored
    teacher = [torch.nn.functional.normalize(torch.randn(8, 16), dim=-1) for _ in range(2)]
    scale, teacher_scale = torch.tensor(10.0), torch.tensor(20.0)
    calls = [
        ("coca", lambda lib: lib.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0),
         (a, b, logits, labels, scale)),
        ("coca without contrast", lambda lib: lib.CoCaLoss(2.0, 0.0), (a, b, logits, labels, scale)),
        ("distill", lambda lib: lib.DistillClipLoss(), (a, b, scale, *teacher, teacher_scale)),
        ("distill, local", lambda lib: lib.DistillClipLoss(local_loss=True), (a, b, scale, *teacher, teacher_scale))]
    for name, make, inputs in calls:
        expected, got = make(open_clip)(*inputs, output_dict=True), make(clipforge)(*inputs, output_dict=True)
        assert expected.keys() == got.keys(), name
        for key in expected:
            torch.testing.assert_close(got[key].float(), expected[key].float(), msg=f"{name}: {key}")
        assert all(torch.equal(x, y) for x, y in zip(make(clipforge)(*inputs), got.values()))  # the tuple form
        gradients = []
        for result in (expected, got):
            sum(result.values()).backward()
            gradients.append([x.grad for x in (a, b, logits)])  # logits': None where unused
            for x in (a, b, logits):
                x.grad = None
        for theirs, ours in zip(*gradients):
            assert (theirs is None) == (ours is None), name
            if theirs is not None:
                torch.testing.assert_close(ours, theirs, msg=name)


def test_create_loss_reads_open_clips_training_arguments_and_the_legacy_classifier_builder_agrees(tiny):
    """create_loss(args) with open_clip's training arguments: the same kind of loss and the same value; the legacy
    zero-shot builder: open_clip's legacy weights."""
    from argparse import Namespace

    torch.manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(8, 16), dim=-1) for _ in range(2))
    base = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False, gather_with_grad=False, rank=0,
                world_size=1, horovod=False, coca_caption_loss_weight=2.0, coca_contrastive_loss_weight=1.0,
                loss_dist_impl=None)
    for changes, kind in (({}, "ClipLoss"), ({"siglip": True}, "SigLipLoss"), ({"distill": True}, "DistillClipLoss"),
                          ({"model": "coca_ViT-B-32"}, "CoCaLoss"), ({"local_loss": True}, "ClipLoss")):
        args = Namespace(**{**base, **changes})
        ours, theirs = clipforge.create_loss(args), open_clip.create_loss(args)
        assert type(ours).__name__ == type(theirs).__name__ == kind
        if kind in ("ClipLoss", "SigLipLoss"):
            inputs = (a, b, torch.tensor(10.0)) + ((torch.tensor(-5.0),) if kind == "SigLipLoss" else ())
            torch.testing.assert_close(ours(*inputs), theirs(*inputs))
    with pytest.raises(ValueError, match="torchrun"):
        clipforge.create_loss(Namespace(**{**base, "horovod": True}))

    model, _, _ = clipforge.load("Test-Tiny", pretrained=tiny)
    reference = open_clip.create_model("Test-Tiny", pretrained=tiny).eval()
    classes, templates = ["dog", "cat", "red sofa"], ["a photo of a {}.", "a drawing of a {}."]
    with torch.no_grad():
        ours = clipforge.build_zero_shot_classifier_legacy(model, clipforge.get_tokenizer("Test-Tiny"), classes,
                                                            templates)
        theirs = open_clip.build_zero_shot_classifier_legacy(reference, open_clip.get_tokenizer("Test-Tiny"),
                                                             classes, templates)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("towers", ["vit", "clipa-like", "resnet"])
def test_clip_built_in_code_from_open_clips_tower_configs_is_open_clips_model(towers, tmp_path):
    """open_clip's CLIP(embed_dim, vision_cfg=CLIPVisionCfg(...), text_cfg=CLIPTextCfg(...), quick_gelu): the same
    model from clipforge's config classes and from open_clip's own dataclasses (open_clip's weights load, the same
    features), saved and loaded back as any clipforge model; CustomTextCLIP is the same call."""
    vision, text, quick_gelu = {
        "vit": (dict(layers=2, width=64, head_width=32, patch_size=16, image_size=64),
                dict(width=64, heads=2, layers=2), False),
        "clipa-like": (dict(layers=2, width=64, head_width=32, patch_size=16, image_size=64, ls_init_value=0.1,
                            no_ln_pre=True, pool_type="avg", final_ln_after_pool=True),
                       dict(width=64, heads=2, layers=2, no_causal_mask=True, pool_type="last", proj_bias=True), True),
        "resnet": (dict(layers=(1, 1, 1, 1), width=32, image_size=64), dict(width=64, heads=2, layers=2), False),
    }[towers]
    torch.manual_seed(0)
    theirs = open_clip.CLIP(32, open_clip.CLIPVisionCfg(**vision), open_clip.CLIPTextCfg(**text),
                            quick_gelu=quick_gelu).eval()
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(["a dog", "two cats on a red sofa"])
    for configs in ((clipforge.CLIPVisionCfg(**vision), clipforge.CLIPTextCfg(**text)),
                    (open_clip.CLIPVisionCfg(**vision), open_clip.CLIPTextCfg(**text))):
        for model_class in (clipforge.CLIP, clipforge.CustomTextCLIP):
            ours = model_class(32, vision_cfg=configs[0], text_cfg=configs[1], quick_gelu=quick_gelu).eval()
            clipforge.load_checkpoint(ours, tmp_path / "theirs.pt")
            with torch.no_grad():
                assert (ours.encode_image(images) - theirs.encode_image(images)).abs().max() <= 1e-5
                assert (ours.encode_text(tokens) - theirs.encode_text(tokens)).abs().max() <= 1e-5
    clipforge.save_pretrained(ours, tmp_path / "saved")
    loaded, _, _ = clipforge.load(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(loaded.eval().encode_text(tokens), ours.encode_text(tokens))
    with pytest.raises(TypeError, match="CLIPVisionCfg"):
        clipforge.CLIP(32, vision_cfg=[2, 64], text_cfg=clipforge.CLIPTextCfg(**text))
