"""open_clip's own-tower variants beyond OpenAI's CLIP: CLIPA (no ln_pre, mean-pooled patches, ln_post after the pool;
a bidirectional BERT-tokenized text tower pooled at the last position) and MetaCLIP 2 worldwide (XLM-V's vocabulary,
pooled at the first end-of-text token, whose id is not the vocabulary's largest). Parity on small random models of
each kind with open_clip itself, both ways; tokens on vocabularies trained here of the two kinds (BERT WordPiece,
XLM-R Unigram), since bert-base-uncased and facebook/xlm-v-base cannot be downloaded."""
import json

import pytest
import torch

import clipforge

TEXTS = ["A dog runs on the beach!", "ein Hund  läuft\n am Strand", "", "café " * 30, "Über den Wolken &amp; 猫",
         "two children play football in a park", "a man riding a red bicycle"]
CORPUS = ["a dog runs on the beach", "two children play football in a park", "a man riding a red bicycle",
          "Über den Wolken, café crème", "ein Hund läuft am Strand", "猫がソファで寝ている"] * 20


def _max_diff(a, b):
    return (a - b).abs().max().item()


def make_bert_folder(folder):
    """A BERT WordPiece vocabulary (bert-base-uncased's kind: lower case, [CLS] ... [SEP], [PAD] = 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    BertTokenizer(vocab=tok.get_vocab(), do_lower_case=True).save_pretrained(folder)
    return tok.get_vocab_size()


def make_xlmr_folder(folder):
    """XLM-V's kind: an XLM-R Unigram tokenizer (<s> = 0, <pad> = 1, </s> = 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<s>", "<pad>", "</s>",
                                                                                            "<unk>"], unk_token="<unk>"))
    pieces = json.loads(tok.to_str())["model"]["vocab"]
    XLMRobertaTokenizer(vocab=[tuple(p) for p in pieces]).save_pretrained(folder)
    return len(pieces)


def _open_clip_folder(open_clip, folder, model_cfg):
    """A random open_clip model of ``model_cfg`` (LayerNorms and biases moved off their initial values, so that each
    one is checked), saved as a local-dir: folder beside its tokenizer files."""
    from conftest import write_open_clip_folder

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**model_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    write_open_clip_folder(folder, model, model_cfg)
    return model


def _tiny_cfg(kind, vocab):
    vision = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8}
    text = {"context_length": 16, "vocab_size": vocab, "width": 64, "heads": 4, "layers": 2, "hf_tokenizer_name": "."}
    if kind == "clipa":
        vision.update(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True)
        text.update(pool_type="last", no_causal_mask=True, tokenizer_kwargs={"strip_sep_token": True})
        return {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}
    text.update(pool_type="eos", eos_id=2)
    return {"embed_dim": 32, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}


