"""Tokenizer ids must equal open_clip's (OpenAI's pure-Python BPE) on any text."""
import random

import pytest
import torch

import clipforge

_WORDS = ("a photo of the dog cat truck airplane red blue small large square circle triangle in on with left right "
          "running jumped isn't we'll they're I'm you've he'd it's don't").split()
_UNICODE = ["café", "naïve", "Straße", "東京タワー", "北京", "Привет мир", "مرحبا", "שלום", "🙂", "🐶🐱", "👩‍👩‍👧",
            "🇫🇷", "½", "Ⅻ", "ﬁ", "Å", "e\u0301", "\u00a0", "\u200b", "\u3000", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "☃", "™", "ß", "İstanbul"]
_ODD = ["&amp;", "&lt;b&gt;", "&amp;amp;", "&#39;", "&nbsp;", "<b>bold</b>", "'s", "'S", "''", "--", "...", "1234567",
        "3.14", "x2", "\t", "\n", "\r\n", "  ", "<start_of_text>", "<end_of_text>", "<|endoftext|>", "\\", "\"q\"",
        "mojibake: Ã©", "A’s", "\x00", "\x7f", "\ufeff"]


def _varied_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [_WORDS, _UNICODE, _ODD]
    out = ["", " ", "a", "A", "   leading and trailing   ", "UPPER CASE", "x" * 500, "word " * 200]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.4:  # caption-like ASCII
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 20)))
            if rng.random() < 0.5:
                text = text.capitalize() + rng.choice([".", "!", "?", ",", ""])
        elif kind < 0.8:  # mixtures of every pool
            text = rng.choice(["", " ", "  "]).join(
                rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 15)))
        elif kind < 0.9:  # random code points, printable or not
            text = "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x2FFF), rng.randint(0x1F300, 0x1FAFF)]))
                           for _ in range(rng.randint(1, 40)))
        else:  # over-long texts, truncated at the context length
            text = " ".join(rng.choice(_WORDS + _UNICODE) for _ in range(rng.randint(80, 300)))
        out.append(text)
    return out


def test_ids_equal_open_clip_on_5000_varied_strings():
    open_clip = pytest.importorskip("open_clip")
    texts = _varied_strings(5000)
    theirs = open_clip.tokenize(texts)
    ours = clipforge.get_tokenizer()(texts)
    assert ours.dtype == torch.long and ours.shape == (5000, 77)
    mismatched = [texts[i] for i in range(len(texts)) if not torch.equal(ours[i], theirs[i])]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]!r}"


def test_ids_equal_open_clip_at_other_context_lengths():
    open_clip = pytest.importorskip("open_clip")
    texts = _varied_strings(300, seed=1)
    for length in (16, 32, 100):
        assert torch.equal(clipforge.get_tokenizer(context_length=length)(texts),
                           open_clip.tokenize(texts, context_length=length))


def test_single_string_and_shape():
    tokens = clipforge.get_tokenizer()("a photo of a cat")
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    assert tokens[0, 0] == 49406 and 49407 in tokens[0].tolist()


def test_truncation_keeps_the_end_token():
    tokens = clipforge.get_tokenizer(context_length=8)("one two three four five six seven eight nine ten")
    assert tokens.shape == (1, 8)
    assert tokens[0, 0] == 49406 and tokens[0, -1] == 49407 and (tokens[0] != 0).all()


def test_empty_string_is_start_and_end_only():
    tokens = clipforge.get_tokenizer()("")
    assert tokens[0, :2].tolist() == [49406, 49407] and tokens[0, 2:].eq(0).all()


def test_model_name_sets_context_length():
    assert clipforge.get_tokenizer("ViT-Tiny-64")("hi").shape == (1, 32)


def test_round_trip_decode():
    tokenizer = clipforge.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("a Photo of  a dog!")).strip() == "a photo of a dog !"


def test_non_string_input_is_a_clear_error():
    with pytest.raises(TypeError, match="str"):
        clipforge.get_tokenizer()(["fine", 3])


def test_ids_equal_open_clip_on_flickr8k_human_captions_cold_and_warm():
    """Real captions (Flickr8k's 40,000), through a fresh tokenizer (the cold batch path) and a warm one."""
    from clipforge.bench.corpora import shard_captions

    from conftest import shared_data

    open_clip = pytest.importorskip("open_clip")
    captions = shard_captions(sorted(shared_data("flickr8k").glob("*/*.tar")))
    assert len(captions) == 40_000
    theirs = open_clip.tokenize(captions)
    cold = clipforge.Tokenizer()
    assert torch.equal(cold(captions), theirs)
    warm = clipforge.Tokenizer()
    warm(captions[:500])
    assert torch.equal(warm(captions[250:]), theirs[250:])


