"""textfix.fix_text must return exactly what ftfy.fix_text returns, on any string."""
import random

import ftfy
from ftfy import badness, chardata

from clipforge import textfix
from clipforge.bench.corpora import noisy_captions

# Characters each fixer acts on, the mojibake heuristic's characters, and the ones that steer ftfy's control flow
# ("\n" segments, "<" turns HTML unescaping off, "&" starts entities).
_POOL = (list("abcxyzABC .,!?;#'\"")
         + ["\n", "\r", "\r\n", "<", "&", "&amp;", "&lt;", "&eacute;", "&EACUTE;", "\x1b[31m"]
         + sorted({c for c in badness.BADNESS_RE.pattern if not c.isascii()})
         + [chr(c) for c in range(0x80, 0x250)] + [chr(c) for c in range(0x370, 0x460)]
         + list(map(chr, chardata.LIGATURES)) + [chr(c) for c in list(chardata.WIDTH_MAP)[:40]]
         + [chr(c) for c in list(chardata.CONTROL_CHARS)[:40]]
         + ["\u2018", "\u201c", "\u201d", "\u02bc", "\u2028", "\u2029", "\ud83d", "\ude00", "\ud83d\ude00", "😀",
            "東京", "e\u0301", "\ufeff", "\u200b", "Ã©", "â€™", "Ã\xa0", "ГўВЂВ", "вЂ"])


def _fuzz(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_POOL) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_the_fast_path_is_active_for_the_installed_ftfy():
    """Otherwise fix_text is plain ftfy: still correct, but the tokenizer's noisy-text figure silently drops."""
    assert textfix.GUARDED, f"ftfy {ftfy.__version__}: BADNESS_RE changed; recheck textfix's window argument"


def test_windowed_mojibake_test_equals_ftfys():
    texts = _fuzz(20_000, seed=0) + noisy_captions(None, 1000)
    assert sum(map(badness.is_bad, texts)) > 1000  # the fuzz reaches the heuristic's positive side often
    mismatched = [t for t in texts if textfix.is_bad(t) != badness.is_bad(t)]
    assert not mismatched, mismatched[:3]


def test_fix_text_equals_ftfy_on_fuzz_and_web_text():
    texts = _fuzz(4_000, seed=1) + noisy_captions(None, 1000) + [
        "", "\n", "\n\n", "a<b\n&amp;", "&amp;\na<b", "&amp;\n<\n&lt;", "caf\u00c3\u00a9\r\nna\u00c3\u00afve",
        "x" * 3000 + "Ã©", "ﬁne ｆｕｌｌ “quoted” \x1b[31mred\x1b[0m \x00\x07 \ud800"]
    changed = sum(ftfy.fix_text(t) != t for t in texts)
    assert changed > 1000  # most strings exercise some fixer
    mismatched = [t for t in texts if textfix.fix_text(t) != ftfy.fix_text(t)]
    assert not mismatched, [ascii(t) for t in mismatched[:3]]
