"""SigLIP and SigLIP 2: clipforge's towers against transformers' SiglipModel and open_clip's timm-tower SigLIP on
randomly initialised peers, their tokenizer files, and the sigmoid's zero-shot probabilities."""
import json

import pytest
import torch

import clipforge

from conftest import forced_size_gap

TOL = 2e-5
# Captions and web text: punctuation (canonicalize removes it), underscores, case, accents, emoji, an HTML entity, a
# control character, runs of whitespace, one longer than the context, and nothing at all.
TEXTS = ["A photo of a dog.", "a cat_on a MAT!!", "Flickr8k: 6k/1k/1k photos", "café &amp; crème brûlée 😀",
         "two  dogs\tplay?!\x07", "x " * 80, "", "   "]
CORPUS = ["a photo of a dog", "a cat on a mat", "two dogs play in the park", "a man rides a bike down the street",
          "children run on the beach", "a red square and a blue circle", "café crème brûlée"] * 20


def _max_diff(a, b):
    return (a - b).abs().max().item()


def make_tokenizer_folder(folder):
    """A SentencePiece-style (Unigram, Metaspace) tokenizer.json with SigLIP's special tokens: "</s>" ends every
    text and pads it, as in Google's SigLIP vocabularies, which cannot be downloaded here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="</s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return tok.get_vocab_size()


def make_gemma_tokenizer_folder(folder):
    """SigLIP 2's kind: a GemmaTokenizer (BPE, its own normalizer, BOS and EOS added, padding on the left by its class
    default), which transformers rebuilds from tokenizer.json rather than taking the file as it is."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=[
        "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]))
    data = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in data["merges"]]
    GemmaTokenizer(vocab=data["vocab"], merges=merges, add_bos_token=True, add_eos_token=True).save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
    return make_hf_siglip(tmp_path_factory.mktemp("siglip") / "hf")


def make_hf_siglip(folder, make_tokenizer=make_tokenizer_folder):
    """A transformers SiglipModel folder (small, random, logit scale above CLIP's clamp) with tokenizer and image
    processor files, as google/siglip-* repos hold them; ``(folder, model)``. ``make_tokenizer(folder)`` writes the
    tokenizer files and returns the vocabulary's size."""
    transformers = pytest.importorskip("transformers")
    vocab = make_tokenizer(folder)
    torch.manual_seed(0)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.SiglipConfig(text_config=dict(vocab_size=vocab, max_position_embeddings=64, **tower),
                                       vision_config=dict(image_size=32, patch_size=8, **tower))
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit" not in name:
                p.add_(torch.randn_like(p) * 0.02)
        model.logit_scale.fill_(4.8)  # exp: 121.5, above the 100 CLIP clamps at
        model.logit_bias.fill_(-12.0)
    model.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model


def test_a_transformers_siglip_folder_loads_with_identical_features_logits_and_tokens(hf_siglip):
    folder, hf = hf_siglip
    model, preprocess, tokenizer = clipforge.load(str(folder))
    assert model.config["vision_cfg"]["act"] == "gelu_tanh" and model.config["text_cfg"]["pool"] == "last"
    assert preprocess.settings["resize_mode"] == "squash" and preprocess.settings["mean"] == (0.5, 0.5, 0.5)
    ids = tokenizer(TEXTS)
    assert ids.shape == (len(TEXTS), 64) and (ids[:, -1] == 1).all()  # "</s>"-padded, the long one truncated
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=images)
        assert _max_diff(model.encode_image(images, normalize=True), out.image_embeds) <= TOL
        assert _max_diff(model.encode_text(ids, normalize=True), out.text_embeds) <= TOL
        ours = model(images, ids)
        assert ours.logit_scale.item() == pytest.approx(121.51, abs=0.01)  # not clamped to 100
        assert _max_diff(ours.logits_per_image, out.logits_per_image) <= 1e-4 * 121