def test_ids_equal_open_clip_on_the_bench_noisy_web_corpus():
    """The bench's generated web-style corpus (emoji, entities, mojibake, control characters, long lines)."""
    from clipforge.bench.corpora import noisy_captions

    open_clip = pytest.importorskip("open_clip")
    texts = noisy_captions(None, 3000)
    assert texts == noisy_captions(None, 3000)  # deterministic: the bench's ratio is always on the same strings
    assert sum(not t.isascii() for t in texts) > 1000 and any("&amp;" in t for t in texts)
    assert any("Ã" in t or "â€" in t for t in texts)  # some mojibake, for ftfy to undo
    theirs = open_clip.tokenize(texts)
    ours = clipforge.Tokenizer()(texts)
    mismatched = [texts[i] for i in range(len(texts)) if not torch.equal(ours[i], theirs[i])]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]!r}"


def test_batches_mixing_every_path_and_overflowing_the_caches_keep_the_ids():
    """Plain text (batch path), text that ftfy/HTML cleaning turns plain ("&amp;"), and unicode text in one batch,
    in any order and with one-string calls, with caches so small that they start afresh between calls."""
    open_clip = pytest.importorskip("open_clip")
    texts = _varied_strings(600, seed=3)
    theirs = open_clip.tokenize(texts)
    tiny = clipforge.Tokenizer()
    tiny._MAX_CACHED_WORDS = 50
    assert torch.equal(torch.cat([tiny(texts[i:i + 100]) for i in range(0, 600, 100)]), theirs)
    assert len(tiny._word_ids) < 600 and len(tiny._chunk_row) < 600  # the bound was hit and honoured
    order = list(range(600))
    random.Random(0).shuffle(order)
    assert torch.equal(clipforge.Tokenizer()([texts[i] for i in order]), theirs[order])
    one = clipforge.Tokenizer()
    assert all(torch.equal(one(texts[i])[0], theirs[i]) for i in range(0, 600, 7))
    assert one.encode("Dogs &amp; cats") == one.encode("dogs & cats") == one(["dogs & cats"])[0, 1:4].tolist()


def test_whole_word_vocabulary_entries_need_no_bpe():
    """The tokenizer takes a printable-ASCII word that is itself a vocabulary entry as that one id, without BPE: true
    only if BPE of every such word ends in that entry, which this checks for all of them with the Rust BPE model."""
    tokenizer = clipforge.Tokenizer()
    words = [t[:-4] for t in tokenizer.encoder if t.endswith("</w>") and len(t) > 4 and t[:-4].isascii()
             and t[:-4].isprintable()]
    assert len(words) > 30_000
    encodings = tokenizer._bpe.encode_batch([[w] for w in words], is_pretokenized=True, add_special_tokens=False)
    wrong = [(w, e.ids) for w, e in zip(words, encodings) if e.ids != [tokenizer.encoder[w + "</w>"]]]
    assert not wrong, wrong[:10]


def test_a_few_texts_needing_the_full_clean_in_a_large_plain_batch():
    """A batch of plain captions where a few hold '&' (an HTML entity or not) or a control character: the texts are
    found by one scan of the batch, and every id still equals open_clip's."""
    open_clip = pytest.importorskip("open_clip")
    rng = random.Random(5)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    for i, odd in ((0, "Tom &amp; Jerry"), (17, "salt & pepper"), (150, "a\x07bell"), (299, "x &lt;b&gt; y &amp;")):
        texts[i] = f"{texts[i]} {odd}"
    assert torch.equal(clipforge.Tokenizer()(texts), open_clip.tokenize(texts))


