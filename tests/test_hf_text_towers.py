"""open_clip's Hugging Face text towers (roberta-, xlm-roberta-, mt5- and nllb-clip models): an open_clip model folder
of each kind loads with open_clip's features and ids. Small random transformers of each kind (XLM-R with mean pooling
and an MLP projection, mT5's encoder, NLLB's M2M100 encoder pooled at its first token with a linear projection),
all on one XLM-R-style vocabulary trained here, since none can be downloaded."""

import pytest
import torch

import clipforge

from conftest import write_open_clip_folder
from test_open_clip_variants import TEXTS, _max_diff, make_xlmr_folder

KINDS = {
    "xlm-roberta": ("mean_pooler", "mlp"),
    "roberta-cls-pooler": ("cls_pooler", "linear"),
    "mt5": ("mean_pooler", "mlp"),
    "m2m_100": ("cls_pooler", "linear"),
}


def _hf_model(transformers, kind, vocab):
    small = dict(vocab_size=vocab, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if kind in ("xlm-roberta", "roberta-cls-pooler"):
        config_class = transformers.XLMRobertaConfig if kind == "xlm-roberta" else transformers.RobertaConfig
        config = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=80, **small)
        return transformers.AutoModel.from_config(config)
    if kind == "mt5":
        config = transformers.MT5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                        decoder_start_token_id=1, **small)
        return transformers.MT5Model(config)
    config = transformers.M2M100Config(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                       max_position_embeddings=80, decoder_start_token_id=2, **small)
    return transformers.M2M100Model(config)


@pytest.mark.parametrize("kind", list(KINDS))
def test_open_clip_hf_text_tower_folders_load_with_identical_features_and_tokens(kind, tmp_path):
    """An open_clip folder of each kind loads with open_clip's features and ids; `convert --to open_clip` writes one
    back that open_clip builds the same model from (OpenAI's and Hugging Face's layouts have no place for the tower:
    refused)."""
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    text_folder = tmp_path / "text"
    vocab = make_xlmr_folder(text_folder)
    torch.manual_seed(0)
    _hf_model(transformers, kind, vocab).save_pretrained(text_folder)
    pooler, proj = KINDS[kind]
    model_cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                 "text_cfg": {"hf_model_name": str(text_folder), "hf_tokenizer_name": str(text_folder),
                              "hf_pooler_type": pooler, "hf_proj_type": proj}}
    theirs = open_clip.model.CustomTextCLIP(**model_cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = write_open_clip_folder(tmp_path / "oc", theirs, model_cfg)

    model, _, tokenizer = clipforge.load("local-dir:" + str(folder))
    ids = tokenizer(TEXTS)
    assert torch.equal(ids, open_clip.tokenizer.HFTokenizer(str(text_folder))(TEXTS))  # what open_clip builds for it
    assert (ids == 1).any()  # padded: the mask matters
    with torch.no_grad():
        assert _max_diff(model.encode_text(ids), theirs.encode_text(ids)) <= 1e-5
        images = torch.randn(2, 3, 32, 32)
        assert _max_diff(model.encode_image(images), theirs.encode_image(images)) <= 1e-5
        # forward_intermediates (open_clip's towers have none): transformers' hidden states, encode_text's features
        out = model.forward_intermediates(text=ids, text_indices=[0, -1], normalize=False)
        states = theirs.text.transformer(input_ids=ids, attention_mask=ids.ne(1).long(),
                                         output_hidden_states=True).hidden_states
        assert [_max_diff(a, b) <= 1e-5 for a, b in zip(out["text_intermediates"], (states[1], states[-1]))] == \
            [True, True]
        assert _max_diff(out["text_features"], theirs.encode_text(ids)) <= 1e-5
    if kind == "xlm-roberta":  # what 2022's open_clip checkpoints also hold: position ids, an unused pooler head
        from clipforge.checkpoint import load_into

        old = {**model.state_dict(), "text.transformer.embeddings.position_ids": torch.arange(80)[None],
               "text.transformer.pooler.dense.weight": torch.zeros(32, 32)}
        load_into(model, old)
        with pytest.raises(clipforge.CheckpointError, match="unexpected 1 key"):
            load_into(model, {**model.state_dict(), "text.transformer.other.weight": torch.zeros(1)})
    # and back: `convert --to open_clip` writes a folder open_clip builds the same text tower from
    from clipforge.convert import convert

    back = open_clip.create_model("local-dir:" + str(convert("local-dir:" + str(folder), str(tmp_path / "back"),
                                                             to="open_clip"))).eval()
    with torch.no_grad():
        assert _max_diff(back.encode_text(ids), theirs.encode_text(ids)) <= 1e-5
        assert _max_diff(back.encode_image(images), theirs.encode_image(images)) <= 1e-5
    with pytest.raises(clipforge.CheckpointError, match="Hugging Face encoder"):
        convert("local-dir:" + str(folder), str(tmp_path / "openai.pt"), to="openai")
    with pytest.raises(clipforge.CheckpointError, match="Hugging Face encoder"):  # was a KeyError
        convert("local-dir:" + str(folder), str(tmp_path / "hf"), to="hf")
    assert not (tmp_path / "hf").exists()


def test_a_hub_text_model_is_fetched_once_and_a_checkpoint_fetches_its_config_alone(tmp_path, monkeypatch):
    """hf_model_name as a hub repo: a fresh model fetches config and weights into the cache (then offline); a model
    whose checkpoint brings the weights fetches config.json alone."""
    transformers = pytest.importorskip("transformers")
    from conftest import hub_server

    from clipforge.models.hf_text import resolve_hf_model

    folder = tmp_path / "repo"
    torch.manual_seed(0)
    _hf_model(transformers, "xlm-roberta", 150).save_pretrained(folder)
    requested = []
    srv = hub_server(monkeypatch, tmp_path / "cache", "owner/text", {p.name: p.read_bytes() for p in folder.iterdir()})
    try:
        config_only = resolve_hf_model("owner/text", weights=False)
        requested.append(sorted(p.name for p in tmp_path.joinpath(config_only).iterdir() if p.is_file()))
        full = resolve_hf_model("owner/text")
    finally:
        srv.close()
    assert requested == [["config.json"]]
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    assert resolve_hf_model("owner/text") == full
    theirs = transformers.AutoModel.from_pretrained(folder)
    ours = transformers.AutoModel.from_pretrained(full)
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()))