@pytest.mark.parametrize("kind", ["clipa", "worldwide"])
def test_open_clip_folders_load_with_identical_features_and_tokens_and_export_back(kind, tmp_path):
    """An open_clip local-dir: folder of each kind loads with open_clip's features and ids; `convert --to
    open_clip` writes a folder open_clip loads with the same again (its tokenizer files beside the weights)."""
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("transformers")
    from clipforge.convert import convert

    folder = tmp_path / "theirs"
    vocab = make_bert_folder(folder) if kind == "clipa" else make_xlmr_folder(folder)
    theirs = _open_clip_folder(open_clip, folder, _tiny_cfg(kind, vocab))
    model, _, tokenizer = clipforge.load("local-dir:" + str(folder))
    ids = tokenizer(TEXTS)
    assert torch.equal(ids, open_clip.get_tokenizer("local-dir:" + str(folder))(TEXTS))
    if kind == "clipa":
        assert not (ids == 3).any() and (ids[:, 0] == 2).all()  # [SEP] stripped to 0, [CLS] kept
    else:
        assert ids.max() > 2 and (ids == 2).sum() == len(TEXTS)  # </s> = 2 is not the largest id: pooled by "eos"
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected_image, expected_text = theirs.encode_image(images), theirs.encode_text(ids)
        assert _max_diff(model.encode_image(images), expected_image) <= 1e-5
        assert _max_diff(model.encode_text(ids), expected_text) <= 1e-5
    convert(str(folder), str(tmp_path / "back"), to="open_clip")
    assert json.loads((tmp_path / "back" / "open_clip_config.json").read_text())["model_cfg"] == _tiny_cfg(kind, vocab)
    back = open_clip.create_model("local-dir:" + str(tmp_path / "back")).eval()
    assert torch.equal(open_clip.get_tokenizer("local-dir:" + str(tmp_path / "back"))(TEXTS), ids)
    with torch.no_grad():
        assert _max_diff(back.encode_image(images), expected_image) <= 1e-5
        assert _max_diff(back.encode_text(ids), expected_text) <= 1e-5
    if kind == "clipa":  # transformers has no model of CLIPA's settings
        with pytest.raises(clipforge.CheckpointError, match="CLIPA's settings"):
            convert(str(folder), str(tmp_path / "hf"), to="hf")
        assert not (tmp_path / "hf").exists()


