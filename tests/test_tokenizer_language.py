"""NLLB-CLIP's source language (``tokenizer.set_language``, ``get_tokenizer(language=)``, ``--language``) and
open_clip's other ``get_tokenizer`` keywords. The reference for the language is transformers' own NLLB tokenizer
with ``src_lang`` set, which puts the language's code first, as NLLB-CLIP was trained to read (open_clip's
``set_language`` calls ``set_src_lang_special_tokens``, which the tokenizer's ``__call__`` resets, so its ids keep
English's code)."""
import pickle
import warnings

import pytest
import torch

import clipforge
from clipforge.hub_tokenizer import LanguageIgnoredWarning

CORPUS = ["a photo of a dog", "une photo d'un chien", "ein Foto eines Hundes", "a cat on a mat", "un chat noir"] * 20
TEXTS = ["une photo d'un chien", "un chat noir"]


@pytest.fixture(scope="module")
def nllb_folder(tmp_path_factory):
    """A small NLLB tokenizer (BPE pieces trained here; NLLB's 202 language codes as its special tokens), saved as
    transformers saves facebook/nllb-200's."""
    transformers = pytest.importorskip("transformers")
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "<pad>", "</s>",
                                                                                       "<unk>"]))
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    folder = tmp_path_factory.mktemp("nllb")
    transformers.NllbTokenizer(vocab=trained["vocab"], merges=merges).save_pretrained(folder)
    return folder


def _reference(folder, language, texts=TEXTS, length=12):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), src_lang=language)
    return tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids


def test_set_language_starts_each_text_with_the_languages_code(nllb_folder):
    config = {"text_cfg": {"hf_model_name": str(nllb_folder), "hf_tokenizer_name": str(nllb_folder),
                           "context_length": 12}}
    tokenizer = clipforge.get_tokenizer(config)
    english = tokenizer(TEXTS)
    assert torch.equal(english, _reference(nllb_folder, "eng_Latn"))  # the default, open_clip's ids
    open_clip = pytest.importorskip("open_clip")
    assert torch.equal(english, open_clip.tokenizer.HFTokenizer(str(nllb_folder), context_length=12)(TEXTS))

    tokenizer.set_language("fra_Latn")
    french = tokenizer(TEXTS)
    assert torch.equal(french, _reference(nllb_folder, "fra_Latn")) and not torch.equal(french, english)
    assert torch.equal(french[:, 1:], english[:, 1:])  # only the code differs
    assert torch.equal(pickle.loads(pickle.dumps(tokenizer))(TEXTS), french)  # DataLoader workers keep it

    german = clipforge.get_tokenizer(config, language="deu_Latn")  # open_clip's keyword, applied on first use
    assert torch.equal(german(TEXTS), _reference(nllb_folder, "deu_Latn"))
    # a Hugging Face text tower without separate tokenizer files (transformers' own tokenizer) takes it too
    tower = clipforge.get_tokenizer({"text_cfg": {"hf_model_name": str(nllb_folder), "context_length": 12}},
                                    language="fra_Latn")
    assert torch.equal(tower(TEXTS), french)
    assert torch.equal(pickle.loads(pickle.dumps(tower))(TEXTS), french)

    with pytest.raises(ValueError, match="'fra_latn' is not one of this tokenizer's 202 language codes; the "
                                         "closest: fra_Latn"):
        tokenizer.set_language("fra_latn")


def test_a_language_for_a_tokenizer_without_languages_warns_in_python_and_is_an_error_on_the_command_line(tmp_path,
                                                                                                         capsys):
    from test_open_clip_variants import make_xlmr_folder

    make_xlmr_folder(tmp_path / "xlmr")  # XLM-R's tokenizer: no source languages
    tokenizer = clipforge.get_tokenizer({"text_cfg": {"hf_tokenizer_name": str(tmp_path / "xlmr")}})
    before = tokenizer(TEXTS)
    with pytest.warns(LanguageIgnoredWarning, match="no source languages: language 'fra_Latn' changes nothing"):
        tokenizer.set_language("fra_Latn")  # open_clip warns and goes on: a multilingual script runs unchanged
    assert torch.equal(tokenizer(TEXTS), before)

    from clipforge.cli import main

    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["classify", str(image), "--labels", "un chien,un chat", "--model", "ViT-Tiny-64",
                     "--language", "fra_Latn"])
    assert code == 2  # the CLIP BPE tokenizer has no languages: the flag would do nothing
    assert "--language fra_Latn: this model's tokenizer has no source languages" in capsys.readouterr().err


def test_language_through_load_for_inference(nllb_folder, tmp_path):
    """What `clipforge classify / eval / search / serve --language` do: the loaded model's tokenizer marks it."""
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    from conftest import write_open_clip_folder

    from clipforge.inference import load_for_inference

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(nllb_folder))
    config = transformers.M2M100Config(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_position_embeddings=40, pad_token_id=1,
                                       bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    text_folder = tmp_path / "text"
    transformers.M2M100Model(config).save_pretrained(text_folder)
    tokenizer.save_pretrained(text_folder)
    model_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                 "text_cfg": {"hf_model_name": str(text_folder), "hf_tokenizer_name": str(text_folder),
                              "hf_pooler_type": "cls_pooler", "hf_proj_type": "linear", "context_length": 12}}
    torch.manual_seed(0)
    folder = write_open_clip_folder(tmp_path / "nllb-clip", open_clip.model.CustomTextCLIP(**model_cfg), model_cfg)
    model, _, tokenizer = load_for_inference(pretrained="local-dir:" + str(folder), device="cpu",
                                             language="zho_Hans")
    ids = tokenizer(TEXTS)
    assert torch.equal(ids, _reference(nllb_folder, "zho_Hans"))
    with torch.no_grad():  # and the language changes the text features, as the first token does
        english = clipforge.get_tokenizer(model.config)(TEXTS)
        assert (model.encode_text(ids) - model.encode_text(english)).abs().max() > 1e-4


def test_open_clip_tokenizer_keywords_are_taken_or_refused_by_name():
    siglip = clipforge.get_tokenizer("ViT-B-16-SigLIP", clean="lower")  # over its config's "canonicalize"
    assert siglip.clean_mode == "lower" and clipforge.get_tokenizer("ViT-B-16-SigLIP").clean_mode == "canonicalize"
    assert clipforge.get_tokenizer("ViT-B-32", clean="lower")("a dog").shape == (1, 77)  # OpenAI's, its default
    with pytest.raises(ValueError, match="clean='whitespace': the CLIP BPE tokenizer cleans as OpenAI's"):
        clipforge.get_tokenizer("ViT-B-32", clean="whitespace")
    with pytest.raises(TypeError, match="reduction_mask: not a setting of the CLIP BPE tokenizer"):
        clipforge.get_tokenizer("ViT-B-32", reduction_mask="simple")
    with pytest.raises(TypeError, match="tokenizer_mode: not a setting of a tokenizer from files, which takes clean, "
                                        "strip_sep_token, language"):
        clipforge.get_tokenizer("ViT-B-16-SigLIP", tokenizer_mode="clips")
    with pytest.raises(ValueError, match="unknown text cleaner 'upper'"):
        clipforge.get_tokenizer("ViT-B-16-SigLIP", clean="upper")
