"""Exact parity with open_clip and Hugging Face transformers on randomly initialised peer models."""
import pytest
import torch

import clipforge
from clipforge.checkpoint import clipforge_to_openai

from conftest import random_tokens

TOL = 1e-5


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_open_clip_state_dict_loads_with_identical_outputs(name, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    theirs = open_clip.create_model(name, pretrained=None).eval()
    path = tmp_path / "open_clip.pt"
    torch.save(theirs.state_dict(), path)
    for ours in (clipforge.load(name, pretrained=str(path))[0], clipforge.load(str(path))[0]):  # named, inferred
        size = ours.image_size
        images, tokens = torch.randn(2, 3, size, size), random_tokens(3)
        with torch.no_grad():
            assert _max_diff(theirs.encode_image(images), ours.encode_image(images)) <= TOL
            assert _max_diff(theirs.encode_text(tokens), ours.encode_text(tokens)) <= TOL
            img, txt, scale = theirs(images, tokens)[:3]
            assert _max_diff(scale * img @ txt.T, ours(images, tokens).logits_per_image) <= TOL


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_clipforge_weights_load_into_open_clip(name):
    open_clip = pytest.importorskip("open_clip")
    ours = clipforge.create_model(name).eval()
    theirs = open_clip.create_model(name, pretrained=None).eval()
    theirs.load_state_dict(clipforge_to_openai(ours.state_dict()))
    size = ours.image_size
    images, tokens = torch.randn(2, 3, size, size), random_tokens(3)
    with torch.no_grad():
        assert _max_diff(theirs.encode_image(images), ours.encode_image(images)) <= TOL
        assert _max_diff(theirs.encode_text(tokens), ours.encode_text(tokens)) <= TOL


def test_an_open_clip_script_runs_with_clipforge_swapped_in(tmp_path):
    """open_clip's calls (create_model_and_transforms, create_model_from_pretrained, get_tokenizer) on clipforge
    give the same features, for a script that changes only its import."""
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), tmp_path / "weights.pt")
    image = Image.radial_gradient("L").convert("RGB").resize((300, 200))

    def script(library):
        model, train_transform, preprocess = library.create_model_and_transforms(
            "ViT-B-32", pretrained=str(tmp_path / "weights.pt"))
        model.eval()
        tokenizer = library.get_tokenizer("ViT-B-32")
        with torch.no_grad():
            features = (model.encode_image(preprocess(image).unsqueeze(0)),
                        model.encode_text(tokenizer(["a diagram", "a dog running through water"])))
            # open_clip's forward: three values to unpack (a fourth only with a logit bias)
            _, text_features, logit_scale = model(preprocess(image).unsqueeze(0), tokenizer(["a diagram"]))
        return features, train_transform(image).shape, library.create_model_from_pretrained(
            "ViT-B-32", pretrained=str(tmp_path / "weights.pt"))[1](image), (text_features, logit_scale)

    (image_a, text_a), train_shape_a, pixels_a, forward_a = script(open_clip)
    (image_b, text_b), train_shape_b, pixels_b, forward_b = script(clipforge)
    assert _max_diff(text_a, text_b) <= TOL and train_shape_a == train_shape_b == (3, 224, 224)
    assert _max_diff(forward_a[0], forward_b[0]) <= TOL and _max_diff(forward_a[1], forward_b[1]) == 0
    assert _max_diff(pixels_a, pixels_b) < 1.1 / 255 / 0.26  # Pillow alone vs torchvision: within one 8-bit level
    assert torch.nn.functional.cosine_similarity(image_a, image_b).item() > 0.9999


