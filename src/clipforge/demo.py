"""``clipforge demo``: the whole job on an embedded default, with no download and no files.

Generates captioned coloured shapes (``clipforge.data.shapes``), trains ``ViT-Tiny-64`` on them for about two
minutes on 2 CPU cores, then tests what only contrastive language supervision gives: zero-shot classification of
colour+shape combinations that never appeared in training, and text->image retrieval. Writes ``report.html``.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import random
import time
from itertools import product
from pathlib import Path

import torch

from .argtypes import non_negative_int, positive_int
from .data.shapes import COLOURS, HELD_OUT_PAIRS, SHAPES, ShapesSource, caption
from .evaluate.retrieval import retrieval_metrics
from .preprocess import Preprocess
from .tokenizer import get_tokenizer
from .train import TrainConfig, train
from .zeroshot import class_probabilities, zero_shot_classifier

CLASSES = [f"{colour} {shape}" for colour, shape in product(COLOURS, SHAPES)]
PROMPTS = ["a {}", "a picture of a {}", "a small {}", "a large {}"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--steps", type=positive_int, default=360, help="training steps (~2 min on 2 CPU cores) [360]")
    p.add_argument("--batch-size", type=positive_int, default=64, help="[64]")
    p.add_argument("--model", default="ViT-Tiny-64", help="zoo architecture [ViT-Tiny-64]")
    p.add_argument("--output", default="runs/demo", help="run folder: checkpoints, metrics, report.html [runs/demo]")
    p.add_argument("--data", help="train on real data instead (shards, CSV or folder; see clipforge train --help)")
    p.add_argument("--val-data", help="with --data: held-out data for retrieval in the report")
    p.add_argument("--label-captions", help="with --data on labelled shards: 'default' or a templates file")
    p.add_argument("--workers", type=non_negative_int, default=2, help="[2]")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--overwrite", action="store_true", help="start over in an --output folder holding another run's "
                   "checkpoints (an earlier demo's folder is started over without it)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size, steps=args.steps, lr=1e-3, wd=0.1,
                      warmup=max(1, args.steps // 10), seed=args.seed, workers=args.workers, output=args.output,
                      save_every=0, log_every=10, progress=args.progress, train_data=args.data,
                      val_data=args.val_data, label_captions=args.label_captions,
                      overwrite=args.overwrite or (Path(args.output) / "demo_results.json").exists())
    output = Path(args.output)
    if args.data:
        from .train.cli import report

        return report(train(cfg))
    held_out = ", ".join(f"{c} {s}" for c, s in HELD_OUT_PAIRS)
    print(f"clipforge demo: training {args.model} on generated shapes for {args.steps} steps "
          f"(held out of training: {held_out})")
    start = time.perf_counter()
    summary = train(cfg, train_source=ShapesSource(50_000, seed=args.seed, exclude_pairs=HELD_OUT_PAIRS))
    if summary["stopped_by"]:  # Ctrl-C: a report on a half-trained model would mislead
        raise KeyboardInterrupt
    minutes = (time.perf_counter() - start) / 60
    model = summary["model"].eval()
    results = evaluate_shapes(model, get_tokenizer(args.model), seed=args.seed)
    results.update(train_minutes=minutes, steps=summary["steps"], final_loss=summary["loss"],
                   checkpoint=summary["checkpoint"])
    (output / "demo_results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "examples"},
                                                         indent=2))
    report = write_report(output / "report.html", results)
    chance = 1 / len(CLASSES)
    print(f"\ntrained in {minutes:.1f} min, final loss {summary['loss']:.3f}")
    print(f"zero-shot colour+shape top-1, combinations never seen in training: {results['unseen_top1']:.1%} "
          f"(chance {chance:.1%}; seen combinations: {results['seen_top1']:.1%})")
    print("text->image retrieval on 200 new images: " + ", ".join(
        f"R@{k} {results['retrieval'][f'text_to_image_R@{k}']:.1%}" for k in (1, 5, 10)))
    print(f"report: {report}\nmodel:  clipforge.load({summary['checkpoint']!r})")
    return 0


@torch.no_grad()
def evaluate_shapes(model, tokenizer, seed: int = 0) -> dict:
    preprocess = Preprocess(model.image_size)
    weights = zero_shot_classifier(model, tokenizer, CLASSES, PROMPTS)
    results, examples = {}, {}
    for name, source in (("unseen", ShapesSource(400, seed=seed + 1000, only_pairs=HELD_OUT_PAIRS)),
                         ("seen", ShapesSource(400, seed=seed + 2000, exclude_pairs=HELD_OUT_PAIRS))):
        items = [source.item(i) for i in range(len(source))]
        features = model.encode_image(torch.stack([preprocess(img) for img, _ in items]), normalize=True)
        probs = class_probabilities(model, features, weights)
        truth = torch.tensor([CLASSES.index(f"{a['colour']} {a['shape']}") for _, a in items])
        predicted = probs.argmax(dim=-1)
        results[f"{name}_top1"] = (predicted == truth).float().mean().item()
        examples[name] = [(img, CLASSES[t], CLASSES[p], probs[i, p].item())
                          for i, ((img, _), t, p) in enumerate(zip(items[:24], truth.tolist(), predicted.tolist()))]
    gallery = ShapesSource(200, seed=seed + 3000)
    items = [gallery.item(i) for i in range(len(gallery))]
    rng = random.Random(seed)
    captions = [caption(a, rng) for _, a in items]
    image_features = model.encode_image(torch.stack([preprocess(img) for img, _ in items]), normalize=True)
    text_features = model.encode_text(tokenizer(captions), normalize=True)
    results["retrieval"] = retrieval_metrics(image_features, text_features, torch.arange(len(items)))
    queries = ["a large red circle on the left", "a small blue square at the top", "a purple triangle",
               "a green cross in the middle"]
    scores = model.encode_text(tokenizer(queries), normalize=True) @ image_features.T
    examples["queries"] = [(q, [(items[j][0], scores[i, j].item()) for j in scores[i].topk(5).indices.tolist()])
                           for i, q in enumerate(queries)]
    results["examples"] = examples
    return results


def _img(image, size: int = 64) -> str:
    buffer = io.BytesIO()
    image.resize((size, size)).save(buffer, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" width="{size}">'


def write_report(path: Path, results: dict) -> Path:
    ex = results["examples"]
    cells = lambda rows: "".join(
        f'<figure class="{"ok" if t == p else "bad"}">{_img(img)}<figcaption>{html.escape(p)} '
        f'({prob:.0%})<br><small>true: {html.escape(t)}</small></figcaption></figure>' for img, t, p, prob in rows)
    queries = "".join(f"<h3>“{html.escape(q)}”</h3><div class=grid>" + "".join(
        f"<figure>{_img(img)}<figcaption>{score:.2f}</figcaption></figure>" for img, score in hits) + "</div>"
        for q, hits in ex["queries"])
    r = results["retrieval"]
    page = f"""<!doctype html><meta charset="utf-8"><title>clipforge demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} .grid{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0;width:110px;font-size:12px;text-align:center}} .ok{{border:2px solid #2a2}} .bad{{border:2px solid #c22}}</style>
<h1>clipforge demo</h1>
<p>ViT-Tiny-64 trained {results['steps']} steps ({results['train_minutes']:.1f} min) on generated captioned shapes,
final loss {results['final_loss']:.3f}. Held out of training: {', '.join(f'{c} {s}' for c, s in HELD_OUT_PAIRS)}.</p>
<h2>Zero-shot on combinations never seen in training: {results['unseen_top1']:.1%} top-1</h2>
<p>Among {len(CLASSES)} colour+shape classes (chance {1 / len(CLASSES):.1%}); on seen combinations:
{results['seen_top1']:.1%}. Green: correct, red: wrong.</p><div class=grid>{cells(ex['unseen'])}</div>
<h2>Seen combinations</h2><div class=grid>{cells(ex['seen'])}</div>
<h2>Text→image retrieval</h2><p>200 new images, one caption each: R@1 {r['text_to_image_R@1']:.1%},
R@5 {r['text_to_image_R@5']:.1%}, R@10 {r['text_to_image_R@10']:.1%}. Top 5 for free-form queries:</p>{queries}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
