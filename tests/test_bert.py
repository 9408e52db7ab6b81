"""The BERT text tower and WordPiece tokenizer built without transformers (models/bert.py, hf_text's ``_WordPiece``):
transformers' ids and features exactly, its checkpoints both ways, and what it does not cover left to transformers."""
import subprocess
import sys

import pytest
import torch

from clipforge.models import bert
from clipforge.models.hf_text import HFTextEncoder, HFTokenizer, resolve_hf_model

from test_tokenizer import _varied_strings
from test_train import _minilm_or_skip


def _tiny_bert_folder(transformers, folder, **overrides):
    """A randomly initialised BertForMaskedLM (its encoder under ``bert.``, beside an MLM head) saved as
    transformers saves it, with the MiniLM tokenizer's files."""
    import shutil

    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, **overrides)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{resolve_hf_model('all-minilm-l6-v2')}/{name}", folder / name)
    return folder


def test_the_minilm_tower_gives_transformers_features_exactly_padded_or_not():
    _minilm_or_skip()
    from transformers import AutoModel

    ours = HFTextEncoder("all-minilm-l6-v2", 64).eval()
    assert isinstance(ours.transformer, bert.Bert)
    theirs = AutoModel.from_pretrained(resolve_hf_model("all-minilm-l6-v2"), add_pooling_layer=False).eval()
    assert ours.transformer.state_dict().keys() == theirs.state_dict().keys() - {"embeddings.position_ids",
                                                                                  "embeddings.token_type_ids"}
    tokens = HFTokenizer("all-minilm-l6-v2", 40)(["a dog runs on the grass", "", "two girls in a fountain " * 20])
    mask = tokens.ne(0)
    with torch.no_grad():
        for ids, keep in ((tokens, mask), (tokens[2:], mask[2:])):  # padded rows; a full row (no mask at all)
            a = ours.transformer(input_ids=ids, attention_mask=keep.long()).last_hidden_state
            b = theirs(input_ids=ids, attention_mask=keep.long()).last_hidden_state
            # bit-identical with transformers 5.25 (benchmarks/bert_tower.py); rounding room for other releases
            torch.testing.assert_close(a[keep], b[keep], atol=1e-6, rtol=0)
        assert bool(mask[2].all())


def test_a_bert_saved_by_transformers_loads_with_its_pooler_and_a_tower_of_ours_loads_into_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _minilm_or_skip()
    folder = _tiny_bert_folder(transformers, tmp_path / "bert")
    ours = bert.Bert.from_pretrained(folder, pooler=True).eval()  # the encoder under bert., the MLM head left out
    theirs = transformers.BertModel.from_pretrained(folder).eval()  # with a (new, random) pooler: ours gets its
    ours.pooler.load_state_dict(theirs.pooler.state_dict())
    tokens = torch.randint(1000, 2000, (3, 12))
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0
    with torch.no_grad():
        a, b = ours(tokens, mask), theirs(input_ids=tokens, attention_mask=mask)
        keep = mask.bool()
        torch.testing.assert_close(a.last_hidden_state[keep], b.last_hidden_state[keep], atol=1e-6, rtol=0)
        torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-6, rtol=0)
        loaded = transformers.BertModel(theirs.config).eval()
        assert not loaded.load_state_dict(ours.state_dict(), strict=False).unexpected_keys
        torch.testing.assert_close(loaded(input_ids=tokens, attention_mask=mask).pooler_output, a.pooler_output,
                                   atol=1e-6, rtol=0)
    from safetensors.torch import load_file  # an older folder: pytorch_model.bin alone, read without unpickling code

    older = tmp_path / "older"
    older.mkdir()
    (older / "config.json").write_text((folder / "config.json").read_text())
    torch.save(load_file(folder / "model.safetensors"), older / "pytorch_model.bin")
    assert bert.supports(bert.read_config(older), older)
    with torch.no_grad():
        assert torch.equal(bert.Bert.from_pretrained(older).eval()(tokens, mask).last_hidden_state,
                           bert.Bert.from_pretrained(folder).eval()(tokens, mask).last_hidden_state)
    (older / "pytorch_model.bin").unlink()
    assert not bert.supports(bert.read_config(older), older)  # no weights to read: transformers says what is wrong
    deeper = bert.Bert(bert.read_config(folder) | {"num_hidden_layers": 3})
    with pytest.raises(ValueError, match="lack 16 of this BERT's parameters, e.g. encoder.layer.2"):
        bert._pretrained_state(folder, deeper)


def test_what_this_bert_does_not_cover_is_built_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _minilm_or_skip()
    relative = _tiny_bert_folder(transformers, tmp_path / "relative", position_embedding_type="relative_key")
    tower = HFTextEncoder(str(relative), 16)
    assert isinstance(tower.transformer, transformers.BertModel)
    plain = _tiny_bert_folder(transformers, tmp_path / "plain")
    assert isinstance(HFTextEncoder(str(plain), 16).transformer, bert.Bert)
    assert isinstance(HFTextEncoder(str(plain), 16, pretrained=False).transformer, bert.Bert)
    assert not bert.supports({"model_type": "roberta"}) and not bert.supports({"model_type": "bert", "is_decoder": True})
    assert not bert.supports({"model_type": "bert", "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="build it with transformers"):
        bert.Bert(bert.read_config(relative))


def test_the_wordpiece_tokenizer_gives_transformers_ids_on_varied_and_noisy_text_at_any_length():
    _minilm_or_skip()
    from transformers import AutoTokenizer

    from clipforge.bench.corpora import noisy_captions

    auto = AutoTokenizer.from_pretrained(resolve_hf_model("all-minilm-l6-v2"))
    ours = HFTokenizer("all-minilm-l6-v2", 77)
    texts = _varied_strings(5000) + noisy_captions(None, 2000)
    assert type(ours._load()).__name__ == "_WordPiece"
    for length in (77, 16, 128):
        theirs = auto(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        mine = ours(texts, context_length=length)
        differ = [texts[i] for i in range(len(texts)) if not torch.equal(mine[i], theirs["input_ids"][i])]
        assert not differ, f"{len(differ)} texts differ at {length} tokens, e.g. {differ[:3]!r}"
    assert ours([]).shape == (0, 77)
    assert ours("one").shape == (1, 77)


def test_a_tokenizer_config_its_tokenizer_json_disagrees_with_goes_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _minilm_or_skip()
    import json

    folder = _tiny_bert_folder(transformers, tmp_path / "cased")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    tokenizer = HFTokenizer(str(folder), 12)
    ids = tokenizer(["A Dog"])
    assert type(tokenizer._load()).__name__ != "_WordPiece"  # transformers rebuilds the normaliser: cased
    assert torch.equal(ids, transformers.AutoTokenizer.from_pretrained(folder)(
        ["A Dog"], padding="max_length", truncation=True, max_length=12, return_tensors="pt")["input_ids"])


def test_a_minilm_model_builds_tokenizes_and_embeds_without_importing_transformers():
    _minilm_or_skip()
    code = ("import sys, torch, clipforge\n"
            "model = clipforge.create_model('ViT-Tiny-64-MiniLM').eval()\n"
            "tokens = clipforge.get_tokenizer('ViT-Tiny-64-MiniLM')(['a dog on the grass', 'a red car'])\n"
            "features = model.encode_text(tokens, normalize=True)\n"
            "assert features.shape == (2, model.embed_dim) and torch.isfinite(features).all()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