def test_head_layout_of_a_zoo_architecture_is_used_when_loading_its_weights_by_path(tmp_path, monkeypatch):
    """Weights do not show how many heads split a width. LAION's ViT-H/g/bigG-14 use 80-104-wide heads, not OpenAI's
    64: loading their state dict by path must take the zoo's head layout (here a small stand-in with 40-wide heads
    and an odd MLP ratio, registered in both libraries), else the features silently differ."""
    open_clip = pytest.importorskip("open_clip")
    config = {"embed_dim": 48,
              "vision_cfg": {"image_size": 64, "layers": 2, "width": 160, "head_width": 40, "mlp_ratio": 4.9231,
                             "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 2}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "Test-Wide-Heads", config)
    monkeypatch.setattr(clipforge.models, "_EXTRA_CONFIGS", {**clipforge.models._EXTRA_CONFIGS})
    clipforge.models.register_model_config("Test-Wide-Heads", config)
    theirs = open_clip.create_model("Test-Wide-Heads", pretrained=None).eval()
    path = tmp_path / "open_clip_model.safetensors"
    clipforge.checkpoint.save_safetensors(theirs.state_dict(), path)
    ours = clipforge.load(str(path))[0]
    assert ours.config["vision_cfg"]["head_width"] == 40 and ours.config["text_cfg"]["heads"] == 2
    images, tokens = torch.randn(2, 3, 64, 64), random_tokens(3)
    with torch.no_grad():
        assert _max_diff(theirs.encode_image(images), ours.encode_image(images)) <= TOL
        assert _max_diff(theirs.encode_text(tokens), ours.encode_text(tokens)) <= TOL


@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-g-14", "ViT-bigG-14"])
def test_laion_giants_get_their_head_layout_from_weight_shapes(name):
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):  # shapes only: no memory, no time
        theirs = open_clip.create_model(name, pretrained=None, device="meta")
    config = clipforge.infer_config(clipforge.checkpoint.openai_to_clipforge(theirs.state_dict()))
    zoo = clipforge.get_model_config(name)
    assert config["vision_cfg"]["head_width"] == zoo["vision_cfg"]["head_width"] != 64
    assert config["vision_cfg"]["width"] // config["vision_cfg"]["head_width"] == \
        theirs.visual.transformer.resblocks[0].attn.num_heads
    assert config["text_cfg"]["heads"] == theirs.transformer.resblocks[0].attn.num_heads


def _small_hf_model(quick_gelu=True):
    transformers = pytest.importorskip("transformers")
    act = "quick_gelu" if quick_gelu else "gelu"
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                         max_position_embeddings=77, hidden_act=act),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_attention_heads=3, num_hidden_layers=2,
                           image_size=64, patch_size=16, hidden_act=act),
        projection_dim=48,
    )
    return transformers.CLIPModel(config).eval()


def _hf_features(model, images, tokens):
    with torch.no_grad():
        out = model(input_ids=tokens, pixel_values=images)
    return out.image_embeds, out.text_embeds, out.logits_per_image


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_hugging_face_folder_loads_with_identical_outputs(tmp_path, quick_gelu):
    hf = _small_hf_model(quick_gelu)
    hf.save_pretrained(tmp_path / "hf")
    ours, preprocess, tokenizer = clipforge.load(str(tmp_path / "hf"))
    images = torch.randn(3, 3, 64, 64)
    tokens = tokenizer(["a photo of a cat", "an emoji 😀 caption", ""])
    image_embeds, text_embeds, logits = _hf_features(hf, images, tokens)
    with torch.no_grad():
        out = ours(images, tokens)
    assert _max_diff(image_embeds, out.image_features) <= TOL
    assert _max_diff(text_embeds, out.text_features) <= TOL
    assert _max_diff(logits, out.logits_per_image) <= TOL


def test_export_to_hugging_face_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = _small_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    from clipforge.convert import convert

    convert(str(tmp_path / "hf"), str(tmp_path / "ours"), to="clipforge")
    convert(str(tmp_path / "ours"), str(tmp_path / "back"), to="hf")
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "back").eval()
    images, tokens = torch.randn(2, 3, 64, 64), random_tokens(2)
    for a, b in zip(_hf_features(hf, images, tokens), _hf_features(reloaded, images, tokens)):
        assert _max_diff(a, b) <= TOL


