"""Image-caption selection on Flickr8k test with hard negatives made by rule, SugarCrepe's kinds: does a model trained
here read word order and words, or a bag of words? Beside it, the blind peer SugarCrepe warns about: a language model
(SmolLM2-135M) that never sees the image and picks the caption it finds likelier.

    python benchmarks/caption_selection.py runs/flickr8k/checkpoints/step-00002400 runs/flickr8k-s1/checkpoints/step-00002400 --json runs/bench/caption-selection.json

Each photo's first caption is the truth; a negative is made from it where its words allow (fixed word lists, a
seeded draw): ``replace_att`` one colour word for another, ``replace_obj`` one noun for another of the list,
``swap_att`` two different colour words exchanged, ``swap_obj`` two different nouns exchanged (not where only "and"
or a comma stands between them: "a man and a woman" swapped is still true). Written as SugarCrepe's
JSON files (filenames are the photos' places in the shards) and scored by ``clipforge eval caption-selection``;
chance is 50%. Rule-made negatives are often implausible text, which a blind model spots; so, as SugarCrepe refines
its sets, each kind is also scored on a debiased subset: every sample where the blind model prefers the negative and
as many (a seeded draw) where it prefers the truth, on which the blind model is at 50% by construction.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from report import finish, machine

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["black", "white", "brown", "red", "blue", "green", "yellow", "pink", "orange", "purple", "gray", "grey"]
# singular nouns of Flickr8k's captions, no two naming the same thing (no dog/puppy, bike/bicycle, ocean/water)
NOUNS = ["dog", "man", "woman", "boy", "girl", "ball", "water", "snow", "grass", "beach", "street", "bike", "car",
         "horse", "rock", "field", "pool", "wall", "shirt", "hat", "jacket", "crowd", "frisbee", "stick", "tree", "road",
         "sand", "mountain", "building", "bench", "table", "camera", "stage", "fence", "river"]
SAME = {frozenset(("gray", "grey"))}  # a replacement that changes nothing
JOINED = {"and", "and a", "and an", "and the", "or", "or a", ",", "and two"}  # a swap across these changes nothing


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def negatives(caption: str, rng: np.random.Generator) -> dict[str, str]:
    """The negatives this caption allows, by kind (each a whole-word substitution in the lower-cased caption)."""
    text = caption.strip().lower()
    present = words(text)
    found = {"att": [w for w in dict.fromkeys(present) if w in COLOURS],
             "obj": [w for w in dict.fromkeys(present) if w in NOUNS]}
    out = {}
    for kind, vocabulary in (("att", COLOURS), ("obj", NOUNS)):
        have = found[kind]
        if have:
            old = have[int(rng.integers(len(have)))]
            choices = [w for w in vocabulary if w not in present and frozenset((w, old)) not in SAME]
            new = choices[int(rng.integers(len(choices)))]
            out[f"replace_{kind}"] = re.sub(rf"\b{old}\b", new, text, count=1)
        if len(have) >= 2:
            a, b = have[:2]
            between = re.search(rf"\b{a}\b(.*?)\b{b}\b", text)
            if between and between.group(1).strip() in JOINED:  # "brown and white": swapped, still true
                continue
            swapped = re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(1) == a else a, text)
            if swapped != text:
                out[f"swap_{kind}"] = swapped
    return out


def build_sets(data: str, folder: Path, seed: int = 0) -> dict[str, Path]:
    from clipforge.data import open_source

    rng = np.random.default_rng(seed)
    sets: dict[str, dict] = {}
    source = open_source(data, shuffle_buffer=0)
    for sample in source.samples(0, 1, 0, 0, Counter()):
        caption = sample["txt"].decode().splitlines()[0].strip().lower()
        where = f"{Path(sample['__url__']).resolve()}:{sample['__key__']}"  # a sample of a shard, as collections name it
        for kind, negative in negatives(caption, rng).items():
            sets.setdefault(kind, {})[str(len(sets.get(kind, {})))] = {
                "filename": where, "caption": caption, "negative_caption": negative}
    paths = {}
    for kind, records in sorted(sets.items()):
        paths[kind] = folder / f"{kind}.json"
        paths[kind].write_text(json.dumps(records))
    return paths


@torch.no_grad()
def blind(paths: dict[str, Path]) -> dict:
    """SmolLM2's pick of each pair without the image: the caption with the higher mean log-likelihood per token.
    Per kind: its accuracy and, per sample, whether it picked the truth."""
    from clipforge.captioning.limber import load_language_model

    lm, tokenizer = load_language_model("smollm2")
    out = {}
    for kind, path in paths.items():
        records = list(json.loads(path.read_text()).values())
        texts = [t for r in records for t in (r["caption"], r["negative_caption"])]
        scores = []
        for start in range(0, len(texts), 64):
            batch = tokenizer([tokenizer.bos_token + t if tokenizer.bos_token else t for t in texts[start:start + 64]],
                              return_tensors="pt", padding=True)
            logits = lm(**batch).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].float()
            logp = torch.log_softmax(logits, -1).gather(2, targets[..., None])[..., 0]
            scores += ((logp * mask).sum(1) / mask.sum(1)).tolist()
        scores = np.array(scores).reshape(-1, 2)
        out[kind] = {"acc": float(np.mean(scores[:, 0] >= scores[:, 1])), "n_samples": len(records),
                     "picked_truth": (scores[:, 0] >= scores[:, 1]).tolist()}
    return out


def debiased(paths: dict[str, Path], picks: dict, folder: Path, seed: int = 0) -> dict[str, Path]:
    """Per kind, the samples the blind model gets wrong and as many of those it gets right (a seeded draw); were the
    wrong ones the more (not so on Flickr8k: the blind model is above 50% on every kind), the first as many."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind, path in paths.items():
        records = list(json.loads(path.read_text()).values())
        right = np.flatnonzero(picks[kind]["picked_truth"])
        wrong = np.flatnonzero(~np.array(picks[kind]["picked_truth"]))
        n = min(len(right), len(wrong))
        chosen = sorted(wrong[:n].tolist() + rng.choice(right, n, replace=False).tolist())
        out[kind] = folder / f"{kind}-debiased.json"
        out[kind].write_text(json.dumps({str(i): records[j] for i, j in enumerate(chosen)}))
    return out


