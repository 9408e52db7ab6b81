"""SigLIP's SentencePiece tokenizer read without ``sentencepiece`` (clipforge.spiece): ids and decoded text against
transformers' ``SiglipTokenizer`` over the real library, on models that ``sentencepiece`` trains here (Google's SigLIP
vocabularies cannot be downloaded here), and the SigLIP folders that carry only ``spiece.model``: ``clipforge.load``
against open_clip's ``HFTokenizer`` and transformers' ``SiglipModel``, and ``clipforge.transformers_api``."""
import io
import warnings

import pytest
import torch

from clipforge.bench.corpora import distinct_captions, flickr8k_captions, noisy_captions
from clipforge.spiece import CONTROL, UNKNOWN, UNUSED, BYTE, NORMAL, SiglipSentencePiece, read_model

from conftest import SHARED_DATA
from test_siglip import make_hf_siglip
from test_tokenizer import _varied_strings
from test_transformers_api import assert_tokenizer_methods_match

spm = pytest.importorskip("sentencepiece", reason="the parity tests train models with sentencepiece (.[test])")
transformers = pytest.importorskip("transformers")

DATA = SHARED_DATA if SHARED_DATA.is_dir() else None  # without it the corpora are caption-grammar sentences
# What the corpora lack: special tokens written in the text (kept whole, with the white space beside them eaten),
# their full-width spellings (which NFKC turns into "<pad>": SentencePiece never matches a control piece), a lone
# combining mark (NFKC makes it a space), "▁" itself, white space of every kind, and nothing at all.
EDGES = ["", " ", "!!!", "  a  dog ", "a </s> dog", "<unk>", "x<pad>y", "a</s>", "</s>b", "</s></s>", " </s> ",
         "!! </s> a", "\u2581</s>", "\u2581hello", "a \u2581 b", "\u2581\u2581x", "x\u2581", "a \u2581 \u2581 b",
         "\uff1cpad\uff1e", "\uff1c/s\uff1e x", "\uff1cunk\uff1e", "caf\u00e9 \u00a8 x", "end \u00a8",
         "x \u00a8\u00a8 y", "a \u0308 b", "\uff21\uff22\uff23\uff01\uff1f", "\u00df", "\u0130stanbul", "\u00a0a",
         "a\u200bb", "a\u3000b", "tab\tx", "line\nbreak", "1,000.50$", "\ufb01 ligature", "\u72ac\u304c\u8349",
         "\U0001f600 smile", "a\x00b", "\ufeffbom"]
MULTILINGUAL = ["ein Hund l\u00e4uft \u00fcber die Wiese", "un chien court dans l'herbe",
                "\u72ac\u304c\u8349\u306e\u4e0a",
                "\u0441\u043e\u0431\u0430\u043a\u0430 \u0431\u0435\u0436\u0438\u0442", "\uff46\uff55\uff4c\uff4c"]


def _train(folder, vocab_size: int, **options) -> str:
    """A Unigram SentencePiece model laid out as T5's (pad 0, end 1, unknown 2, no start token), trained on the
    captions and some other scripts; the path of its ``spiece.model``."""
    text = flickr8k_captions(DATA, 5000) + distinct_captions(DATA, 3000) + noisy_captions(DATA, 500) + MULTILINGUAL * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=0.9995, hard_vocab_limit=False, minloglevel=2, **options)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return str(folder / "spiece.model")