def test_a_hugging_face_export_carries_a_clip_processor_that_feeds_the_model_as_clipforge_does(tmp_path):
    """`clipforge convert --to hf` writes what CLIPProcessor.from_pretrained reads: on captions (with accents,
    emoji, runs of punctuation) its ids are clipforge's up to padding, its pixels within one 8-bit level, and
    CLIPModel's embeddings are clipforge's."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from clipforge.convert import convert

    torch.manual_seed(0)
    model = clipforge.create_model("ViT-Tiny-64").eval()
    clipforge.save_pretrained(model, tmp_path / "ours")
    convert(str(tmp_path / "ours"), str(tmp_path / "hf"), to="hf")
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    _, preprocess, tokenizer = clipforge.load(str(tmp_path / "ours"))
    texts = ["a photo of a cat", "A Dog's   DINNER, café & crème brûlée!! 😀", "two  dogs\tplay?!", "x " * 40]
    ids = processor(text=texts, return_tensors="pt", padding="max_length", truncation=True).input_ids
    ours = tokenizer(texts)
    assert ids.shape == ours.shape  # the model's own context length (32 here)
    assert torch.equal(torch.where(ours == 0, 49407, ours), ids)  # transformers pads with <|endoftext|>
    image = Image.radial_gradient("L").convert("RGB").resize((150, 100))
    pixels = processor(images=[image], return_tensors="pt").pixel_values
    assert _max_diff(pixels[0], preprocess(image)) < 1.1 / 255 / min(preprocess.std)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels)
        assert _max_diff(out.text_embeds, model.encode_text(ours, normalize=True)) <= TOL
        assert _max_diff(out.image_embeds, model.encode_image(pixels, normalize=True)) <= TOL


def test_every_zoo_architecture_open_clip_has_is_its_parameters_name_for_name_and_shape_for_shape():
    """Each architecture in both zoos (clipforge's own towers and timm's; not those with a Hugging Face text encoder,
    which open_clip would download) builds open_clip's parameters, under its key layout: built on the meta device,
    so shapes cost no memory."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    import logging

    from clipforge.checkpoint import openai, timm_siglip
    from clipforge.models import get_model_config

    checked = []
    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights loaded", once per model
    try:
        for name in sorted(set(clipforge.list_models()) & set(open_clip.list_models())):
            if "hf_model_name" in get_model_config(name)["text_cfg"]:
                continue
            with torch.device("meta"):
                ours = clipforge.create_model(name).state_dict()
                theirs = open_clip.create_model(name, device="meta").state_dict()
            if "visual.head.probe" in ours:  # SigLIP: timm's tower names
                ours = timm_siglip.from_clipforge(ours)
            elif not any(k.startswith("text.") for k in theirs):  # CLIP's layout (custom-text models keep text.)
                ours = openai.from_clipforge(ours)
            assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name
            checked.append(name)
    finally:
        logging.disable(logging.NOTSET)
    assert len(checked) > 110 and {"ViT-M-16-alt", "coca_base", "EVA02-B-16", "ViT-B-16-SigLIP2", "MobileCLIP-S2",
                                   "convnext_base_w", "ViTamin-S", "RN50"} <= set(checked)


def test_every_zoo_architecture_transformers_has_exports_to_its_parameters_name_for_name_and_shape_for_shape():
    """Each zoo architecture `convert --to hf` writes (CLIP, SigLIP, MetaCLIP 2 kinds; the rest are refused by name)
    gets a config from which transformers builds exactly the parameters our weights map to (on the meta device)."""
    transformers = pytest.importorskip("transformers")
    import math

    from clipforge.checkpoint import CheckpointError, hf
    from clipforge.models import get_model_config

    kinds = {}
    for name in clipforge.list_models():
        try:
            config = hf.config_from_clipforge(get_model_config(name), math.log(100))
        except CheckpointError:
            continue
        architecture = config["architectures"][0]
        hf_config = getattr(transformers, architecture.replace("Model", "Config")).from_dict(config)
        with torch.device("meta"):
            theirs = getattr(transformers, architecture)(hf_config).state_dict()
            ours = hf.from_clipforge(clipforge.create_model(name).state_dict())
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name
        kinds.setdefault(architecture, []).append(name)
    assert set(kinds) == {"CLIPModel", "SiglipModel", "MetaClip2Model"} and sum(map(len, kinds.values())) > 50


