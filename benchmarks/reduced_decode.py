"""Large JPEGs decoded reduced for embedding (libjpeg's DCT scaling, `embed`'s default) against decoding every pixel
(`embed --full-decode`, what open_clip's preprocess does): time per photo, end to end through `clipforge embed`,
and what it changes in a model's vectors.

    python benchmarks/reduced_decode.py runs/flickr8k/checkpoints/step-00002400 --json runs/bench/reduced-decode.json

Photos of a phone's size (4032 x 3024, JPEG quality 90) are mosaics of coco-mini's photos at their own resolution
(real detail at every pixel; each mosaic starts at another photo), written to a temporary folder. Timings: each
photo decoded and preprocessed for a 224-pixel model (ViT-B-32) and a 64-pixel one (the checkpoint's), medians over
the photos, beside open_clip's preprocess (torchvision) on the same files; and `clipforge embed` over the folder with
ViT-B-32 (random weights) and with the checkpoint, each way, runs interleaved. Accuracy: coco-mini at original size
through the checkpoint, each photo's vector against its full decode's (cosine), at reducing gaps 2, 3 (the default)
and 4, beside the same photo re-encoded at JPEG quality 95 and 90 (the noise a copy of the file brings); and
text->image / image->text recall on coco-mini's 396 captions each way.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from report import finish, machine, timed_command

REPO = Path(__file__).resolve().parents[1]
PHONE = (4032, 3024)


def phone_photos(folder: Path, photos: list, count: int) -> list[Path]:
    """``count`` JPEG mosaics of ``PHONE`` size from ``photos`` (PIL images) at their own resolution."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        canvas, x, y, row_height, k = Image.new("RGB", PHONE), 0, 0, 0, i
        while y < PHONE[1]:
            tile = photos[k % len(photos)]
            k += 1
            canvas.paste(tile, (x, y))
            x, row_height = x + tile.width, max(row_height, tile.height)
            if x >= PHONE[0]:
                x, y, row_height = 0, y + row_height, 0
        files.append(folder / f"photo{i:03d}.jpg")
        canvas.save(files[-1], quality=90)
    return files


def per_photo_ms(files: list[Path], transform) -> float:
    """Median milliseconds of ``transform(path)`` over the files (the second of two passes: files cached)."""
    times = []
    for attempt in range(2):
        times = []
        for path in files:
            started = time.perf_counter()
            transform(path)
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def decode_times(files: list[Path], checkpoint: str) -> dict:
    import clipforge
    from clipforge.preprocess import DECODE_GAP, Decoding, Preprocess, open_image

    report = {}
    small = clipforge.load(checkpoint)[1]
    for name, preprocess in (("ViT-B-32 (224 px)", Preprocess(224)), (f"checkpoint ({small.image_size} px)", small)):
        report[name] = {f"reduced, gap {gap}" + (" (default)" if gap == DECODE_GAP else ""): per_photo_ms(
            files, lambda p: preprocess(open_image(p, decoding=Decoding(gap * preprocess.image_size)))) for gap in (2, 3, 4)}
        report[name]["full"] = per_photo_ms(files, lambda p: preprocess(open_image(p)))
    try:
        import open_clip
        from PIL import Image

        peer = open_clip.image_transform(224, is_train=False)
        report["ViT-B-32 (224 px)"]["open_clip"] = per_photo_ms(files, lambda p: peer(Image.open(p)))
    except ImportError as exc:
        report["ViT-B-32 (224 px)"]["open_clip"] = f"not measured ({exc})"
    report["thumbnail 256 px"] = {
        "reduced": per_photo_ms(files, lambda p: open_image(p, decoding=Decoding(512)).convert("RGB").thumbnail((256, 256))),
        "full": per_photo_ms(files, lambda p: open_image(p).convert("RGB").thumbnail((256, 256)))}
    return report


def embed_times(folder: Path, work: Path, model_args: list[str], runs: int) -> dict:
    """Seconds of `clipforge embed` over ``folder`` by default and with --full-decode, interleaved."""
    times = {"reduced": [], "full": []}
    for run in range(runs):
        for way, extra in (("reduced", []), ("full", ["--full-decode"])):
            out = work / f"emb-{model_args[-1].replace('/', '-')}-{way}-{run}"
            seconds, _ = timed_command([sys.executable, "-m", "clipforge.cli", "embed", str(folder), str(out),
                                        *model_args, "--batch-size", "32", "--no-progress", *extra])
            times[way].append(round(seconds, 2))
    count = len(list(folder.glob("*.jpg")))
    return {**times, "photos": count,
            "photos_per_s": {way: round(count / statistics.median(t), 2) for way, t in times.items()},
            "speedup": round(statistics.median(times["full"]) / statistics.median(times["reduced"]), 2)}