def _texts_with_added_tokens(tokens: list[str], n: int, seed: int) -> list[str]:
    """Texts where the added tokens stand alone, inside words, against punctuation, in other cases, after HTML
    entities and beside non-ASCII text: every path of the tokenizer."""
    rng = random.Random(seed)
    pieces = tokens + [t.upper() for t in tokens] + ["a", "photo", "dog", "!", "(", ")", "-", "_1", "x1", "café",
                                                      "&lt;", "&amp;", "東京", "'s"]
    texts = [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))) for _ in range(n // 2)]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(n - n // 2)]
    return texts


def test_added_tokens_give_open_clips_ids():
    """open_clip's ``additional_special_tokens`` (a model config's ``tokenizer_kwargs``, or ``SimpleTokenizer``'s
    keyword): the next ids in order, found where open_clip's pattern finds them, in every path of the tokenizer; "!",
    a vocabulary piece, takes its new id wherever it comes out, as in open_clip; decoding as open_clip's."""
    open_clip = pytest.importorskip("open_clip")
    tokens = ["<cat-toy>", "sks", "<Upper>", "!", "s1"]
    theirs = open_clip.SimpleTokenizer(additional_special_tokens=tokens)
    texts = _texts_with_added_tokens(tokens, 800, seed=0) + ["a <cat-toy>", "sksdog asks", "(<cat-toy>)", "wow!!"]
    expected = theirs(texts)
    assert (expected >= 49408).any(dim=1).float().mean() > 0.5  # the tokens are found in most texts
    config = {"text_cfg": {"context_length": 77, "vocab_size": 49408 + len(tokens),
                           "tokenizer_kwargs": {"additional_special_tokens": tokens}}}
    for ours in (clipforge.SimpleTokenizer(additional_special_tokens=tokens), clipforge.get_tokenizer(config)):
        assert ours.vocab_size == 49413  # ids; "!" moved to its new one, open_clip's table holds 49412 entries
        got = ours(texts)
        mismatched = [texts[i] for i in range(len(texts)) if not torch.equal(got[i], expected[i])]
        assert not mismatched, mismatched[:3]
        assert torch.equal(ours(texts[:50]), expected[:50])  # warm, from the caches
        for text in texts[:40]:
            assert ours.encode(text) == theirs.encode(text)
            assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    assert clipforge.get_tokenizer({"text_cfg": {"context_length": 77}})("a <cat-toy>")[0, 2] != 49408


def test_split_added_tokens_give_transformers_ids(tmp_path):
    """``split_added_tokens``: the tokens transformers' ``add_tokens`` gave a CLIPTokenizer matched as it matches
    them (cut out first, whatever their case, the longest first; non-ASCII ones too), on text its cleaning and
    OpenAI's agree on."""
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    from clipforge.checkpoint.hf import save_clip_tokenizer

    save_clip_tokenizer(SimpleNamespace(config={"text_cfg": {"context_length": 77}}), tmp_path)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    tokens = ["<Cat-Toy>", "sks", "<cat-toy>_1", "toy>", "<é-tok>"]
    assert theirs.add_tokens(tokens) == len(tokens)
    ours = clipforge.Tokenizer(additional_special_tokens=tokens, split_added_tokens=True)
    texts = _texts_with_added_tokens(tokens, 800, seed=1)
    texts = [t for t in texts if "&" not in t]  # transformers leaves HTML entities as they are, OpenAI unescapes
    got = ours(texts)
    for i, ids in enumerate(theirs(texts).input_ids):
        ids = ids[:76] + ids[-1:] if len(ids) > 77 else ids  # truncated as clipforge truncates (the end kept)
        assert got[i, :len(ids)].tolist() == ids and not got[i, len(ids):].any(), texts[i]
    assert (got >= 49408).any(dim=1).float().mean() > 0.5
    assert not torch.equal(got, clipforge.Tokenizer(additional_special_tokens=tokens[:4])(texts))  # open_clip's way


def test_added_tokens_that_cannot_be_matched_are_refused_by_name():
    for tokens, match in ((["a b"], "white space"), ([""], "white space"), (["<é>"], "only ASCII"),
                          (["x", "x"], "more than once")):
        with pytest.raises(ValueError, match=match):
            clipforge.Tokenizer(additional_special_tokens=tokens)
    with pytest.raises(ValueError, match="alike but for case"):
        clipforge.Tokenizer(additional_special_tokens=["<A>", "<a>"], split_added_tokens=True)
    with pytest.raises(TypeError, match="not one string"):
        clipforge.SimpleTokenizer(additional_special_tokens="<cat-toy>")
    with pytest.raises(ValueError, match="49408 token embeddings"):  # a config naming tokens it has no rows for
        clipforge.get_tokenizer({"text_cfg": {"vocab_size": 49408,
                                              "tokenizer_kwargs": {"additional_special_tokens": ["<x>"]}}})
    # tokens the caller adds to a model whose rows it is about to grow, as with open_clip's get_tokenizer
    assert clipforge.get_tokenizer("ViT-B-32", additional_special_tokens=["<x>"])("a <x>")[0, 2] == 49408