@pytest.mark.parametrize("with_transformers", [True, False])
def test_siglip_tokens_are_open_clips(hf_siglip, tmp_path, monkeypatch, with_transformers):
    """open_clip's HFTokenizer (the canonicalize cleaner, then the tokenizer padded and truncated to 64) on the same
    files: identical ids, noisy web text included; for SigLIP's T5-style vocabulary (EOS-padded on the right) and
    SigLIP 2's Gemma kind (BOS and EOS, padded on the left: also where transformers, which would configure it, is
    not installed)."""
    open_clip = pytest.importorskip("open_clip")
    from clipforge import hub_tokenizer
    from clipforge.hub_tokenizer import HubTokenizer

    folder, _ = hf_siglip
    make_gemma_tokenizer_folder(tmp_path / "gemma")
    theirs = {source: open_clip.tokenizer.HFTokenizer(str(source), context_length=64, clean="canonicalize")
              for source in (folder, tmp_path / "gemma")}
    monkeypatch.setattr(hub_tokenizer, "_transformers_installed", lambda: with_transformers)
    for source in (folder, tmp_path / "gemma"):
        tokenizer = HubTokenizer(source, 64, clean="canonicalize")
        assert torch.equal(tokenizer(TEXTS), theirs[source](TEXTS)), source
        assert torch.equal(tokenizer(TEXTS, context_length=16), theirs[source](TEXTS, context_length=16)), source
        assert tokenizer([]).shape == (0, 64)
        assert (tokenizer._configured is None) == (not with_transformers or source == folder)
    row = HubTokenizer(tmp_path / "gemma", 16)(["a dog"])[0].tolist()
    pads = row.count(0)  # <pad> is 0, <eos> 1, <bos> 2
    assert pads > 0 and row[:pads] == [0] * pads and row[pads] == 2 and row[-1] == 1


def test_siglip_converts_to_clipforge_and_back_and_transformers_pipeline_gives_clipforges_probabilities(
        hf_siglip, tmp_path):
    """HF -> clipforge -> HF: the same SiglipModel; the export's zero-shot pipeline gives clipforge's class
    probabilities (sigmoids, as the pipeline computes them for SigLIP), and its pixels are clipforge's within one
    8-bit level."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from clipforge.convert import convert
    from clipforge.zeroshot import class_probabilities

    folder, hf = hf_siglip
    with pytest.raises(clipforge.CheckpointError, match="SigLIP model has no OpenAI layout"):
        convert(str(folder), str(tmp_path / "w.safetensors"), to="openai")
    convert(str(folder), str(tmp_path / "ours"), to="clipforge")
    assert (tmp_path / "ours" / "tokenizer.json").is_file()  # the saved model carries its tokenizer, not a path
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_cfg"]["text_cfg"]["hf_tokenizer_name"] \
        is None
    convert(str(tmp_path / "ours"), str(tmp_path / "back"), to="hf")
    back = transformers.SiglipModel.from_pretrained(tmp_path / "back").eval()
    model, preprocess, tokenizer = clipforge.load(str(tmp_path / "ours"))
    images, ids = torch.randn(2, 3, 32, 32), tokenizer(TEXTS[:3])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids, pixel_values=images).logits_per_image,
                           back(input_ids=ids, pixel_values=images).logits_per_image)
    classify = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path / "back"))
    image = Image.radial_gradient("L").convert("RGB").resize((120, 90))
    labels = ["a red square", "a blue circle", "a dog"]
    theirs = {row["label"]: row["score"] for row in classify(image, candidate_labels=labels, hypothesis_template="{}")}
    pixels = classify.image_processor(images=image, return_tensors="pt").pixel_values
    assert _max_diff(pixels[0], preprocess(image)) < 1.1 / 255 / 0.5
    with torch.no_grad():
        weights = model.encode_text(tokenizer(labels), normalize=True).T
        ours = class_probabilities(model, model.encode_image(pixels, normalize=True), weights)[0]
    assert ours.tolist() == pytest.approx([theirs[label] for label in labels], abs=1e-5)
    assert abs(float(ours.sum()) - 1) > 0.05  # sigmoids, not a softmax


def test_open_clip_siglip_weights_load_and_export_back_to_open_clip(hf_siglip, tmp_path):
    """open_clip's ViT-B-16-SigLIP (timm image tower): its state dict loads by name with identical features, and
    `convert --to open_clip` writes a local-dir: folder open_clip loads with identical features and tokens."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from clipforge.checkpoint.openai import save_open_clip

    torch.manual_seed(0)
    theirs = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
    torch.save(theirs.state_dict(), tmp_path / "w.pt")
    ours = clipforge.load_model("ViT-B-16-SigLIP", pretrained=str(tmp_path / "w.pt"))
    tokenizer_folder, _ = hf_siglip  # the real tokenizer lives in the hub repo timm/ViT-B-16-SigLIP
    ours.config["text_cfg"]["hf_tokenizer_name"] = str(tokenizer_folder)
    save_open_clip(ours, tmp_path / "oc")
    back = open_clip.create_model("local-dir:" + str(tmp_path / "oc")).eval()
    reloaded, _, tokenizer = clipforge.load("local-dir:" + str(tmp_path / "oc"))
    assert torch.equal(open_clip.get_tokenizer("local-dir:" + str(tmp_path / "oc"))(TEXTS), tokenizer(TEXTS))
    images, ids = torch.randn(2, 3, 224, 224), torch.randint(0, 32000, (3, 64))
    with torch.no_grad():
        expected_image, expected_text = theirs.encode_image(images), theirs.encode_text(ids)
        for model in (ours, back, reloaded):
            assert _max_diff(model.encode_image(images), expected_image) <= TOL
            assert _max_diff(model.encode_text(ids), expected_text) <= TOL
    # at 256 px: a position grid without a class token's, resized as timm's set_input_size resizes it
    assert forced_size_gap(open_clip, "ViT-B-16-SigLIP", tmp_path / "w.pt", 256) <= TOL


