"""``ftfy.fix_text`` with the same output, skipping the work that cannot change a string.

ftfy runs a dozen fixers over every line, then all of them again whenever one changed something. On web-style text
most of its time goes to two kinds of step that almost never apply: the mojibake test (``badness.is_bad``: a
35-branch regex tried at every position) and three ``str.translate`` calls through Python dicts (ligatures, full
width, control characters). Here each of those runs only where it could match:

- a translate step only when the string holds one of its table's keys (one C-speed character-class search);
- the mojibake test only in small windows around the characters its regex needs: every branch of ``BADNESS_RE``
  contains at least one character from ``MOJIBAKE_CATEGORIES`` or a non-ASCII literal, and no match is longer
  than 7 characters, so ``is_bad(text)`` is true exactly when some window of +-7 characters around such a
  character matches. When it is false, ``fix_encoding`` is the identity and is skipped; when true, ftfy's own
  ``fix_encoding`` runs.

Everything else (segmenting at newlines, the "auto" HTML rule, the order of fixers, the repeat-until-stable loop,
NFC) is ftfy's control flow, calling ftfy's own fixers. That control flow and the facts about the regex were checked
on the ftfy release in ``_CHECKED_RELEASE``; on any other release (or if its ``BADNESS_RE`` differs) ``fix_text`` is
plain ``ftfy.fix_text``: slower, never different.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import ftfy
from ftfy import badness, chardata, fixes

_CHECKED_RELEASE = "6.3.1"
_CHECKED_BADNESS = "9dcc0f2ac90d9ae3c85eb7b9b2c0b8a8e8126153847c2b30c91a0bb263f3b8c4"  # sha256 of its BADNESS_RE
_SEGMENT_LIMIT = ftfy.TextFixerConfig().max_decode_length
_LONGEST_BADNESS_MATCH = 7  # "ГўВЂВ.[A-Za-z ]"


def _class_of(code_points) -> str:
    """Character-class contents for a set of code points, consecutive runs written as ranges."""
    points, parts = sorted(code_points), []
    while points:
        first = last = points.pop(0)
        while points and points[0] == last + 1:
            last = points.pop(0)
        parts.append(re.escape(chr(first)) + ("-" + re.escape(chr(last)) if last > first else ""))
    return "".join(parts)


def _any_of(code_points) -> re.Pattern:
    return re.compile("[" + _class_of(code_points) + "]")


_MAY_BE_BAD = re.compile(
    "[" + "".join(badness.MOJIBAKE_CATEGORIES.values())
    + "".join(sorted({c for c in badness.BADNESS_RE.pattern if not c.isascii()})) + "]")
_LIGATURE = _any_of(chardata.LIGATURES)
_WIDE = _any_of(chardata.WIDTH_MAP)
_CONTROL = _any_of(chardata.CONTROL_CHARS)
# Any character some fixer other than the mojibake one acts on: "&" (HTML entities), ESC (terminal escapes), the
# line breaks fix_line_breaks replaces, and the classes and tables of the rest. Without one, and with no mojibake
# and NFC text, a whole pass of fixers is the identity.
_ANY_FIXABLE = re.compile("[" + "".join(p.pattern[1:-1] for p in (chardata.C1_CONTROL_RE, chardata.SINGLE_QUOTE_RE,
                                                                   chardata.DOUBLE_QUOTE_RE, fixes.SURROGATE_RE))
                          + _class_of({*chardata.LIGATURES, *chardata.WIDTH_MAP, *chardata.CONTROL_CHARS,
                                       *map(ord, "&\x1b\r\u2028\u2029\x85")}) + "]")


def is_bad(text: str) -> bool:
    """``ftfy.badness.is_bad``, searching only around the characters a match must contain."""
    search = badness.BADNESS_RE.search
    start = end = -1
    for hit in _MAY_BE_BAD.finditer(text):
        position = hit.start()
        if position - _LONGEST_BADNESS_MATCH > end:  # a new window: search the one before it
            if end >= 0 and search(text, start, end):
                return True
            start = max(position - _LONGEST_BADNESS_MATCH, 0)
        end = position + _LONGEST_BADNESS_MATCH + 1
    return end >= 0 and search(text, start, end) is not None


def _fix_segment(text: str, unescape: bool) -> str:
    """``ftfy.fix_and_explain`` with the default config (explain off), the guards above in front of its steps."""
    while True:
        if (not _ANY_FIXABLE.search(text) and (text.isascii() or not is_bad(text))
                and unicodedata.is_normalized("NFC", text)):
            return text
        original = text
        if unescape:
            text = fixes.unescape_html(text)
        if not text.isascii() and is_bad(text):
            text = ftfy.fix_encoding(text)
        text = fixes.fix_c1_controls(text)
        if _LIGATURE.search(text):
            text = fixes.fix_latin_ligatures(text)
        if _WIDE.search(text):
            text = fixes.fix_character_width(text)
        text = fixes.uncurl_quotes(text)
        text = fixes.fix_line_breaks(text)
        text = fixes.fix_surrogates(text)
        text = fixes.remove_terminal_escapes(text)
        if _CONTROL.search(text):
            text = fixes.remove_control_chars(text)
        text = unicodedata.normalize("NFC", text)
        if text == original:
            return text


def _guarded_fix_text(text: str) -> str:
    """ftfy.fix_text's segment loop: lines (at most ``max_decode_length`` each), and once a segment holds '<' the
    "auto" HTML unescaping is off for it and every later segment."""
    unescape = True
    out = []
    position = 0
    while position < len(text):
        end = text.find("\n", position) + 1 or len(text)
        end = min(end, position + _SEGMENT_LIMIT)
        segment = text[position:end]
        unescape = unescape and "<" not in segment
        out.append(_fix_segment(segment, unescape))
        position = end
    return "".join(out)


GUARDED = (ftfy.__version__ == _CHECKED_RELEASE
           and hashlib.sha256(badness.BADNESS_RE.pattern.encode()).hexdigest() == _CHECKED_BADNESS)
fix_text = _guarded_fix_text if GUARDED else ftfy.fix_text
