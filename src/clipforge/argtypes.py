"""argparse value types for numbers with a range: an out-of-range value is refused by the flag's own usage error
instead of a traceback, a silent clamp or a hang much later (``-k 0``, ``--batch-size 0``, ``--port 99999``)."""
from __future__ import annotations

import argparse


def _number(kind, low, high, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not (low(value) and high(value)):
            raise argparse.ArgumentTypeError(f"{text}: expected {what}")
        return value

    return parse


_any = (lambda value: True)
positive_int = _number(int, lambda v: v >= 1, _any, "a whole number of at least 1")
non_negative_int = _number(int, lambda v: v >= 0, _any, "a whole number of at least 0")
positive_float = _number(float, lambda v: v > 0, lambda v: v < float("inf"), "a number above 0")
fraction = _number(float, lambda v: v > 0, lambda v: v <= 1, "a number above 0 and at most 1")
port = _number(int, lambda v: v >= 1, lambda v: v <= 65535, "a TCP port, 1-65535")


def or_auto(parse):
    """``parse``, or the word ``auto`` as it is (a setting chosen from the data unless given)."""
    def parse_or_auto(text: str):
        return text if text == "auto" else parse(text)

    return parse_or_auto