@pytest.fixture(scope="module", params=["nmt_nfkc", "nfkc_cf-bytes", "identity"])
def model_file(request, tmp_path_factory):
    """T5's kind (NFKC, unknown characters as <unk>), one with byte pieces for what it has never seen and NFKC with
    case folding, and one that normalises nothing (each treats a written "▁" in its own way)."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "nfkc_cf-bytes":
        return _train(folder, 600, byte_fallback=True, normalization_rule_name="nfkc_cf")
    return _train(folder, 1500 if request.param == "nmt_nfkc" else 800, normalization_rule_name=request.param)


def test_the_model_file_reads_as_sentencepiece_reads_it(model_file):
    theirs = spm.SentencePieceProcessor(model_file=model_file)
    model = read_model(model_file)
    assert len(model.pieces) == theirs.get_piece_size()
    for i, (piece, score, kind) in enumerate(model.pieces):
        expected = (CONTROL if theirs.is_control(i) else UNKNOWN if theirs.is_unknown(i) else
                    UNUSED if theirs.is_unused(i) else BYTE if theirs.is_byte(i) else NORMAL)
        assert (piece, kind) == (theirs.id_to_piece(i), expected)
        assert score == pytest.approx(theirs.get_score(i), abs=0, rel=1e-7)
    assert model.byte_fallback == ("bytes" in model_file)


def test_ids_and_text_are_siglip_tokenizers_on_natural_noisy_and_edge_text(model_file):
    """Every string, untruncated and cut to 16, with and without the end token; decoding with and without special
    tokens; for transformers' legacy and non-legacy SentencePiece settings."""
    texts = distinct_captions(DATA, 2000) + noisy_captions(DATA, 2000) + _varied_strings(500) + EDGES + MULTILINGUAL
    ours = SiglipSentencePiece(model_file)
    for legacy in (True, False):
        theirs = transformers.SiglipTokenizer(model_file, legacy=legacy)
        for length, special in ((None, True), (16, True), (None, False)):
            expected = theirs(texts, max_length=length, truncation=length is not None,
                              add_special_tokens=special).input_ids
            ours.enable_truncation(length) if length else ours.no_truncation()
            got = [e.ids for e in ours.encode_batch(texts, add_special_tokens=special)]
            differ = [texts[i] for i in range(len(texts)) if got[i] != expected[i]]
            assert not differ, (legacy, length, special, differ[:5])
        rows = theirs(texts[-300:]).input_ids + [[0, 5, 1], [5, 0, 6, 1], [2, 5], [0], [5, 3, 0, 0]]  # <pad> is 0
        for skip in (False, True):
            differ = [r for r in rows if ours.decode(r, skip) != theirs.decode(r, skip_special_tokens=skip)]
            assert not differ, [theirs.decode(r) for r in differ[:3]]