def test_zoo_siglip_configs_are_open_clips_and_timm_towers_are_timms():
    """Every open_clip SigLIP / SigLIP 2 architecture (nllb-clip-siglip's too, with its Hugging Face text tower) is in
    the zoo under its name, translated from open_clip's config; the timm towers' shapes and activations (exact GELU
    in some, tanh in others) are timm's."""
    open_clip = pytest.importorskip("open_clip")
    timm = pytest.importorskip("timm")
    from pathlib import Path

    from clipforge.checkpoint.timm_siglip import TIMM_SIGLIP, config_from_open_clip, config_to_open_clip

    folder = Path(open_clip.__file__).parent / "model_configs"
    configs = sorted([*folder.glob("*SigLIP*.json"), *folder.glob("nllb-clip-*-siglip.json")])
    assert len(configs) >= 28
    for path in configs:
        ours = clipforge.get_model_config(path.stem)
        assert ours == config_from_open_clip(json.loads(path.read_text())), path.stem
        assert config_from_open_clip(config_to_open_clip(ours)) == ours, path.stem
    for name, (patch, size, width, layers, heads, hidden, act) in TIMM_SIGLIP.items():
        with torch.device("meta"):
            tower = timm.create_model(name, pretrained=False, num_classes=0)
        block = tower.blocks[0]
        assert (tower.patch_embed.patch_size[0], tower.patch_embed.img_size[0], tower.embed_dim, len(tower.blocks),
                block.attn.num_heads, block.mlp.fc1.out_features) == (patch, size, width, layers, heads, hidden), name
        assert (type(block.mlp.act).__name__ == "GELUTanh") == (act == "gelu_tanh"), name
        assert tower.cls_token is None and tower.global_pool == "map", name