def test_nllb_clip_siglip_an_open_clip_siglip_image_tower_beside_a_hugging_face_text_encoder(tmp_path):
    """nllb-clip-siglip's layout: timm's SigLIP image tower (attention pooling, a logit bias) with an NLLB (M2M100)
    encoder pooled at its first token: an open_clip folder loads with open_clip's features, bias and ids, and
    `convert --to open_clip` writes it back."""
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    text_folder = tmp_path / "text"
    vocab = make_xlmr_folder(text_folder)
    torch.manual_seed(0)
    _hf_model(transformers, "m2m_100", vocab).save_pretrained(text_folder)
    model_cfg = {"embed_dim": 768, "custom_text": True, "init_logit_bias": -10,
                 "vision_cfg": {"image_size": 256, "timm_model_name": "vit_base_patch32_siglip_256",
                                "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
                 "text_cfg": {"hf_model_name": str(text_folder), "hf_tokenizer_name": str(text_folder),
                              "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}}
    theirs = open_clip.model.CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"}).eval()
    folder = write_open_clip_folder(tmp_path / "oc", theirs, model_cfg)
    model, _, tokenizer = clipforge.load("local-dir:" + str(folder))
    ids = tokenizer(TEXTS)
    assert torch.equal(ids, open_clip.tokenizer.HFTokenizer(str(text_folder))(TEXTS))
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ours, expected = model(images, ids), theirs(images, ids)
        assert _max_diff(ours.image_features, expected[0]) <= 1e-5
        assert _max_diff(ours.text_features, expected[1]) <= 1e-5
        assert ours.logit_bias.item() == expected[3].item() == -10
    from clipforge.convert import convert  # and back: a folder open_clip builds the same model from

    back = open_clip.create_model("local-dir:" + str(convert("local-dir:" + str(folder), str(tmp_path / "back"),
                                                             to="open_clip"))).eval()
    with torch.no_grad():
        again = back(images, ids)
        assert _max_diff(again[0], expected[0]) <= 1e-5 and _max_diff(again[1], expected[1]) <= 1e-5


def test_a_text_model_in_hugging_faces_own_cache_is_used_from_there(tmp_path, monkeypatch):
    """A repo transformers fetched before (Hugging Face's cache) loads from there, offline, without a request."""
    from clipforge.models.hf_text import resolve_hf_model

    snapshot = tmp_path / "hf" / "models--owner--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hf" / "models--owner--cached" / "refs").mkdir()
    (tmp_path / "hf" / "models--owner--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    assert resolve_hf_model("owner/cached", weights=False) == str(snapshot)
    with pytest.raises(Exception, match="could not be fetched|offline"):  # its weights are not cached: a clear error
        resolve_hf_model("owner/cached", weights=True)