def test_what_is_not_a_siglip_sentencepiece_model_is_refused_by_name(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"\x0a\xff\xff\xff")  # a piece whose length runs past the end
    with pytest.raises(ValueError, match="junk.model: not a SentencePiece model"):
        read_model(tmp_path / "junk.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        read_model(tmp_path / "empty.model")
    text = distinct_captions(DATA, 500)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=300,
                                   model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "bpe.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="BPE model"):
        SiglipSentencePiece(tmp_path / "bpe.model")


def _spiece_folder(folder):
    """Google's SigLIP repo layout: SiglipTokenizer's files (spiece.model, tokenizer_config.json), no
    tokenizer.json."""
    transformers.SiglipTokenizer(_train(folder, 400)).save_pretrained(folder)
    assert not (folder / "tokenizer.json").exists()
    return spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")).get_piece_size()


@pytest.fixture(scope="module")
def google_siglip(tmp_path_factory):
    return make_hf_siglip(tmp_path_factory.mktemp("google-siglip"), make_tokenizer=_spiece_folder)


def test_a_google_siglip_folder_tokenizes_as_open_clip_and_transformers_without_either(google_siglip):
    """clipforge.load's tokenizer (open_clip's canonicalize cleaner, then SiglipTokenizer, padded with </s> to 64):
    open_clip's HFTokenizer's ids on the same folder, and the features of transformers' SiglipModel on its own
    processor's ids; transformers is not what runs it."""
    import clipforge

    open_clip = pytest.importorskip("open_clip")
    folder, hf = google_siglip
    model, _, tokenizer = clipforge.load(str(folder))
    texts = noisy_captions(DATA, 300) + EDGES
    ids = tokenizer(texts)
    assert tokenizer._auto is None and tokenizer._configured is None  # spiece's, not transformers'
    assert torch.equal(ids, open_clip.tokenizer.HFTokenizer(str(folder), 64, clean="canonicalize")(texts))
    plain = ["a photo of a dog", "two dogs play in the park", "a red square"]
    inputs = transformers.AutoProcessor.from_pretrained(folder)(text=plain, padding="max_length", return_tensors="pt")
    assert torch.equal(tokenizer(plain), inputs.input_ids)
    with torch.no_grad():
        theirs = hf(input_ids=inputs.input_ids, pixel_values=torch.zeros(1, 3, 32, 32)).text_embeds
        assert (model.encode_text(tokenizer(plain), normalize=True) - theirs).abs().max() <= 2e-5


def test_adding_tokens_to_a_spiece_tokenizer_is_refused_by_name(google_siglip):
    from clipforge import transformers_api as ours

    tokenizer = ours.AutoTokenizer.from_pretrained(google_siglip[0])
    with pytest.raises(TypeError, match="spiece.model"):
        tokenizer.add_tokens("<new-token>")
    assert tokenizer.added_tokens_encoder == {}


def test_transformers_api_runs_a_google_siglip_folder_as_transformers_does(google_siglip):
    from clipforge import transformers_api as ours

    folder, _ = google_siglip
    texts = ["A photo of a dog.", "two  dogs\tplay?!", "café &amp; crème", "x " * 80, ""]
    theirs_tok, our_tok = transformers.AutoTokenizer.from_pretrained(folder), ours.AutoTokenizer.from_pretrained(folder)
    assert our_tok.model_max_length == theirs_tok.model_max_length == 64
    for options in ({}, {"padding": "max_length", "truncation": True}, {"padding": True, "max_length": 12,
                                                                        "truncation": True}):
        expected, got = theirs_tok(texts, **options), our_tok(texts, **options)
        assert got["input_ids"] == expected["input_ids"], options
        assert got.get("attention_mask") == expected.get("attention_mask"), options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' "already has </s>" and long-text warnings
        assert_tokenizer_methods_match(theirs_tok, our_tok, texts + EDGES + noisy_captions(DATA, 100),
                                       unknown_as_text=False)
    row = expected["input_ids"][0]
    assert our_tok.decode(row) == theirs_tok.decode(row)
    assert our_tok.decode(row, skip_special_tokens=True) == theirs_tok.decode(row, skip_special_tokens=True)
    with torch.no_grad():
        inputs = dict(text=texts, images=[torch.zeros(3, 40, 48).numpy().transpose(1, 2, 0).astype("uint8")] * 2,
                      padding="max_length", truncation=True, return_tensors="pt")
        theirs = transformers.AutoModel.from_pretrained(folder)(**transformers.AutoProcessor.from_pretrained(folder)(
            **inputs))
        got = ours.AutoModel.from_pretrained(folder)(**ours.AutoProcessor.from_pretrained(folder)(**inputs))
    assert (got.logits_per_image - theirs.logits_per_image).abs().max() <= 1e-3


def test_a_google_siglip_hub_repo_fetches_its_sentencepiece_model_once(google_siglip, tmp_path, monkeypatch):
    """google/NAME from the hub (a local stand-in): spiece.model and its settings fetched into the cache for
    clipforge.load and for transformers_api, then offline the same ids."""
    import clipforge
    from clipforge import transformers_api

    from conftest import hub_server

    folder, _ = google_siglip
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    texts = ["a photo of a dog", "Two dogs, playing!", "caf\u00e9 \u00a8 x"]
    expected = transformers.AutoTokenizer.from_pretrained(folder)(texts, padding="max_length")["input_ids"]
    server = hub_server(monkeypatch, tmp_path / "cache", "google/siglip-tiny", files)
    try:
        _, _, tokenizer = clipforge.load("hf-hub:google/siglip-tiny")
        loaded = tokenizer(texts)
        fetched = transformers_api.AutoTokenizer.from_pretrained("google/siglip-tiny")(texts, padding="max_length")
    finally:
        server.close()
    assert fetched["input_ids"] == expected and loaded.tolist() == expected
    assert (tmp_path / "cache" / "transformers-api" / "google--siglip-tiny" / "spiece.model").is_file()
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    again = transformers_api.AutoTokenizer.from_pretrained("google/siglip-tiny")(texts, padding="max_length")
    assert again["input_ids"] == expected