def test_layer_scale_towers_load_from_open_clip_with_its_features_and_gradients_and_convert_back(tmp_path):
    """open_clip's LayerScale (ViT-M-16-alt's image tower, ``ls_init_value``; ``ls_1.gamma``, ``ls_2.gamma``; here in
    the text tower too): a local-dir: folder and the same weights bare load with open_clip's features, in eval mode
    (the fused inference path) and training mode, with its gradients; `convert --to open_clip` gives it back;
    transformers has no place for it."""
    open_clip = pytest.importorskip("open_clip")
    from clipforge.checkpoint.io import save_safetensors
    from clipforge.convert import convert

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                           "ls_init_value": 1e-4},
           "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 1, "layers": 2,  # 64-wide
                        "ls_init_value": 1e-3}}
    theirs = _open_clip_folder(open_clip, tmp_path / "theirs", cfg)  # heads, as bare weights are read; gammas moved
    model = clipforge.load("local-dir:" + str(tmp_path / "theirs"))[0]
    save_safetensors(model.state_dict(), tmp_path / "bare.safetensors")
    bare = clipforge.load(str(tmp_path / "bare.safetensors"))[0]
    assert bare.config["vision_cfg"]["ls_init_value"] is not None and bare.config["text_cfg"]["ls_init_value"]
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 100, (3, 16))
    with torch.no_grad():
        expected = theirs.encode_image(images)
        for ours in (model, bare):
            assert _max_diff(ours.encode_image(images), expected) <= 1e-5
            assert _max_diff(ours.encode_text(tokens), theirs.encode_text(tokens)) <= 1e-5
        plain = {tower: {**cfg[tower], "ls_init_value": None} for tower in ("vision_cfg", "text_cfg")}
        as_plain = clipforge.create_model({**cfg, **plain}).eval()
        as_plain.load_state_dict(model.state_dict(), strict=False)
        assert _max_diff(as_plain.encode_image(images), expected) > 1e-3  # the scales matter
        assert _max_diff(as_plain.encode_text(tokens), theirs.encode_text(tokens)) > 1e-3
    model.train(), theirs.train()
    ours_out = torch.cat([model.encode_image(images), model.encode_text(tokens)])
    their_out = torch.cat([theirs.encode_image(images), theirs.encode_text(tokens)])
    assert _max_diff(ours_out, their_out) <= 1e-5
    ours_out.square().sum().backward()
    their_out.square().sum().backward()
    for name, their_name in (("visual.transformer.resblocks.0.ls_1.gamma",) * 2,
                             ("visual.transformer.resblocks.1.ls_2.gamma",) * 2, ("visual.conv1.weight",) * 2,
                             ("text.transformer.resblocks.0.ls_1.gamma", "transformer.resblocks.0.ls_1.gamma"),
                             ("text.transformer.resblocks.1.ls_2.gamma", "transformer.resblocks.1.ls_2.gamma")):
        ours_grad = model.get_parameter(name).grad
        assert ours_grad.abs().max() > 0, name
        assert _max_diff(ours_grad, theirs.get_parameter(their_name).grad) <= 1e-5 * ours_grad.abs().max(), name

    convert(str(tmp_path / "theirs"), str(tmp_path / "back"), to="open_clip")
    assert json.loads((tmp_path / "back" / "open_clip_config.json").read_text())["model_cfg"] == cfg
    back = open_clip.create_model("local-dir:" + str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert _max_diff(back.encode_image(images), expected) <= 1e-5
    with pytest.raises(clipforge.CheckpointError, match="no LayerScale"):
        convert(str(tmp_path / "theirs"), str(tmp_path / "hf"), to="hf")
    assert not (tmp_path / "hf").exists()


def test_layer_scale_vit_exports_to_onnx_with_eager_features(tmp_path):
    """The scales (moved far off their start) are in the exported graph: features within 1e-4 of eager PyTorch's."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from conftest import onnx_feature_differences

    from clipforge.models import get_model_config

    config = get_model_config("ViT-Tiny-64")
    config["vision_cfg"]["ls_init_value"] = 0.5
    torch.manual_seed(0)
    model = clipforge.create_model(config).eval()
    model.config = config  # as clipforge.load sets it: the export records it
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.ls_1.gamma.uniform_(-1, 1)
    assert onnx_feature_differences(model, tmp_path / "onnx", torch.randn(3, 3, 64, 64)) <= 1e-4


def test_vit_m_16_alt_starts_its_layer_scales_at_open_clips_initial_value():
    """(Its parameters are open_clip's by name and shape: tests/test_parity.py checks the whole zoo.)"""
    model = clipforge.create_model("ViT-M-16-alt", vision_cfg={"layers": 1}, text_cfg={"layers": 1})
    gamma = model.visual.transformer.resblocks[0].ls_2.gamma
    assert gamma.shape == (512,) and (gamma == 1e-4).all() and not hasattr(model.text.transformer.resblocks[0].ls_1,
                                                                            "gamma")


def test_metaclip_2_exports_to_transformers_and_its_folders_and_hub_repos_load(tmp_path, monkeypatch):
    """MetaCLIP 2 worldwide as transformers' MetaClip2Model (CLIP's keys, pooled at the first ``eos_token_id``): an
    export transformers runs with open_clip's features, and that folder, and the same files as a hub repo, load
    back into clipforge with them and its tokenizer."""
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    from clipforge.convert import convert

    folder = tmp_path / "theirs"
    theirs = _open_clip_folder(open_clip, folder, _tiny_cfg("worldwide", make_xlmr_folder(folder)))
    convert(str(folder), str(tmp_path / "hf"), to="hf")
    hf = transformers.MetaClip2Model.from_pretrained(tmp_path / "hf").eval()
    model, _, tokenizer = clipforge.load(str(tmp_path / "hf"))
    ids, images = tokenizer(TEXTS), torch.randn(2, 3, 32, 32)
    assert torch.equal(ids, open_clip.get_tokenizer("local-dir:" + str(folder))(TEXTS))
    with torch.no_grad():
        expected_image, expected_text = theirs.encode_image(images), theirs.encode_text(ids)
        assert _max_diff(hf.get_image_features(pixel_values=images).pooler_output, expected_image) <= 1e-5
        assert _max_diff(hf.get_text_features(input_ids=ids).pooler_output, expected_text) <= 1e-5
        assert _max_diff(model.encode_image(images), expected_image) <= 1e-5
        assert _max_diff(model.encode_text(ids), expected_text) <= 1e-5
    _loads_from_a_hub_repo(tmp_path / "hf", ids, expected_image, expected_text, images, monkeypatch)


def _loads_from_a_hub_repo(folder, ids, expected_image, expected_text, images, monkeypatch):
    """hf-hub:OWNER/NAME for a MetaClip2Model repo (facebook/metaclip-2-worldwide-*), served locally: weights,
    image processor and tokenizer files; all cached, so it loads and tokenizes again offline."""
    from conftest import hub_server

    srv = hub_server(monkeypatch, folder.parent / "cache", "owner/mc2",
                     {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    try:
        model, _, tokenizer = clipforge.load("hf-hub:owner/mc2")
        assert torch.equal(tokenizer(TEXTS), ids)
    finally:
        srv.close()
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    again, _, tokenizer = clipforge.load("hf-hub:owner/mc2")
    assert torch.equal(tokenizer(TEXTS), ids)
    with torch.no_grad():
        for m in (model, again):
            assert _max_diff(m.encode_image(images), expected_image) <= 1e-5
            assert _max_diff(m.encode_text(ids), expected_text) <= 1e-5


def test_eos_pooling_skips_padding_on_cpu_with_the_padded_features():
    """MetaCLIP 2's text tower pools at the first end-of-text token (id 2 here, not the largest): the CPU path that
    runs each group of rows only up to its longest pooled position gives the padded computation's features."""
    model = clipforge.create_model("ViT-Tiny-64", text_cfg={"pool": "eos", "eos_id": 2}).eval()
    torch.manual_seed(1)
    tokens = torch.randint(3, model.text.vocab_size, (40, model.context_length))
    ends = torch.randint(2, model.context_length, (40,))
    tokens[torch.arange(40), ends] = 2
    tokens[torch.arange(model.context_length) > ends[:, None]] = 1  # XLM-R's padding id
    with torch.no_grad():
        assert _max_diff(model.text.features(tokens), model.text.features_padded(tokens)) <= 1e-5
        as_eot = clipforge.create_model("ViT-Tiny-64").eval()
        as_eot.load_state_dict(model.state_dict())
        assert _max_diff(as_eot.encode_text(tokens), model.encode_text(tokens)) > 1e-3  # argmax would pool elsewhere
    with pytest.raises(ValueError, match="eos_id"):
        clipforge.create_model("ViT-Tiny-64", text_cfg={"pool": "eos"})


def test_zoo_configs_of_open_clips_own_towers_are_open_clips():
    """Every zoo architecture that open_clip also builds from its own towers (not timm's) is open_clip's config,
    translated (CLIPA's and MetaCLIP 2's settings) and translated back to the same."""
    open_clip = pytest.importorskip("open_clip")
    from pathlib import Path

    from clipforge.checkpoint.openai import config_from_open_clip, config_to_open_clip
    from clipforge.models import get_model_config

    folder = Path(open_clip.__file__).parent / "model_configs"
    checked = []
    for name in clipforge.list_models():
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        theirs = json.loads(path.read_text())
        if theirs["vision_cfg"].get("timm_model_name"):
            continue
        theirs["vision_cfg"] = {k: v for k, v in theirs["vision_cfg"].items() if v is not None}  # ResNets' patch_size
        ours = get_model_config(name)
        assert config_from_open_clip(theirs, name) == ours, name
        assert config_to_open_clip(ours) == theirs, name
        checked.append(name)
    for name in ("ViT-L-14-CLIPA", "ViT-bigG-14-CLIPA-336", "ViT-H-14-worldwide", "ViT-S-16", "ViT-e-14", "RN50",
                 "ViT-M-16-alt"):
        assert name in checked


def test_named_clipa_and_worldwide_tags_and_their_preprocessing():
    from clipforge.pretrained import get_pretrained, list_pretrained

    assert ("ViT-H-14-CLIPA-336", "laion2b") in list_pretrained()
    assert get_pretrained("ViT-H-14-worldwide-quickgelu", "metaclip2_worldwide").quick_gelu
    model = clipforge.create_model("ViT-L-14-CLIPA", vision_cfg={"layers": 1}, text_cfg={"layers": 1})
    assert isinstance(model.visual.ln_pre, torch.nn.Identity) and model.visual.pool == "avg"
    tokenizer = clipforge.get_tokenizer("ViT-L-14-CLIPA")
    assert (tokenizer.source, tokenizer.context_length, tokenizer.strip_sep_token, tokenizer.clean_mode) == \
        ("bert-base-uncased", 32, True, "whitespace")  # open_clip's HFTokenizer defaults


def test_a_bert_tokenizer_that_names_no_special_tokens_pads_as_transformers_does(tmp_path):
    """bert-base-uncased's tokenizer_config.json names no class and no special tokens (transformers takes BERT's
    defaults from the model's config.json): the compiled path finds [PAD] and [SEP] among the tokenizer's own special
    tokens, and ids equal open_clip's on the full folder."""
    open_clip = pytest.importorskip("open_clip")
    from clipforge.hub_tokenizer import HubTokenizer

    import shutil

    make_bert_folder(tmp_path / "full")
    (tmp_path / "bare").mkdir()
    shutil.copyfile(tmp_path / "full" / "tokenizer.json", tmp_path / "bare" / "tokenizer.json")
    (tmp_path / "bare" / "tokenizer_config.json").write_text('{"do_lower_case": true, "model_max_length": 512}')
    theirs = open_clip.tokenizer.HFTokenizer(str(tmp_path / "full"), context_length=16, strip_sep_token=True)
    ours = HubTokenizer(tmp_path / "bare", 16, strip_sep_token=True)
    assert torch.equal(ours(TEXTS), theirs(TEXTS))
    assert ours._fast is not None  # not via transformers


def test_bare_clipa_and_worldwide_state_dicts_take_the_settings_of_the_zoo_architecture_with_their_shapes():
    """A state dict alone (no config, no name) does not show CLIPA's pooling or MetaCLIP 2's end-of-text id, nor their
    tokenizers: they come from the zoo architecture with its shapes (CLIPA's also lacks ln_pre's weights)."""
    from clipforge.checkpoint.infer import infer_config
    from clipforge.models import get_model_config

    for name in ("ViT-L-14-CLIPA", "ViT-H-14-worldwide", "ViT-B-32", "ViT-M-16-alt", "ViT-M-16"):
        zoo = get_model_config(name)
        with torch.device("meta"):  # shapes only: no memory for the weights
            inferred = infer_config(clipforge.create_model(name).state_dict())
        for tower in ("vision_cfg", "text_cfg"):
            assert {k: inferred[tower].get(k) for k in zoo[tower]} == zoo[tower], (name, tower)
        assert ("pool" in inferred["vision_cfg"]) == (name == "ViT-L-14-CLIPA")


@pytest.mark.parametrize("kind", ["clipa", "worldwide"])
def test_clipa_and_worldwide_export_to_onnx_with_eager_features(kind, tmp_path):
    """The mean-pooled image tower and the end-of-text-id pooling run in exported graphs as in eager PyTorch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from clipforge.checkpoint.openai import config_from_open_clip
    from conftest import onnx_feature_differences

    config = config_from_open_clip(_tiny_cfg(kind, 150), kind)
    torch.manual_seed(0)
    model = clipforge.create_model(config).eval()
    model.config = config  # as clipforge.load sets it: the export records it
    tokens = torch.randint(3, 150, (4, 16))
    tokens[:, 9:] = 1
    tokens[torch.arange(4), torch.tensor([2, 5, 8, 8])] = 2
    image, text = onnx_feature_differences(model, tmp_path / "onnx", torch.randn(3, 3, 32, 32), tokens)
    assert image <= 1e-4 and text <= 1e-4
