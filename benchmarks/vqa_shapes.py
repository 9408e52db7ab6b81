"""LiMBer's few-shot VQA at our scale: questions about generated shapes, answered through maps trained on captions.

    python benchmarks/vqa_shapes.py --json runs/bench/vqa-shapes.json

No VQA set is available offline, so the questions are generated over ``clipforge demo``'s shapes, where every answer
is known (``clipforge caption vqa --make-shapes``): colour, shape, position (one shape) and count (1-3 copies).
As in the paper, the maps are trained on captions only (the shapes' own captions, never a question), then prompted
with the image prompt and "Q: {question} A:", after n = 0, 1, 2, 4 solved examples. Rows:
- clip: a ViT-Tiny-64 CLIP trained on shapes captions by ``clipforge demo`` (seed 0);
- random: the same architecture randomly initialised (seeded, saved with the map);
- blind: the clip map with its weights zeroed, so the LM sees the shared prompt and the question alone;
- prior: always the most frequent answer of the question's type (what guessing from the question alone can reach).
Each map row is trained with ``--seeds`` seeds; the table shows the median and the range. A last table checks the
image prompt itself: how often each map's plain caption of a question image names its colour and its shape.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limber_study import blind, clipforge, resume_flag  # noqa: E402  (the benchmarks share these helpers)

REPO = Path(__file__).resolve().parents[1]
SHOTS = (0, 1, 2, 4)


def question_type(question: str) -> str:
    return {"What colour": "colour", "What shape": "shape", "Where is": "position",
            "How many": "count"}[" ".join(question.split()[:2])]


def write_captioned_shapes(folder: Path, n: int, seed: int) -> Path:
    """``n`` shapes images with their five captions as sidecar .txt files: a folder ``caption train`` reads."""
    from clipforge.data.shapes import ShapesSource, caption

    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    source = ShapesSource(n, seed=seed)
    for index in range(n):
        image, attrs = source.item(index)
        image.save(folder / f"{index:05d}.png")
        rng = random.Random(f"captions-{seed}-{index}")
        (folder / f"{index:05d}.txt").write_text("\n".join(caption(attrs, rng) for _ in range(5)))
    (folder / "done").write_text("")
    return folder


def prior_accuracy(questions: Path, annotations: Path) -> dict:
    """Accuracy of answering each question with its type's most frequent answer."""
    from clipforge.captioning.vqa import load_vqa

    items = load_vqa(questions, annotations)
    by_type: dict[str, Counter] = {}
    for item in items:
        by_type.setdefault(question_type(item["question"]), Counter())[item["answers"][0]] += 1
    right = sum(counts.most_common(1)[0][1] for counts in by_type.values())
    return {"accuracy": right / len(items),
            "by_type": {t: counts.most_common(1)[0][1] / sum(counts.values()) for t, counts in by_type.items()}}


def caption_naming(folder: Path, images: Path, questions: Path, annotations: Path) -> dict:
    """How often the map's plain caption of each question image (``caption generate``, no question) names the
    image's colour and its shape: whether the image prompt carries what the questions ask about."""
    from clipforge.captioning.vqa import load_vqa

    out = folder / "captions.jsonl"
    if not out.exists():
        files = sorted(images.glob("*.png"), key=lambda p: int(p.stem))
        result = subprocess.run([sys.executable, "-m", "clipforge.cli", "caption", "generate", "--mapping", str(folder),
                                 "--max-new-tokens", "12", "--json", *map(str, files)], check=True, capture_output=True,
                                text=True)
        out.write_text(result.stdout)
    captions = {Path(row["image"]).stem: row["caption"].split("\n")[0].lower()
                for row in map(json.loads, out.read_text().splitlines())}
    truth: dict[str, dict] = {}
    for item in load_vqa(questions, annotations):
        kind = question_type(item["question"])
        if kind in ("colour", "shape"):
            truth.setdefault(str(item["image_id"]), {})[kind] = item["answers"][0]
    named = {kind: sum(f" {t[kind]}" in f" {captions[i]}" for i, t in truth.items()) / len(truth)
             for kind in ("colour", "shape")}
    return {**named, "examples": [captions[i] for i in sorted(captions, key=int)[:6]]}