def test_every_pretrained_tag_open_clip_also_has_names_its_weights_activation_and_preprocessing():
    """Each built-in tag against open_clip's own registry: the same file (OpenAI's URL or the Hugging Face repo),
    QuickGELU or not, and the same image mean, std, resize mode and interpolation (defaults: OpenAI's). A tag whose
    weights were trained on other preprocessing than OpenAI's (ViT-L-14 laion2b_s32b_b82k: mean and std 0.5; the DFN-5B
    models: images squashed) would otherwise load exactly and still give other features."""
    open_clip = pytest.importorskip("open_clip")
    from clipforge.preprocess import OPENAI_MEAN, OPENAI_STD
    from clipforge.pretrained import get_pretrained

    theirs_known = set(open_clip.list_pretrained())
    checked = 0
    for model, tag in clipforge.list_pretrained():
        if (model, tag) not in theirs_known:
            continue
        ours, theirs = get_pretrained(model, tag), open_clip.get_pretrained_cfg(model, tag)
        hub = theirs.get("hf_hub", "").strip("/")
        if "huggingface.co" in ours.url:
            repo, _, file = hub.partition("/")[2].partition("/")  # a repo, or a repo and the one file named
            owner = hub.split("/")[0]
            assert f"/{owner}/{repo}/resolve/main/{file}" in ours.url, (model, tag)
        else:
            assert ours.url == theirs["url"], (model, tag)
        assert ours.quick_gelu == bool(theirs.get("quick_gelu", False)), (model, tag)
        assert tuple(ours.mean or OPENAI_MEAN) == pytest.approx(tuple(theirs.get("mean", OPENAI_MEAN))), (model, tag)
        assert tuple(ours.std or OPENAI_STD) == pytest.approx(tuple(theirs.get("std", OPENAI_STD))), (model, tag)
        assert (ours.resize_mode or "shortest") == theirs.get("resize_mode", "shortest"), (model, tag)
        assert (ours.interpolation or "bicubic") == theirs.get("interpolation", "bicubic"), (model, tag)
        checked += 1
    assert checked == len(clipforge.list_pretrained()) >= 40  # all of them: open_clip has every one
    architectures = set(clipforge.list_models())
    missing = [(m, t) for m, t in theirs_known if m in architectures and (m, t) not in set(clipforge.list_pretrained())]
    assert not missing  # and every tag open_clip has for an architecture clipforge builds is here


def test_open_clip_quickgelu_names_build_the_same_model(tmp_path):
    """open_clip's NAME-quickgelu (MetaCLIP's and DFN's weights are trained with it): the same architecture with
    QuickGELU, loading open_clip's weights with identical outputs, and NAME's tags."""
    open_clip = pytest.importorskip("open_clip")
    theirs = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    torch.save(theirs.state_dict(), tmp_path / "w.pt")
    ours = clipforge.load("ViT-B-32-quickgelu", pretrained=str(tmp_path / "w.pt"))[0]
    plain = clipforge.load("ViT-B-32", pretrained=str(tmp_path / "w.pt"))[0]
    images, tokens = torch.randn(2, 3, 224, 224), random_tokens(3)
    with torch.no_grad():
        assert _max_diff(theirs.encode_image(images), ours.encode_image(images)) <= TOL
        assert _max_diff(theirs.encode_text(tokens), ours.encode_text(tokens)) <= TOL
        assert _max_diff(theirs.encode_text(tokens), plain.encode_text(tokens)) > 1e-3  # GELU is another model
    assert clipforge.list_pretrained("ViT-B-32-quickgelu") == clipforge.list_pretrained("ViT-B-32")
    assert clipforge.get_model_config("ViT-H-14-378-quickgelu")["vision_cfg"]["image_size"] == 378


def test_transformers_zero_shot_pipeline_on_an_export_gives_clipforges_probabilities(tmp_path):
    """A transformers user's one-liner, pipeline("zero-shot-image-classification", model=EXPORT), on a `convert --to
    hf` folder: the same class probabilities as clipforge's own zero-shot on the same image (pixels within one 8-bit
    level, hence the tolerance)."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from clipforge.convert import convert

    torch.manual_seed(0)
    clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64").eval(), tmp_path / "ours")
    convert(str(tmp_path / "ours"), str(tmp_path / "hf"), to="hf")
    classify = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path / "hf"))
    image = Image.radial_gradient("L").convert("RGB").resize((120, 90))
    labels = ["a red square", "a blue circle", "a dog"]
    theirs = {row["label"]: row["score"] for row in classify(image, candidate_labels=labels,
                                                              hypothesis_template="{}")}
    model, preprocess, tokenizer = clipforge.load(str(tmp_path / "ours"))
    with torch.no_grad():
        image_features = model.encode_image(preprocess(image)[None], normalize=True)
        text_features = model.encode_text(tokenizer(labels), normalize=True)
        ours = (model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)[0].tolist()
    assert [theirs[label] for label in labels] == pytest.approx(ours, abs=2e-3)


def test_a_squashing_model_exports_a_processor_that_squashes(tmp_path):
    """A model whose weights want their images squashed (DFN) exports a CLIPProcessor that does the same: its pixels
    within one 8-bit level of clipforge's on a wide image."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from clipforge.convert import convert

    model = clipforge.create_model("ViT-Tiny-64").eval()
    model.normalisation = {"resize_mode": "squash", "interpolation": "bicubic"}
    clipforge.save_pretrained(model, tmp_path / "ours")
    convert(str(tmp_path / "ours"), str(tmp_path / "hf"), to="hf")
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    _, preprocess, _ = clipforge.load(str(tmp_path / "ours"))
    assert preprocess.resize_mode == "squash"
    image = Image.radial_gradient("L").convert("RGB").resize((300, 100))
    pixels = processor(images=[image], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 64, 64)
    assert _max_diff(pixels[0], preprocess(image)) < 1.1 / 255 / min(preprocess.std)
    _, from_hf, _ = clipforge.load(str(tmp_path / "hf"))  # and the CLIPModel folder reads back as squashing
    assert (from_hf.resize_mode, from_hf.interpolation) == ("squash", "bicubic")


