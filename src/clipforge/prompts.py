"""What the text tower is asked in zero-shot classification: prompt templates and class names.

A template is text with ``{}`` where a class name goes (``{c}``, CLIP_benchmark's spelling, is accepted and
normalised to ``{}``). Every template, from a file, a flag, a form field or the shipped sets, goes through
``parse_templates``; every class name is put in with ``fill``. The paper's class names and templates for standard
datasets (imagenet1k's 80 templates and 1000 names, cifar10, cifar100, ...) ship in ``zeroshot_prompts.json``.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable

from .files import read_user_text

DEFAULT_TEMPLATES = ("a photo of a {}.",)
_PLACEHOLDERS = ("{}", "{c}")


def parse_templates(lines: Iterable[str], source: str = "templates") -> list[str]:
    """Non-blank lines that are not ``#`` comments, each checked for a placeholder, normalised to ``{}``."""
    templates = [line.strip() for line in lines]
    templates = [t for t in templates if t and not t.startswith("#")]
    if not templates:
        raise ValueError(f"{source}: no templates")
    for template in templates:
        if not any(p in template for p in _PLACEHOLDERS):
            raise ValueError(f"{source}: template {template!r} has no '{{}}' placeholder for the class name")
    return [t.replace("{c}", "{}") for t in templates]


def load_templates(path: str | os.PathLike) -> list[str]:
    """A templates file: one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"templates file not found: {path}")
    return parse_templates(read_user_text(path, "templates").splitlines(), str(path))


def fill(template, classname: str) -> str:
    """``template`` with ``classname`` in its placeholder; a callable template (open_clip's
    ``OPENAI_IMAGENET_TEMPLATES``) is called with it."""
    if callable(template):
        return template(classname)
    return template.replace("{}", classname).replace("{c}", classname)


def prompt_texts(classnames: list[str], templates: list[str]) -> list[str]:
    """Every class with every template, class-major: ``[c0 t0, c0 t1, ..., c1 t0, ...]``."""
    return [fill(t, c) for c in classnames for t in templates]


@lru_cache(maxsize=1)
def _shipped() -> dict:
    return json.loads((resources.files("clipforge") / "zeroshot_prompts.json").read_text())


def shipped_classnames(dataset: str) -> list[str] | None:
    """The paper's class names for a standard dataset (imagenet1k, cifar10, cifar100, food101, ...), if shipped."""
    return _shipped()["classnames"].get(dataset)


def shipped_templates(dataset: str) -> list[str] | None:
    """The paper's prompt templates for a standard dataset (80 for imagenet1k, 18 for cifar10 ...), if shipped."""
    return _shipped()["templates"].get(dataset)


def list_template_sets() -> list[str]:
    return sorted(_shipped()["templates"])


def resolve_templates(spec: str | None, default: list[str] | None = None) -> list[str]:
    """The templates a ``--templates`` value names: None -> ``default`` (else "a photo of a {}."), ``none`` -> bare
    class names, an existing file, a shipped set's name, or one template written out."""
    if spec is None:
        return list(default or DEFAULT_TEMPLATES)
    if spec == "none":
        return ["{}"]
    if os.path.exists(spec):
        return load_templates(spec)
    if shipped_templates(spec):
        return shipped_templates(spec)
    if any(p in spec for p in _PLACEHOLDERS):
        return parse_templates([spec], "--templates")
    raise ValueError(f"--templates {spec!r}: not a file, a shipped set or a template with '{{}}'")
