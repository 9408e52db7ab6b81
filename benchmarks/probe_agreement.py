"""Does the probe fingerprint (``retrieval.probe``) tell weights apart, and where should its threshold sit?

    python benchmarks/probe_agreement.py runs/flickr8k --json runs/bench/probe-agreement.json
    python benchmarks/probe_agreement.py --precision-only ViT-B-32 ViT-L-14 RN50   (zoo models, random weights)

For a training run's last checkpoint (the reference) and each variant - the same weights run otherwise (bf16 weights,
ONNX Runtime fp32, its int8 image tower) and the run's earlier checkpoints, plus the architecture at random weights -
this measures
- the probe's agreement with the reference: the lowest cosine over the three probe images (texts), the figure
  ``embed`` and ``search`` compare with ``SAME_WEIGHTS``;
- the same on real photos: the median cosine between the variant's and the reference's features of each Flickr8k
  test image (1,000) and caption (5,000);
- what a collection mixing the two would do to retrieval: text->image R@1 and R@10 over Flickr8k test with the
  reference's text queries against image vectors of which every other one is the variant's (what resuming an
  embedding run with other weights leaves), beside all images by the reference.
``--precision-only NAME ...``: only the probe's agreement between fp32 weights and the same weights cast to bf16 and
fp16, for zoo architectures at random weights (seed 0): how far rounding alone moves the probe in larger towers.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

import clipforge
from clipforge.data import evaluation_set, open_source
from clipforge.evaluate.retrieval import embed_pairs, retrieval_metrics
from clipforge.inference import load_for_inference
from clipforge.retrieval.probe import SAME_WEIGHTS, agreement, probe_features

REPO = Path(__file__).resolve().parents[1]


def features(loaded, test) -> dict:
    model, preprocess, tokenizer = loaded
    images, texts = embed_pairs(model, tokenizer, test["images"](preprocess), test["captions"], batch_size=250)
    return {"probe": probe_features(model, preprocess, tokenizer), "images": images, "texts": texts}


def compare(variant: dict, reference: dict, owners) -> dict:
    probe = agreement(reference["probe"], variant["probe"])
    mixed = reference["images"].clone()
    mixed[::2] = variant["images"][::2]
    as_reference = retrieval_metrics(reference["images"], reference["texts"], owners)
    with_mixed = retrieval_metrics(mixed, reference["texts"], owners)
    return {"probe_image_min_cosine": probe["image"], "probe_text_min_cosine": probe["text"],
            "photo_median_cosine": statistics.median((variant["images"] * reference["images"]).sum(1).tolist()),
            "caption_median_cosine": statistics.median((variant["texts"] * reference["texts"]).sum(1).tolist()),
            "mixed_t2i_R@1": with_mixed["text_to_image_R@1"], "mixed_t2i_R@10": with_mixed["text_to_image_R@10"],
            "reference_t2i_R@1": as_reference["text_to_image_R@1"],
            "reference_t2i_R@10": as_reference["text_to_image_R@10"],
            "same_weights": probe["image"] >= SAME_WEIGHTS and probe["text"] >= SAME_WEIGHTS}


def precision_only(names: list[str]) -> None:
    import copy

    from clipforge.preprocess import preprocess_for

    for name in names:
        torch.manual_seed(0)
        model = clipforge.create_model(name).eval()
        preprocess, tokenizer = preprocess_for(model), clipforge.get_tokenizer(name)
        reference = probe_features(model, preprocess, tokenizer)
        for dtype in (torch.bfloat16, torch.float16):
            found = agreement(reference, probe_features(copy.deepcopy(model).to(dtype), preprocess, tokenizer))
            print(name, str(dtype).removeprefix("torch."), {k: round(v, 4) for k, v in found.items()}, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="a training run's folder (its checkpoints/step-* are compared with the last)")
    p.add_argument("--precision-only", nargs="+", metavar="NAME")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k" / "test"))
    p.add_argument("--json")
    args = p.parse_args()
    if args.precision_only:
        return precision_only(args.precision_only)
    if not args.run:
        p.error("give a training run's folder (or --precision-only NAME ...)")
    torch.manual_seed(0)
    checkpoints = sorted((Path(args.run) / "checkpoints").glob("step-*"))
    if not checkpoints:
        raise SystemExit(f"{args.run}: no checkpoints/step-* here")
    last = str(checkpoints[-1])
    source = open_source(args.data, shuffle_buffer=0)
    cache = {}

    def images(preprocess):  # decoded once per image size (every variant here shares the reference's)
        key = (preprocess.image_size, tuple(preprocess.mean))
        if key not in cache:
            cache[key] = evaluation_set(source, preprocess)
        return cache[key].images

    reference_loaded = load_for_inference(last)
    first = evaluation_set(source, reference_loaded[1])
    cache[(reference_loaded[1].image_size, tuple(reference_loaded[1].mean))] = first
    test = {"images": images, "captions": first.captions}
    owners = first.caption_images
    reference = features(reference_loaded, test)
    rows = {}
    variants = [("bf16 weights", lambda: load_for_inference(last, precision="bf16"))]
    with tempfile.TemporaryDirectory() as tmp:
        from clipforge.onnx_backend import export_onnx

        export_onnx(reference_loaded[0], Path(tmp) / "onnx", int8=True)
        variants += [("ONNX Runtime fp32", lambda: load_for_inference(str(Path(tmp) / "onnx"), backend="onnx")),
                     ("ONNX Runtime int8 image tower",
                      lambda: load_for_inference(str(Path(tmp) / "onnx"), backend="onnx-int8"))]
        variants += [(f"checkpoint {c.name}", lambda c=c: load_for_inference(str(c))) for c in checkpoints[:-1]]

        def random_weights():
            model = clipforge.create_model(reference_loaded[0].config)
            return model.eval(), reference_loaded[1], reference_loaded[2]

        variants.append(("the architecture, random weights", random_weights))
        for name, load in variants:
            rows[name] = compare(features(load(), test), reference, owners)
            print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[name].items()}),
                  flush=True)
    model_name = json.loads((Path(args.run) / "run_config.json").read_text())["train"]["model"]
    result = {"reference": last, "model": model_name, "same_weights_threshold": SAME_WEIGHTS, "rows": rows,
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads"}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