def by_type(answers: list[dict]) -> dict:
    groups: dict[str, list] = {}
    for row in answers:
        groups.setdefault(question_type(row["question"]), []).append(row["accuracy"])
    return {t: sum(v) / len(v) for t, v in groups.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "vqa-shapes")
    parser.add_argument("--caption-images", type=int, default=3000, help="captioned shapes the maps train on [3000]")
    parser.add_argument("--vqa-images", type=int, default=60, help="images in the question set [60]")
    parser.add_argument("--steps", type=int, default=300, help="map training steps [300]")
    parser.add_argument("--lr", type=float, default=1e-3, help="map learning rate [1e-3: what the published figure used, "
                        "then caption train's default]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="clip the maps' gradients to this norm; 0: never (the published figures) [1.0]")
    parser.add_argument("--min-new-tokens", type=int, default=0,
                        help="caption vqa's --min-new-tokens: 1 does not let the LM end the text before answering "
                             "(as serve's /ask); evaluated into vqa-min1.json beside vqa.json, same maps [0]")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from clipforge.train.checkpoints import checkpoint_dirs

    out = args.output
    tower = out / "clip-tower"
    if not checkpoint_dirs(tower):
        clipforge("demo", "--output", str(tower), "--seed", "0", "--no-progress")
    encoders = {"clip": str(checkpoint_dirs(tower)[-1]), "random": "ViT-Tiny-64"}
    captions = write_captioned_shapes(out / "captions", args.caption_images, seed=7)  # not the demo's seed-0 images
    vqa = out / "questions"
    if not (vqa / "annotations.json").exists():
        clipforge("caption", "vqa", "--make-shapes", str(vqa), "--shapes-images", str(args.vqa_images),
                  "--seed", "1000")
    questions, annotations, images = vqa / "questions.json", vqa / "annotations.json", vqa / "images"

    results: dict[str, list] = {}
    for row in ("clip", "random", "blind"):
        for seed in args.seeds:
            folder = out / f"{row}-seed{seed}"
            if row == "blind":
                if not (folder / "limber.json").exists():
                    blind(out / f"clip-seed{seed}", folder)
            elif not (folder / "train_args.json").exists():  # written when training ends; a killed run resumes
                clipforge("caption", "train", "--clip", encoders[row], "--data", str(captions), "--steps",
                          str(args.steps), "--batch-size", "16", "--lr", str(args.lr), "--seed", str(seed),
                          "--output", str(folder),
                          "--max-grad-norm", str(args.max_grad_norm),
                          "--no-progress", *resume_flag(folder))
            answers = folder / ("vqa.json" if not args.min_new_tokens else f"vqa-min{args.min_new_tokens}.json")
            if not answers.exists():
                clipforge("caption", "vqa", "--mapping", str(folder), "--questions", str(questions), "--annotations",
                          str(annotations), "--images", str(images), "--shots", *map(str, SHOTS), "--seed", str(seed),
                          "--min-new-tokens", str(args.min_new_tokens), "--json", str(answers), "--no-progress")
            result = json.loads(answers.read_text())
            results.setdefault(row, []).append(
                {"accuracy": result["accuracy"], "by_type": {n: by_type(a) for n, a in result["answers"].items()},
                 "empty": {n: sum(not row["prediction"] for row in a) for n, a in result["answers"].items()},
                 "caption_names": caption_naming(folder, images, questions, annotations)})

    prior = prior_accuracy(questions, annotations)
    lines = ["| encoder | " + " | ".join(f"n = {n}" for n in SHOTS) + " |", "|---" * (len(SHOTS) + 1) + "|"]
    for row, runs in results.items():
        cells = []
        for n in SHOTS:
            values = [r["accuracy"][str(n)] for r in runs]
            spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
            cells.append(f"{statistics.median(values):.3f}{spread}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append(f"| prior (type's most frequent answer) | {prior['accuracy']:.3f} |" + " |" * (len(SHOTS) - 1))
    asked = len(json.loads(annotations.read_text())["annotations"])
    lines += ["", f"| empty answers of {asked}, per seed | " + " | ".join(f"n = {n}" for n in SHOTS) + " |",
              "|---" * (len(SHOTS) + 1) + "|"]
    for row, runs in results.items():
        lines.append(f"| {row} | " + " | ".join("/".join(str(r["empty"][str(n)]) for r in runs) for n in SHOTS) + " |")
    types = sorted(prior["by_type"])
    lines += ["", "| encoder, best n by median | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
    for row, runs in results.items():
        best = max(SHOTS, key=lambda n: statistics.median(r["accuracy"][str(n)] for r in runs))
        cells = [f"{statistics.median(r['by_type'][str(best)].get(t, 0.0) for r in runs):.3f}" for t in types]
        lines.append(f"| {row}, n = {best} | " + " | ".join(cells) + " |")
    lines.append("| prior | " + " | ".join(f"{prior['by_type'][t]:.3f}" for t in types) + " |")
    lines += ["", "| encoder | plain caption names the colour | names the shape | e.g. |", "|---|---|---|---|"]
    for row, runs in results.items():
        named = [r["caption_names"] for r in runs]
        lines.append(f"| {row} | {statistics.median(n['colour'] for n in named):.3f} | "
                     f"{statistics.median(n['shape'] for n in named):.3f} | {'; '.join(named[0]['examples'][:3])} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "min_new_tokens": args.min_new_tokens,
                                         "rows": results, "prior": prior},
                                        indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
