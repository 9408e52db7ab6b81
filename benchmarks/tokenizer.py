"""Tokenizer throughput, clipforge vs open_clip, on 10,000 distinct captions; ids are checked to be identical.

    python benchmarks/tokenizer.py [--data ../shared/data] [--repeats 5] [--json out.json] [--added-tokens A,B]

Captions: the 395 human captions of coco-mini plus recombinations of their halves (first half of one caption, second
half of another) up to 10,000 distinct strings, so the vocabulary is natural and no caption repeats. "cold" builds a
fresh tokenizer for every repeat (empty word caches on both sides); "warm" re-tokenises with the caches filled.
``--added-tokens``: both tokenizers given these tokens (open_clip's ``additional_special_tokens``), and one of them
put at a random word position of every caption (seeded).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
from functools import partial
from pathlib import Path

from clipforge.bench.corpora import distinct_captions
from clipforge.bench.tasks import tokenizer_speed

REPO = Path(__file__).resolve().parents[1]


def load_captions(data: Path, n: int = 10_000, seed: int = 0) -> list[str]:
    if not (data / "coco-mini" / "test" / "test-000000.tar").exists():
        raise SystemExit(f"coco-mini not found under {data}; pass --data")
    return distinct_captions(data, n, seed)


def with_added_tokens(captions: list[str], tokens: list[str], seed: int = 0) -> list[str]:
    """Each caption with one of ``tokens`` put at a random word position."""
    rng = random.Random(seed)
    out = []
    for caption in captions:
        words = caption.split(" ")
        words.insert(rng.randint(0, len(words)), rng.choice(tokens))
        out.append(" ".join(words))
    return out


def run(captions: list[str], repeats: int = 5, added_tokens: list[str] | None = None) -> dict:
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    from clipforge.tokenizer import Tokenizer

    makers = {"clipforge": partial(Tokenizer, additional_special_tokens=added_tokens),
              "open_clip": partial(SimpleTokenizer, additional_special_tokens=added_tokens)}
    assert torch.equal(makers["clipforge"]()(captions), makers["open_clip"]()(captions)), "ids differ from open_clip"
    results = {name: {} for name in makers}
    for kind in ("cold", "warm"):
        summary = tokenizer_speed(makers, captions, repeats, warm=kind == "warm")
        for name in makers:
            row = summary[name]
            results[name][f"{kind}_captions_per_s"] = {"median": row["captions_per_s"], "min": row["min"],
                                                       "max": row["max"]}
        results[f"ratio_{kind}"] = summary["open_clip"]["clipforge_ratio"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--added-tokens", type=lambda text: text.split(","),
                        help="comma-separated tokens both tokenizers add (one is put in every caption)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    captions = load_captions(args.data)
    if args.added_tokens:
        captions = with_added_tokens(captions, args.added_tokens)
    results = run(captions, args.repeats, args.added_tokens)
    results["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{len(captions)} captions, median of {args.repeats} (min-max)")
    for kind in ("cold", "warm"):
        row = [f"{kind:5s}"]
        for name in ("clipforge", "open_clip"):
            r = results[name][f"{kind}_captions_per_s"]
            row.append(f"{name} {r['median']:9.0f}/s ({r['min']:.0f}-{r['max']:.0f})")
        row.append(f"ratio {results[f'ratio_{kind}']:.1f}x")
        print("  ".join(row))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
