"""`clipforge cache`: what clipforge keeps in ``$CLIPFORGE_CACHE`` (default ``~/.cache/clipforge``), kind by kind,
and clearing it. Nothing here imports torch: listing a cache is instant."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

from .argtypes import positive_float

# every kind of thing kept, by the folder it is kept in ("downloads": the files at the cache's top level)
KINDS = {
    "downloads": "pretrained weights and hub files fetched by tag or hf-hub: name, verified",
    "features": "eval's image features, per model and dataset split",
    "corruptions": "eval robustness's corrupted test images",
    "text-features": "frozen text towers' caption features (train --text-cache; each run keeps its own link)",
    "text-models": "Hugging Face text models fetched from a hub repo",
    "tokenizers": "tokenizer files fetched from a hub repo",
    "transformers-api": "a hub repo's tokenizer and processor files read by clipforge.transformers_api",
    "language-models": "GGUF language models de-quantised once (caption train / generate)",
}

EPILOG = """examples:
  clipforge cache                                  each kind: entries, size, last written
  clipforge cache clear features corruptions       eval's cached features and corrupted images
  clipforge cache clear --all --older-than 30      everything not written in 30 days
  clipforge cache clear text-features --dry-run    what would go, and how much
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # the raw formatter keeps the examples' columns, and so wraps nothing itself
    intro = textwrap.fill("List what clipforge keeps in $CLIPFORGE_CACHE (default ~/.cache/clipforge), or clear "
                          "some of it. Everything there is made again when next needed: downloads fetched again "
                          "(online), features and tables recomputed.", 110)
    column = max(map(len, KINDS)) + 4
    kinds = [textwrap.fill(what, 110, initial_indent=f"  {kind}".ljust(column), subsequent_indent=" " * column)
             for kind, what in KINDS.items()]
    parser.description = intro + "\n\nkinds:\n" + "\n".join(kinds)
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", metavar="<action>")
    show = actions.add_parser("list", help="each kind's entries, size and last write [the default]")
    show.set_defaults(func=run_list)
    clear = actions.add_parser("clear", help="remove the named kinds' entries (or --all)",
                               description="Remove the named kinds' entries from the cache.")
    clear.add_argument("kinds", nargs="*", metavar="KIND", help=f"of: {', '.join(KINDS)}")
    clear.add_argument("--all", action="store_true", help="every kind")
    clear.add_argument("--older-than", type=positive_float, metavar="DAYS",
                       help="only entries last written more than DAYS days ago")
    clear.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    clear.set_defaults(func=run_clear)
    parser.set_defaults(func=run_list)


def _root() -> Path:
    from .pretrained import cache_dir

    return cache_dir()


# a download's name (``pretrained.cached_path``: 16 hex digits of its URL's digest, then its file name), the bytes
# an interrupted download kept beside it (``NAME.part``, which the next fetch resumes), or an older clipforge's
# temporary file (``files.atomic_path``)
_DOWNLOAD = re.compile(r"\.?[0-9a-f]{16}-.+")


def entries(root: Path, kind: str) -> list[Path]:
    """A kind's entries: the downloads at the top level (only files named as clipforge names them: a cache folder
    set to a busy directory by mistake keeps its other files), else what its folder holds (a file, or a folder such
    as a de-quantised language model, one entry each)."""
    if kind == "downloads":
        return sorted(p for p in root.iterdir() if (p.is_file() or p.is_symlink()) and _DOWNLOAD.fullmatch(p.name)) \
            if root.is_dir() else []
    folder = root / kind
    return sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []


def _size_and_time(entry: Path) -> tuple[int, float]:
    """Bytes and the last write under ``entry`` (links counted as themselves, never followed)."""
    if entry.is_symlink() or not entry.is_dir():
        stat = entry.lstat()
        return stat.st_size, stat.st_mtime
    size, newest = 0, entry.lstat().st_mtime
    for folder, _, files in os.walk(entry):
        for name in files:
            stat = os.lstat(os.path.join(folder, name))
            size, newest = size + stat.st_size, max(newest, stat.st_mtime)
    return size, newest


def _human(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KB", "MB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GB"


def run_list(args) -> int:
    root = _root()
    rows, total = [], 0
    for kind in KINDS:
        found = [_size_and_time(entry) for entry in entries(root, kind)]
        size = sum(s for s, _ in found)
        total += size
        newest = datetime.fromtimestamp(max(t for _, t in found)).strftime("%Y-%m-%d") if found else "-"
        rows.append((kind, len(found), _human(size) if found else "-", newest))
    print(f"$CLIPFORGE_CACHE: {root}" + ("" if root.is_dir() else " (nothing kept yet)") + f", {_human(total)}")
    print(f"{'kind':16s} {'entries':>8s} {'size':>10s}  last written")
    for kind, count, size, newest in rows:
        print(f"{kind:16s} {count:8d} {size:>10s}  {newest}")
    partial = [entry for entry in entries(root, "downloads") if entry.name.endswith(".part")]
    if partial:
        print(f"of the downloads, {len(partial)} cut short ({_human(sum(p.lstat().st_size for p in partial))} "
              "received so far): the next fetch of each file resumes it")
    return 0


def run_clear(args) -> int:
    unknown = [kind for kind in args.kinds if kind not in KINDS]
    if unknown:
        print(f"clipforge cache clear: error: no kind {', '.join(map(repr, unknown))}; kinds: {', '.join(KINDS)}",
              file=sys.stderr)
        return 2
    if not args.kinds and not args.all:
        print(f"clipforge cache clear: error: name the kinds to clear ({', '.join(KINDS)}), or --all",
              file=sys.stderr)
        return 2
    root = _root()
    if root.resolve() in (Path.home().resolve(), Path(root.anchor)):
        print(f"clipforge cache clear: error: $CLIPFORGE_CACHE is {root}, not a cache folder of its own; set it to "
              "one (default ~/.cache/clipforge)", file=sys.stderr)
        return 2
    cutoff = time.time() - args.older_than * 86400 if args.older_than else None
    removed, freed = 0, 0
    for kind in (list(KINDS) if args.all else dict.fromkeys(args.kinds)):
        for entry in entries(root, kind):
            size, written = _size_and_time(entry)
            if cutoff is not None and written > cutoff:
                continue
            if not args.dry_run:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            removed, freed = removed + 1, freed + size
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} entries, {_human(freed)}, from {root}")
    return 0