def test_an_open_clip_folder_export_loads_in_open_clip_with_our_features_and_preprocessing(tmp_path):
    """`convert --to open_clip` writes what open_clip.create_model_and_transforms("local-dir:...") reads: the same
    features, and its evaluation transform equal to clipforge's (squashed images and mean/std kept); clipforge reads
    the folder back too."""
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    from clipforge.convert import convert

    torch.manual_seed(0)
    model = clipforge.create_model("ViT-Tiny-64", init_logit_bias=-3.0).eval()
    model.normalisation = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "resize_mode": "squash"}
    clipforge.save_pretrained(model, tmp_path / "ours")
    convert(str(tmp_path / "ours"), str(tmp_path / "oc"), to="open_clip")
    theirs, _, their_preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    theirs.eval()
    loaded, preprocess, tokenizer = clipforge.load(str(tmp_path / "ours"))
    image = Image.radial_gradient("L").convert("RGB").resize((300, 100))
    assert _max_diff(their_preprocess(image), preprocess(image)) <= 1e-6
    images, tokens = torch.stack([preprocess(image)] * 2), tokenizer(["a red square", "a photo of a dog"])
    with torch.no_grad():
        assert _max_diff(theirs.encode_image(images), model.encode_image(images)) <= TOL
        assert _max_diff(theirs.encode_text(tokens), model.encode_text(tokens)) <= TOL
        assert _max_diff(theirs.logit_bias, model.logit_bias) == 0
    back, back_preprocess, _ = clipforge.load(f"local-dir:{tmp_path / 'oc'}")
    assert back.config == loaded.config and back_preprocess.resize_mode == "squash"
    with torch.no_grad():
        assert _max_diff(back.encode_image(images), model.encode_image(images)) == 0