TINY = {"embed_dim": 64, "init_logit_bias": -10.0, "logit_scale_max": None,
        "vision_cfg": {"image_size": 36, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16, "pool": "map",
                       "act": "gelu_tanh", "norm_eps": 1e-6},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 48, "heads": 4, "layers": 2, "causal": False,
                     "pool": "last", "proj": "linear", "act": "gelu", "norm_eps": 1e-6, "hf_tokenizer_name": None}}


def test_a_siglip_model_trains_and_its_image_size_need_not_be_a_patch_multiple():
    """The towers learn under the sigmoid loss (the pooling probe and text projection bias included); 36 px at
    patch 8 covers the top-left 32 px, as timm's SO400M/14 at 384 px does."""
    from clipforge.loss import create_loss

    torch.manual_seed(0)
    model = clipforge.create_model(TINY)
    images, tokens = torch.randn(4, 3, 36, 36), torch.randint(0, 100, (4, 16))
    out = model(images, tokens)
    create_loss("siglip")(*out).backward()
    for name in ("visual.head.probe", "text.text_projection.bias", "logit_bias", "visual.conv1.bias"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        cropped = images.clone()
        cropped[..., 32:, :] = 0  # the pixels outside the patch grid change nothing
        cropped[..., :, 32:] = 0
        assert torch.equal(model.encode_image(images), model.encode_image(cropped))
        assert model.visual.forward_grid(images).shape == (4, 64, 4, 4)


def test_clip_keeps_its_softmax_and_clamp():
    from clipforge.zeroshot import class_probabilities

    model = clipforge.create_model("ViT-Tiny-64").eval()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
        assert model(torch.randn(1, 3, 64, 64), None).logit_scale.item() == 100.0
    probabilities = class_probabilities(model, torch.nn.functional.normalize(torch.randn(2, 512)),
                                        torch.nn.functional.normalize(torch.randn(512, 3), dim=0))
    assert probabilities.sum(dim=-1).tolist() == pytest.approx([1.0, 1.0])


def test_a_siglip_model_without_tokenizer_files_says_so(hf_siglip, tmp_path, monkeypatch):
    import shutil

    folder, _ = hf_siglip
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folder / name, bare / name)
    model, _, tokenizer = clipforge.load(str(bare))  # images need no tokenizer: loading works, text says why not
    assert model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    with pytest.raises(ValueError, match="tokenizer files"):
        tokenizer(["a dog"])
    # a zoo SigLIP's tokenizer is a hub repo: offline and uncached, the error names the repo (on first use only)
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    tokenizer = clipforge.get_tokenizer("ViT-B-16-SigLIP")
    from clipforge.pretrained import DownloadError

    with pytest.raises(DownloadError, match="timm/ViT-B-16-SigLIP"):
        tokenizer(["a dog"])
    with pytest.raises(ValueError, match="unknown text cleaner"):
        clipforge.get_tokenizer({"text_cfg": {"hf_tokenizer_name": str(folder), "tokenizer_kwargs": {"clean": "x"}}})


def test_siglip_exports_to_onnx_with_eager_features(hf_siglip, tmp_path):
    pytest.importorskip("onnxruntime")
    from clipforge.onnx_backend import export_onnx, load_onnx

    folder, _ = hf_siglip
    model, _, tokenizer = clipforge.load(str(folder))
    export_onnx(model, tmp_path / "onnx")
    onnx_model = load_onnx(tmp_path / "onnx")[0]
    images, ids = torch.randn(3, 3, 32, 32), tokenizer(TEXTS)
    with torch.no_grad():
        assert _max_diff(onnx_model.encode_image(images, normalize=True), model.encode_image(images, normalize=True)) <= 1e-4
        assert _max_diff(onnx_model.encode_text(ids, normalize=True), model.encode_text(ids, normalize=True)) <= 1e-4
        assert onnx_model(images, ids).logit_scale.item() == pytest.approx(model(images, ids).logit_scale.item())


