"""The LiMBer study at our scale: which frozen image encoder lets one linear map caption Flickr8k, by supervision.

    python benchmarks/limber_study.py --clip CKPT --judge CKPT2 --json runs/bench/limber-study.json

Rows (the encoders differ only in supervision: same architecture, same Flickr8k training images):
- clip: the Flickr8k CLIP (benchmarks/flickr8k.py, seed 0);
- labels: the same tower trained to predict the captions' concrete nouns (``--objective labels``);
- self-supervised: the same tower trained without language (``--objective self-supervised``, SimCLR-style);
- random: the same architecture, randomly initialised;
- blind: the map's input zeroed, so the language model sees only the learned shared prompt.
Each row's map is trained on flickr8k/train captions with the text prefix "A picture of" (``--steps`` steps, seeds
``--seeds``) and evaluated on flickr8k/test: CIDEr-D, BLEU-4, CLIPScore and RefCLIPScore (judged by ``--judge``, a
CLIP model that is none of the encoders: the recipe's seed-1 run), noun precision/recall and the missed nouns'
similarity. ``--ablation K ...`` adds k prompts for the clip encoder, pooled and grid (first seed). Sample pages:
``--pages DIR`` writes one HTML page per row (images, generated caption, references).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "A picture of"
TEXT_SETTINGS = ("text_model", "lock_text", "text_cache", "pretrained")


def clipforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "clipforge.cli", *args], check=True)


def train_encoder(objective: str, recipe: Path, output: Path) -> Path:
    """The recipe's image tower trained with another objective (no text tower), once; a killed run continues from
    its last checkpoint when the study is run again."""
    from clipforge.train.checkpoints import checkpoint_dirs
    from clipforge.train.cli import read_config

    # the recipe without its text tower: these objectives train the image tower alone
    settings = {k: v for k, v in read_config(recipe).items() if k not in TEXT_SETTINGS}
    final = output / "checkpoints" / f"step-{settings['steps']:08d}"
    if not final.exists():
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.json").write_text(json.dumps(settings, indent=1))
        clipforge("train", "--config", str(output / "recipe.json"), "--objective", objective, "--output", str(output),
                  "--no-progress", "--save-every", "200", "--resume", "latest",
                  *(["--crop-scale", "0.3", "1.0"] if objective == "self-supervised" else []))
    return checkpoint_dirs(output)[-1]


def blind(mapping_folder: Path, output: Path) -> Path:
    """A copy of a trained map with its weights zeroed: every image gets the shared prompt (the bias) alone."""
    from clipforge.captioning.captioner import rebase_references
    from clipforge.captioning.limber import ImageToPrefix

    mapping = ImageToPrefix.load(mapping_folder)
    rebase_references(mapping.config, mapping_folder, output)
    mapping.proj.weight.data.zero_()
    mapping.save(output)
    return output


def caption_row(encoder: str, args, seed: int, output: Path, extra=()) -> dict:
    if not (output / "eval.json").exists():
        if not (output / "train_args.json").exists():  # written when training ends; a killed run resumes
            clipforge("caption", "train", "--clip", encoder, "--data", str(args.data / "flickr8k" / "train"),
                      "--steps", str(args.steps), "--batch-size", "16", "--lr", str(args.lr), "--seed", str(seed),
                      "--max-grad-norm", str(args.max_grad_norm),
                      "--output", str(output), "--prompt", PROMPT, "--no-progress", *resume_flag(output), *extra)
        evaluate(output, args)
    return json.loads((output / "eval.json").read_text())


def resume_flag(output: Path) -> list[str]:
    from clipforge.train.checkpoints import TRAIN_STATE

    return ["--resume"] if (output / TRAIN_STATE).is_file() else []


def evaluate(mapping: Path, args) -> None:
    clipforge("caption", "eval", "--mapping", str(mapping), "--data", str(args.data / "flickr8k" / "test"),
              "--max-images", str(args.test_images), "--judge", str(args.judge),
              "--json", str(mapping / "eval.json"), "--no-progress")


def page(result: dict, title: str, path: Path, data: Path, n: int = 12) -> None:
    """An HTML page of the first ``n`` test images (160 px thumbnails, inline), each with the generated caption and
    its references: small enough to keep beside the docs."""
    import io

    from PIL import Image

    from clipforge.data import open_source

    thumbnails = []
    for raw in open_source(str(data / "flickr8k" / "test"), shuffle_buffer=0).samples(0, 1, 0, 0, {}):
        image = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
        image.thumbnail((160, 160))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        thumbnails.append(buffer.getvalue())
        if len(thumbnails) == n:
            break
    rows = "".join(
        f"<tr><td><img src='data:image/jpeg;base64,{base64.b64encode(image).decode()}'></td>"
        f"<td><b>{html.escape(c['caption'])}</b><br><small>{'<br>'.join(html.escape(r) for r in c['references'])}"
        f"</small></td></tr>" for image, c in zip(thumbnails, result["captions"]))
    path.write_text(f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
                    f"<h1>{html.escape(title)}</h1><table>{rows}</table>")


def training_summary(folder: Path, every: int = 25) -> str:
    """A map's training loss as means over ``every`` steps, and the norm of its weight matrix (how far the
    image-dependent part of the prompt has grown)."""
    from safetensors.torch import load_file

    losses, grad_norms = {}, {}
    for line in (folder / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]  # a resumed run logs some steps again: the last entry counts
        if "grad_norm" in record:  # logged since gradient clipping came in
            grad_norms[record["step"]] = record["grad_norm"]
    means = [statistics.mean(v for s, v in losses.items() if start < s <= start + every)
             for start in range(0, max(losses), every)]
    weight = load_file(str(folder / "mapping.safetensors"))["proj.weight"]
    spikes = ""
    if grad_norms:
        typical, (worst_step, worst) = statistics.median(grad_norms.values()), max(grad_norms.items(), key=lambda kv: kv[1])
        spikes = f"; gradient norm median {typical:.1f}, largest {worst:.1f} (step {worst_step}, before clipping)"
    return f"loss per {every} steps {' '.join(f'{m:.2f}' for m in means)}; |W| {float(weight.norm()):.2f}{spikes}"


COLUMNS = ("cider", "bleu_4", "clip_score", "ref_clip_score", "noun_precision", "noun_recall", "missed_noun_similarity",
           "distinct_captions")


def with_distinct(result: dict) -> dict:
    """Adds the number of different generated captions per test image: 1/300 for a map that says the same sentence
    to every image (the blind row), 1 for one that never repeats itself."""
    captions = [c["caption"] for c in result["captions"]]
    result["scores"]["distinct_captions"] = len(set(captions)) / len(captions)
    return result


def table(rows: dict) -> str:
    lines = ["| encoder | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, results in rows.items():
        cells = []
        for column in COLUMNS:
            values = [r["scores"].get(column, float("nan")) for r in results]
            values = [v for v in values if v == v]  # NaN: no noun generated at all (a degenerate map)
            spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
            cells.append(f"{statistics.median(values):.3f}{spread}" if values else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(rows: dict, seeds: list[int]) -> str:
    """One line per (row, seed) of the seeded rows."""
    lines = ["| encoder | seed | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, results in rows.items():
        for seed, result in zip(seeds, results):
            cells = [f"{result['scores'].get(column, float('nan')):.3f}" for column in COLUMNS]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", required=True, help="the Flickr8k CLIP checkpoint (the clip row's encoder)")
    parser.add_argument("--judge", required=True, help="a CLIP checkpoint that is none of the encoders")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "flickr8k.yaml")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "limber-study")
    parser.add_argument("--encoders", type=Path, help="where the labels / self-supervised towers are trained (or "
                        "found, when an earlier study trained them) [OUTPUT/encoders]")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="the maps' learning rate (the shared prompt's: 10x) [3e-4, the first study's, chosen before "
                             "gradient clipping, when a clip map diverged at caption train's default 1e-3]")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="clip each map's gradient to this norm; 0: never (the first study's maps) [1.0]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--rows", nargs="+", default=["clip", "labels", "self-supervised", "random", "blind"])
    parser.add_argument("--ablation", type=int, nargs="*", default=[], metavar="K",
                        help="prompt counts k to compare for clip, pooled and grid features, first seed (the paper "
                             "never varied k), e.g. --ablation 1 2 4 8 16")
    parser.add_argument("--ablation-features", nargs="+", default=["pooled", "grid"], choices=["pooled", "grid"])
    parser.add_argument("--pages", type=Path, help="write sample-caption pages here")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--curves", type=Path, nargs="*", default=[],
                        help="also print the training summary of these map folders (runs outside the table)")
    args = parser.parse_args()
    from clipforge.train.cli import read_config

    model = read_config(args.recipe).get("model", "ViT-Tiny-64")
    towers = args.encoders or args.output / "encoders"
    encoders = {"clip": args.clip}
    if "labels" in args.rows:
        encoders["labels"] = str(train_encoder("labels", args.recipe, towers / "labels"))
    if "self-supervised" in args.rows:
        encoders["self-supervised"] = str(train_encoder("self-supervised", args.recipe,
                                                        towers / "self-supervised"))
    results: dict[str, list] = {}
    for row in args.rows:
        for seed in args.seeds:
            folder = args.output / f"{row}-seed{seed}"
            if row == "blind":
                source = args.output / f"clip-seed{seed}"
                caption_row(args.clip, args, seed, source)
                if not (folder / "eval.json").exists():
                    blind(source, folder)
                    evaluate(folder, args)
                result = json.loads((folder / "eval.json").read_text())
            elif row == "random":  # a zoo name without weights: initialised from the seed, saved with the map
                result = caption_row(model, args, seed, folder)
            else:
                result = caption_row(encoders[row], args, seed, folder)
            results.setdefault(row, []).append(with_distinct(result))
            if args.pages and seed == args.seeds[0]:
                args.pages.mkdir(parents=True, exist_ok=True)
                page(result, f"LiMBer captions, {row} encoder", args.pages / f"{row}.html", args.data)
    for features in args.ablation_features if args.ablation else ():
        for k in args.ablation:
            name = f"clip {features} k={k}"
            if features == "pooled" and k == 4 and "clip" in args.rows:  # the table's own clip row
                results[name] = results["clip"][:1]
                continue
            results[name] = [with_distinct(caption_row(args.clip, args, args.seeds[0],
                                                       args.output / f"clip-{features}-k{k}",
                                                       ["--features", features, "--prefix-tokens", str(k)]))]
    summary = {name: [r["scores"] for r in rows] for name, rows in results.items()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"judge": str(args.judge), "steps": args.steps, "lr": args.lr,
                                         "max_grad_norm": args.max_grad_norm, "seeds": args.seeds,
                                         "rows": summary}, indent=1))
    print(per_seed_table({row: results[row] for row in args.rows}, args.seeds))
    print()
    print(table(results))
    runs = [(f"{row} seed {seed}", args.output / f"{row}-seed{seed}") for row in args.rows for seed in args.seeds]
    runs += [(f"clip {features} k={k}", args.output / f"clip-{features}-k{k}")
             for features in (args.ablation_features if args.ablation else ()) for k in args.ablation
             if (args.output / f"clip-{features}-k{k}").is_dir()]
    for name, folder in runs:
        scores = json.loads((folder / "eval.json").read_text())["scores"]
        trained = f"; {training_summary(folder)}" if (folder / "log.jsonl").exists() else ""
        print(f"{name}: CIDEr-D {scores['cider']:.3f}, CLIPScore {scores['clip_score']:.3f}{trained}")
    for folder in args.curves:
        print(f"{folder}: {training_summary(folder)}")


if __name__ == "__main__":
    main()
