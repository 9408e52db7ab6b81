"""``clipforge.transformers_api`` (``CLIPModel``, ``CLIPProcessor``) against transformers' own on the same folder:
what a transformers script spends, part by part, with only its import changed.

    python benchmarks/transformers_api.py --data ../shared/data --json runs/bench/transformers-api.json

ViT-B-32 at 224 pixels (random weights, as transformers saves a CLIPModel folder: tokenizer.json and
processor_config.json), fp32, 2 threads: 64 captions (coco-mini's, padded to the longest) and 16 photos (coco-mini's
at their own size, about 640 x 480; without --data, smooth random pictures of that size); the zero-shot pipeline on
the 16 photos with CIFAR-10's 10 class names; the image tower alone as ``CLIPVisionModel`` with its hidden states, the
text tower as ``CLIPTextModel``, every block's attention map (``output_attentions``; transformers' with eager
attention, the only kind that gives them) and the image features at 336 pixels (``interpolate_pos_encoding``); the
Pillow image processor (``CLIPImageProcessorPil``) against transformers' default; SigLIP 2's NaFlex image processor
(``Siglip2ImageProcessor``, 256 patches of 16 pixels) against transformers' default.
With --data, how far clipforge's own preprocess and both image processors sit from transformers' pixels on 146 real
photos (at 224 pixels). Each part runs once to warm up, then ``--repeats`` interleaved rounds; medians. The
model parts take the same inputs in both libraries; the largest difference between their outputs is reported beside
the speed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from report import finish, machine


def _photos(data: str | None, n: int):
    import io
    import tarfile

    import numpy as np
    from PIL import Image, ImageFilter

    shard = Path(data or "") / "coco-mini" / "test" / "test-000000.tar"
    if data and shard.is_file():
        with tarfile.open(shard) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:n]
            return [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB") for m in members]
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (480, 640, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
            for _ in range(n)]


def _agreement_photos(data: str) -> list:
    """coco-mini's 79 photos at their own size and Flickr8k test's first 67 (short side 160): 146 in all."""
    import io
    import tarfile

    from PIL import Image

    photos = []
    for shard, n in (("coco-mini/test/test-000000.tar", 79), ("flickr8k/test/test-000000.tar", 67)):
        with tarfile.open(Path(data) / shard) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:n]
            photos += [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB") for m in members]
    return photos


def pixel_agreement(data: str, folder: Path) -> dict:
    """How far each way of preprocessing sits from transformers' own processor (transformers 5's default) on real
    photos: the largest difference in 8-bit levels and the share of values more than one level apart."""
    import torch
    import transformers

    from clipforge import transformers_api
    from clipforge.preprocess import Preprocess

    photos = _agreement_photos(data)
    theirs = transformers.CLIPImageProcessor.from_pretrained(folder)
    reference = theirs(images=photos, return_tensors="pt").pixel_values
    pillow = transformers_api.CLIPImageProcessorPil.from_pretrained(folder)
    tensor = transformers_api.CLIPImageProcessor.from_pretrained(folder)
    ways = {"clipforge.load's preprocess (open_clip's crop)": lambda: torch.stack([Preprocess(224)(p) for p in photos]),
            "CLIPImageProcessorPil (Pillow's resize)": lambda: pillow(photos).pixel_values,
            "CLIPImageProcessor (the 8-bit tensor resized)": lambda: tensor(photos).pixel_values}
    levels_per_unit = torch.tensor(theirs.image_std).view(1, 3, 1, 1) * 255
    report = {"photos": len(photos)}
    for way, pixels in ways.items():
        levels = (pixels() - reference).abs() * levels_per_unit
        report[way] = {"largest difference, 8-bit levels": round(float(levels.max()), 3),
                       "share more than one level apart": round(float((levels > 1.01).float().mean()), 5)}
    return report


def _folder(root: Path) -> Path:
    """A transformers CLIPModel folder written by transformers, from a clipforge ViT-B-32 with random weights."""
    import torch
    import transformers

    import clipforge
    from clipforge.convert import convert

    torch.manual_seed(0)
    clipforge.save_pretrained(clipforge.create_model("ViT-B-32").eval(), root / "ours")
    convert(str(root / "ours"), str(root / "converted"), to="hf")
    transformers.CLIPProcessor.from_pretrained(root / "converted").save_pretrained(root / "saved")
    transformers.CLIPModel.from_pretrained(root / "converted").save_pretrained(root / "saved")
    return root / "saved"


def main() -> None:
    import torch
    import transformers

    from clipforge import transformers_api
    from clipforge.bench.corpora import real_captions

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="the shared data folder (coco-mini's captions and photos)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    captions, photos = real_captions(args.data, args.texts), _photos(args.data, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _folder(Path(tmp))
        libraries = {"clipforge": transformers_api, "transformers": transformers}
        models = {k: lib.CLIPModel.from_pretrained(folder).eval() for k, lib in libraries.items()}
        processors = {k: lib.CLIPProcessor.from_pretrained(folder) for k, lib in libraries.items()}
        classifiers = {k: lib.pipeline("zero-shot-image-classification", model=str(folder), device="cpu")
                       for k, lib in libraries.items()}
        towers = {k: lib.CLIPVisionModel.from_pretrained(folder).eval() for k, lib in libraries.items()}
        eager = {k: lib.CLIPVisionModel.from_pretrained(folder, attn_implementation="eager").eval()
                 for k, lib in libraries.items()}  # transformers gives attention maps with eager attention only
        text_towers = {k: lib.CLIPTextModel.from_pretrained(folder).eval() for k, lib in libraries.items()}
        pillow = {"clipforge": transformers_api.CLIPImageProcessorPil.from_pretrained(folder),
                  "transformers": processors["transformers"].image_processor}  # its default, torchvision's resize
        naflex = {"clipforge": transformers_api.Siglip2ImageProcessor(),  # Google's settings: 256 patches of 16
                  "transformers": transformers.Siglip2ImageProcessor()}
        agreement = pixel_agreement(args.data, folder) if args.data else None
    inputs = processors["transformers"](text=captions, images=photos, return_tensors="pt", padding=True)
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def label_scores(results):  # each photo's scores in the labels' order
        return torch.tensor([[{r["label"]: r["score"] for r in rows}[label] for label in labels] for rows in results])

    texts = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask}
    large = torch.nn.functional.interpolate(inputs.pixel_values, size=(336, 336), mode="bilinear")

    def features(output):
        return getattr(output, "pooler_output", output)

    parts = {
        f"processor: {args.texts} captions": lambda k: processors[k](
            text=captions, return_tensors="pt", padding=True).input_ids,
        f"processor: {args.images} photos": lambda k: processors[k](
            images=photos, return_tensors="pt").pixel_values,
        f"image processor with Pillow (CLIPImageProcessorPil): {args.images} photos": lambda k: pillow[k](
            images=photos, return_tensors="pt").pixel_values,
        f"SigLIP 2's NaFlex image processor (Siglip2ImageProcessor): {args.images} photos": lambda k: naflex[k](
            images=photos, return_tensors="pt").pixel_values,
        f"get_image_features: {args.images} images": lambda k: features(
            models[k].get_image_features(pixel_values=inputs.pixel_values)),
        f"get_text_features: {args.texts} captions": lambda k: features(models[k].get_text_features(**texts)),
        f"end to end: processor + model({args.images} photos, {args.texts} captions)": lambda k: models[k](
            **processors[k](text=captions, images=photos, return_tensors="pt", padding=True)).logits_per_image,
        f"pipeline: {args.images} photos x {len(labels)} labels": lambda k: label_scores(classifiers[k](
            photos, candidate_labels=labels)),
        f"CLIPVisionModel hidden_states[-2] (LLaVA's features): {args.images} images": lambda k: towers[k](
            pixel_values=inputs.pixel_values, output_hidden_states=True).hidden_states[-2],
        f"CLIPTextModel last_hidden_state: {args.texts} captions": lambda k: text_towers[k](**texts).last_hidden_state,
        f"CLIPVisionModel attentions (every block's map; transformers' eager attention): {args.images} images":
            lambda k: torch.stack(eager[k](pixel_values=inputs.pixel_values, output_attentions=True).attentions),
        f"get_image_features at 336 pixels (interpolate_pos_encoding): {args.images} images": lambda k: features(
            models[k].get_image_features(pixel_values=large, interpolate_pos_encoding=True)),
    }
    report = {"machine": machine(args.threads), "transformers": transformers.__version__, "parts": {},
              "pixels against transformers' processor": agreement}
    print("pixels against transformers' processor:", agreement, flush=True)
    with torch.no_grad():
        for part, run in parts.items():
            outputs = {k: run(k) for k in libraries}  # warm-up
            seconds: dict = {k: [] for k in libraries}
            for _ in range(args.repeats):
                for k in libraries:
                    started = time.perf_counter()
                    run(k)
                    seconds[k].append(time.perf_counter() - started)
            medians = {k: statistics.median(v) for k, v in seconds.items()}
            a, b = outputs["transformers"], outputs["clipforge"]
            report["parts"][part] = {
                "seconds (median)": {k: round(v, 4) for k, v in medians.items()},
                "speed vs transformers": round(medians["transformers"] / medians["clipforge"], 2),
                "largest difference": float((a.float() - b.float()).abs().max())}
            print(part, report["parts"][part], flush=True)
    finish(report, args.json)


if __name__ == "__main__":
    main()