def test_a_transformers_clip_given_tokens_loads_and_converts_with_them(tmp_path):
    """A transformers CLIPModel whose tokenizer was given tokens (a textual inversion's: ``add_tokens``, a grown
    embedding table) loads in clipforge with transformers' ids and features (before, its placeholders were split
    into BPE pieces); ``convert --to hf`` writes them back as transformers reads them; ``convert --to open_clip``
    (which refused every transformers folder: QuickGELU named per tower) writes them for open_clip's tokenizer,
    with a warning that open_clip matches them its own way. A token of the vocabulary registered whole (a "!" pad)
    is named in a warning."""
    import warnings

    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    from clipforge.convert import convert

    torch.manual_seed(0)
    clipforge.save_pretrained(clipforge.create_model("ViT-Tiny-64").eval(), tmp_path / "ours")
    convert(str(tmp_path / "ours"), str(tmp_path / "hf"), to="hf")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")
    theirs = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert tokenizer.add_tokens(["<cat-toy>", "<Style>"]) == 2
    old = theirs.text_model.embeddings.token_embedding
    grown = torch.nn.Embedding(len(tokenizer), old.embedding_dim)
    with torch.no_grad():
        grown.weight[:old.num_embeddings] = old.weight
    theirs.text_model.embeddings.token_embedding, theirs.config.text_config.vocab_size = grown, len(tokenizer)
    tokenizer.save_pretrained(tmp_path / "inverted")
    theirs.save_pretrained(tmp_path / "inverted")

    texts = ["a photo of a <cat-toy>", "(<cat-toy>) in <STYLE>", "plain words"]
    inputs = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        expected = theirs.get_text_features(**inputs).pooler_output
    model, _, ours_tokenizer = clipforge.load(str(tmp_path / "inverted"))
    ids = ours_tokenizer(texts)
    assert ids[inputs.input_ids != 49407].tolist() == inputs.input_ids[inputs.input_ids != 49407].tolist()
    assert (ids == 49408).sum() == 2 and (ids == 49409).sum() == 1
    with torch.no_grad():
        assert _max_diff(model.encode_text(ids), expected) <= TOL

    clipforge.save_pretrained(model, tmp_path / "cf")
    assert torch.equal(clipforge.get_tokenizer(str(tmp_path / "cf"))(texts), ids)
    convert(str(tmp_path / "cf"), str(tmp_path / "back"), to="hf")
    for library in (transformers, clipforge.transformers_api):
        assert library.CLIPTokenizer.from_pretrained(tmp_path / "back")(texts).input_ids == tokenizer(texts).input_ids
    with torch.no_grad():
        again = transformers.CLIPModel.from_pretrained(tmp_path / "back").get_text_features(**inputs).pooler_output
    assert _max_diff(again, expected) <= TOL

    with pytest.warns(UserWarning, match="where punctuation runs into one"):
        convert(str(tmp_path / "cf"), str(tmp_path / "oc"), to="open_clip")
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    oc_ids = oc_tokenizer(texts)
    assert torch.equal(clipforge.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(texts), oc_ids)
    assert torch.equal(oc_ids[[0, 2]], ids[[0, 2]]) and not torch.equal(oc_ids[1], ids[1])  # "(<" one word there
    with torch.no_grad():
        assert _max_diff(oc_model.encode_text(oc_ids[[0, 2]]), expected[[0, 2]]) <= TOL

    settings = tmp_path / "inverted" / "tokenizer_config.json"
    settings.write_text(settings.read_text().replace('"pad_token": "<|endoftext|>"', '"pad_token": "!"'))
    with pytest.warns(UserWarning, match="matches '!' whole"):
        clipforge.load(str(tmp_path / "inverted"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder without added tokens loads without a word
        clipforge.load(str(tmp_path / "hf"))


def test_towers_with_different_activations_are_refused_for_open_clip():
    """open_clip sets QuickGELU for the whole model: a transformers CLIP's towers' one setting becomes it, towers
    that differ are refused by name rather than written wrong."""
    from clipforge.checkpoint import CheckpointError
    from clipforge.checkpoint.openai import config_to_open_clip

    config = clipforge.get_model_config("ViT-Tiny-64")
    alike = {**config, "vision_cfg": {**config["vision_cfg"], "quick_gelu": True},
             "text_cfg": {**config["text_cfg"], "quick_gelu": True}}
    written = config_to_open_clip(alike)
    assert written["quick_gelu"] is True and "quick_gelu" not in written["vision_cfg"]
    with pytest.raises(CheckpointError, match="different activations"):
        config_to_open_clip({**alike, "text_cfg": {**config["text_cfg"], "quick_gelu": False}})


def _scripted_archive(state: dict) -> torch.jit.ScriptModule:
    """A TorchScript module whose state_dict has exactly ``state``'s keys, as OpenAI's released archives do."""
    root = torch.nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not isinstance(getattr(module, name, None), torch.nn.Module):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    return torch.jit.script(root)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_torchscript_archive_loads_with_identical_outputs(tmp_path):
    """OpenAI released TorchScript archives (weights plus input_resolution/context_length/vocab_size); all of them
    use QuickGELU, which clipforge must apply without being told."""
    open_clip = pytest.importorskip("open_clip")
    theirs = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    state = dict(theirs.state_dict())
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-B-32.pt"
    _scripted_archive(state).save(str(path))

    ours, _, _ = clipforge.load(str(path))
    assert ours.config["quick_gelu"] is True
    images, tokens = torch.randn(2, 3, 224, 224), random_tokens(3)
    with torch.no_grad():
        assert _max_diff(theirs.encode_image(images), ours.encode_image(images)) <= TOL
        assert _max_diff(theirs.encode_text(tokens), ours.encode_text(tokens)) <= TOL