def evaluate(checkpoint: str, paths: dict[str, Path], folder: Path) -> dict:
    results = {}
    for kind, path in paths.items():
        output = folder / f"result-{kind}.json"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "clipforge.cli", "eval", "caption-selection", "--pretrained", checkpoint,
                        "--dataset-root", str(path), "--output", str(output), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        results[kind] = {**json.loads(output.read_text())["metrics"], "seconds": round(time.perf_counter() - started, 1)}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "test"))
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    report = {"machine": machine(),
              "data": "flickr8k/test", "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_sets(args.data, Path(tmp))
        report["sets"] = {kind: len(json.loads(path.read_text())) for kind, path in paths.items()}
        for kind, path in paths.items():
            first = next(iter(json.loads(path.read_text()).values()))
            report.setdefault("examples", {})[kind] = [first["caption"], first["negative_caption"]]
        picks = blind(paths)
        fair = debiased(paths, picks, Path(tmp))
        report["peer: SmolLM2-135M, blind (no image)"] = {k: {"acc": v["acc"], "n_samples": v["n_samples"]}
                                                         for k, v in picks.items()}
        report["debiased sets"] = {kind: len(json.loads(path.read_text())) for kind, path in fair.items()}
        for checkpoint in args.checkpoints:
            report["models"][checkpoint] = {"all": evaluate(checkpoint, paths, Path(tmp)),
                                            "debiased": evaluate(checkpoint, fair, Path(tmp))}
            print(checkpoint, json.dumps(report["models"][checkpoint]), flush=True)
    finish(report, args.json)


if __name__ == "__main__":
    main()
