"""Every command's ``--help`` renders, and its own text fits a terminal: commands whose examples need the raw
formatter (columns kept) get no wrapping from argparse, so a description written as one long string printed as one
line hundreds of characters wide."""
import argparse

from clipforge.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, name: str = "clipforge"):
    yield name, parser
    for action in parser._actions:  # argparse keeps sub-commands only here
        if isinstance(action, argparse._SubParsersAction):
            for command, child in action.choices.items():
                yield from _parsers(child, f"{name} {command}")


def test_every_commands_help_renders_and_its_description_fits_120_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    seen = []
    for name, parser in _parsers(build_parser("*")):
        text = parser.format_help()
        assert text.startswith("usage: "), name
        seen.append(name)
        if parser.formatter_class is argparse.RawDescriptionHelpFormatter and parser.description:
            too_wide = [line for line in parser.description.splitlines() if len(line) > 120]
            assert not too_wide, f"{name} --help: {too_wide[0][:60]}... is {len(too_wide[0])} characters wide"
    assert {"clipforge classify", "clipforge cache", "clipforge cache clear", "clipforge eval",
            "clipforge index", "clipforge caption train"} <= set(seen)