def test_a_transformers_siglip_hub_repo_loads_and_its_tokenizer_is_fetched_once(hf_siglip, tmp_path, monkeypatch):
    """hf-hub:OWNER/NAME for a SiglipModel repo (google/siglip-* and siglip2-*): weights, image processor and the
    tokenizer files from the repo; all cached, so it loads and tokenizes again offline."""
    from conftest import hub_server

    folder, hf = hf_siglip
    names = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")
    files = {name: (folder / name).read_bytes() for name in names}
    srv = hub_server(monkeypatch, tmp_path / "cache", "owner/siglip", files)
    try:
        model, preprocess, tokenizer = clipforge.load("hf-hub:owner/siglip")
        ids = tokenizer(TEXTS)
    finally:
        srv.close()
    assert preprocess.settings["resize_mode"] == "squash"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=images)
        assert _max_diff(model.encode_image(images, normalize=True), out.image_embeds) <= TOL
        assert _max_diff(model.encode_text(ids, normalize=True), out.text_embeds) <= TOL
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    assert torch.equal(clipforge.load("hf-hub:owner/siglip")[2](TEXTS), ids)


def test_a_bare_siglip_state_dict_takes_the_activations_of_the_zoo_architecture_with_its_shapes(monkeypatch):
    """Weights do not show exact vs tanh GELU; a zoo architecture with the same shapes says (SigLIP 2's vocabulary
    sets it apart from SigLIP's), so an unnamed open_clip SigLIP 2 file loads with its own activations."""
    from clipforge import models
    from clipforge.checkpoint import infer_config

    monkeypatch.setattr(models, "_EXTRA_CONFIGS", {**models._EXTRA_CONFIGS})
    tanh = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "image_size": 32, "act": "gelu_tanh"},
            "text_cfg": {**TINY["text_cfg"], "act": "gelu_tanh"}}
    state = clipforge.create_model(tanh).state_dict()
    assert infer_config(state)["text_cfg"].get("act", "gelu") == "gelu"  # no architecture with these shapes: exact
    models.register_model_config("Test-SigLIP2-tanh", tanh)
    inferred = infer_config(state)
    assert inferred["vision_cfg"]["act"] == inferred["text_cfg"]["act"] == "gelu_tanh"
    assert inferred["vision_cfg"]["head_width"] == 16


def test_an_export_whose_tokenizer_cannot_be_fetched_writes_nothing(tmp_path, monkeypatch):
    """A SigLIP whose tokenizer is a hub repo, offline and uncached: the HF and open_clip exports fail, naming the
    repo, before a file is written (not a folder of weights without a tokenizer)."""
    from clipforge.checkpoint import hf
    from clipforge.pretrained import DownloadError

    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    config = {**TINY, "text_cfg": {**TINY["text_cfg"], "hf_tokenizer_name": "owner/siglip-tokenizer"}}
    model = clipforge.create_model(config)
    model.config = config
    with pytest.raises(DownloadError, match="owner/siglip-tokenizer"):
        hf.save(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_open_clip_hub_configs_with_timm_towers_translate_as_local_folders_do():
    """fetch_hub's reading of an open_clip repo's model_cfg (the download itself is tested elsewhere): SigLIP's and
    ConvNeXt's and EVA's timm towers become the zoo's configs; a timm tower clipforge does not build is refused by
    name."""
    open_clip = pytest.importorskip("open_clip")
    from pathlib import Path

    from clipforge.checkpoint import CheckpointError
    from clipforge.pretrained import _open_clip_config

    configs = Path(open_clip.__file__).parent / "model_configs"
    for name in ("ViT-B-16-SigLIP2-256", "convnext_base_w", "EVA02-B-16"):
        assert _open_clip_config(json.loads((configs / f"{name}.json").read_text()), "owner/repo") == \
            clipforge.get_model_config(name)
    swin = json.loads((configs / "swin_base_patch4_window7_224.json").read_text())
    with pytest.raises(CheckpointError, match="timm's 'swin_base_patch4_window7_224', which clipforge does not build"):
        _open_clip_config(swin, "owner/repo")
