"""SigLIP 2 NaFlex on CPU: clipforge vs transformers (Siglip2Model), the same weights in each.

    python benchmarks/siglip2_naflex.py [--repeats 7] [--batch 16] [--json out.json]

A random Siglip2Model of google/siglip2-base-patch16-naflex's image tower (768 wide, 12 layers, 16-pixel patches, 256
positions; a small text tower, which is not timed), saved and loaded by clipforge (no pretrained weights can be
downloaded here; speed does not depend on the values). Images of mixed aspect ratios (3:2, 2:3, 4:3, 16:9, 1:1, 1:3,
...) are preprocessed by transformers' Pillow processor and by ``NaFlexPreprocess`` (checked equal), and the batch is
embedded by each (features checked within 1e-4). Timed, taking turns (``bench.timing.interleaved``): preprocessing,
and image embedding of the padded, masked batch; beside it, what the mask and the varied grids cost clipforge: the
same batch without its mask (``clipforge_unmasked``) and a plain [N, 3, 256, 256] tensor, 256 tokens per image with
neither mask nor position resizing (``clipforge_square``). Medians and the median of adjacent-run ratios; fp32, the threads
torch is given.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipforge.bench.timing import interleaved, summary, without_grad
from clipforge.files import write_json

ASPECTS = [(333, 500), (500, 333), (480, 640), (360, 640), (512, 512), (900, 300), (300, 900), (427, 640)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args()
    import transformers
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    import clipforge
    from clipforge.preprocess import NaFlexPreprocess, naflex_batch

    work = Path(tempfile.mkdtemp(prefix="naflex-bench-"))
    small_text = dict(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                      num_attention_heads=12, bos_token_id=2, eos_token_id=1)
    config = transformers.Siglip2Config(text_config=small_text, vision_config=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        num_patches=256))
    torch.manual_seed(0)
    theirs = transformers.Siglip2Model(config).eval()
    theirs.save_pretrained(work / "hf")
    processor = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256)
    ours = clipforge.load(str(work / "hf"))[0]
    preprocess = NaFlexPreprocess.for_model(ours)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (*ASPECTS[i % len(ASPECTS)], 3), dtype=np.uint8))
              for i in range(args.batch)]
    their_batch = processor(images=images, return_tensors="pt")
    our_batch = naflex_batch([preprocess(image) for image in images])
    assert all(torch.equal(our_batch[k], v) for k, v in their_batch.items()), "preprocessing differs"
    with torch.no_grad():
        difference = (ours.encode_image(our_batch) - theirs.get_image_features(**their_batch).pooler_output).abs().max()
    assert difference < 1e-4, difference

    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
               "batch": args.batch, "patches_used": int(our_batch["pixel_attention_mask"].sum()),
               "max_feature_difference": float(difference)}
    results["preprocess"] = summary(interleaved({
        "clipforge": lambda: naflex_batch([preprocess(image) for image in images]),
        "transformers": lambda: processor(images=images, return_tensors="pt")}, args.repeats), len(images),
        "images_per_s")
    unmasked = {k: v for k, v in our_batch.items() if k != "pixel_attention_mask"}
    square = torch.randn(args.batch, 3, ours.image_size, ours.image_size)
    results["image_embed"] = summary(interleaved({
        "clipforge": without_grad(lambda: ours.encode_image(our_batch)),
        "transformers": without_grad(lambda: theirs.get_image_features(**their_batch)),
        "clipforge_unmasked": without_grad(lambda: ours.encode_image(unmasked)),
        "clipforge_square": without_grad(lambda: ours.encode_image(square))}, args.repeats), len(images),
        "images_per_s")
    print(json.dumps(results, indent=1))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