def agreement(checkpoint: str, data: str) -> tuple[dict, dict]:
    """Cosine of each coco-mini photo's vector to its full decode's, each way; recall both ways."""
    import clipforge
    from PIL import Image

    from clipforge.data.sources import open_source
    from clipforge.preprocess import Decoding, open_image
    from clipforge.retrieval.collection import item_captions, item_image_bytes

    model, preprocess, tokenizer = clipforge.load(checkpoint)
    model.eval()
    items = open_source(data, shuffle_buffer=0).catalogue()
    raw = [item_image_bytes(item)[0] for item in items]
    captions = [item_captions(item) for item in items]

    @torch.no_grad()
    def vectors(images):
        return model.encode_image(torch.stack([preprocess(i.convert("RGB")) for i in images]), normalize=True).numpy()

    def reencoded(data: bytes, quality: int) -> bytes:
        out = io.BytesIO()
        open_image(data).convert("RGB").save(out, "JPEG", quality=quality)
        return out.getvalue()

    full = vectors([open_image(b) for b in raw])
    ways = {f"reduced, gap {gap}": vectors([open_image(b, decoding=Decoding(gap * preprocess.image_size)) for b in raw])
            for gap in (2, 3, 4)}
    ways.update({f"full decode of a quality {q} copy": vectors([open_image(reencoded(b, q)) for b in raw])
                 for q in (95, 90)})

    def phone_stored(data: bytes) -> bytes:
        """The photo as a phone stores a portrait shot: its pixels a quarter turn from upright, EXIF orientation 6."""
        exif, out = Image.Exif(), io.BytesIO()
        exif[0x0112] = 6
        open_image(data).convert("RGB").transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", quality=95,
                                                                                  exif=exif.tobytes())
        return out.getvalue()

    sideways = [phone_stored(b) for b in raw]
    ways["phone-stored, EXIF ignored (--full-decode)"] = vectors([open_image(b) for b in sideways])
    ways["phone-stored, default decoding (upright)"] = vectors(
        [open_image(b, decoding=Decoding.for_model(preprocess)) for b in sideways])
    cosines = {}
    for name, got in ways.items():
        cos = (got * full).sum(1)
        cosines[name] = {"min": round(float(cos.min()), 5), "p5": round(float(np.percentile(cos, 5)), 5),
                         "median": round(float(np.median(cos)), 6)}
    with torch.no_grad():
        texts = model.encode_text(tokenizer([c for cs in captions for c in cs]), normalize=True).numpy()
    owner = np.array([i for i, cs in enumerate(captions) for _ in cs])
    recall = {}
    for name, images in (("full decode", full), *ways.items()):
        scores = texts @ images.T
        t2i = (scores > scores[np.arange(len(owner)), owner][:, None]).sum(1)  # images ranked above the own one
        i2t = np.array([(scores[:, i] > scores[owner == i, i].max()).sum() for i in range(len(images))])
        recall[name] = {f"{way} R@{k}": round(100 * float((ranks < k).mean()), 2)
                        for way, ranks in (("text->image", t2i), ("image->text", i2t)) for k in (1, 5, 10)}
    return cosines, recall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a trained clipforge checkpoint (the accuracy rows and the small model)")
    p.add_argument("--coco", default=str(REPO.parent / "shared" / "data" / "coco-mini" / "test"))
    p.add_argument("--photos", type=int, default=160)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--accuracy-only", action="store_true", help="the vectors and recall, not the timings")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    from clipforge.data.sources import open_source
    from clipforge.preprocess import open_image
    from clipforge.retrieval.collection import item_image_bytes

    report = {"machine": machine(), "photo_size": list(PHONE)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        coco = [open_image(item_image_bytes(item)[0]).convert("RGB")
                for item in open_source(args.coco, shuffle_buffer=0).catalogue()]
        if not args.accuracy_only:
            files = phone_photos(work / "photos", coco, args.photos)
            report["per_photo_ms"] = decode_times(files, args.checkpoint)
            report["embed_vit_b_32"] = embed_times(work / "photos", work, ["--model", "ViT-B-32"], args.runs)
            report["embed_checkpoint"] = embed_times(work / "photos", work, ["--pretrained", args.checkpoint],
                                                     args.runs)
    report["cosine_to_full_decode"], report["coco_mini_recall"] = agreement(args.checkpoint, args.coco)
    finish(report, args.json)


if __name__ == "__main__":
    main()
