"""open_clip's timm image towers on CPU (LAION's ConvNeXt, EVA-CLIP, MobileCLIP's FastViT): clipforge's tower vs
open_clip's (timm), the same weights, image embedding.

    python benchmarks/timm_towers.py [--model convnext_base_w | EVA02-B-16 | MobileCLIP2-S0 | ...] [--batch 16]
        [--repeats 7] [--json out.json] [--profile]

open_clip's random initialisation (layer scales randomised so every block counts), loaded into clipforge; features
checked equal, then both timed taking turns (``bench.timing.interleaved``); fp32, the threads torch is given. A tower
with re-parameterisable branches (FastViT's) is also timed as timm's ``reparameterize_model`` leaves it
(``open_clip_reparameterized``: what Apple's MobileCLIP code runs for inference).
``--profile`` also prints where clipforge's time goes in one batch (torch.profiler, by operator).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
from pathlib import Path

import torch

from clipforge.bench.timing import interleaved, summary
from clipforge.files import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnext_base_w")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json")
    p.add_argument("--profile", action="store_true", help="print clipforge's time per operator for one batch")
    args = p.parse_args()
    import open_clip

    import clipforge

    torch.manual_seed(0)
    theirs = open_clip.create_model(args.model, pretrained=None).eval()
    reparameterizable = any(hasattr(module, "reparameterize") for module in theirs.modules())
    # timm starts layer scales at 1e-6 (ConvNeXt) or 1e-5 (FastViT): randomised so that every block counts. FastViT's
    # 40-odd blocks at unit scale would grow activations to 1e4, where fp32 rounding alone (timm's own
    # re-parameterised model's too) moves the features by a percent: a tenth of it there.
    low, high = (0.05, 0.15) if reparameterizable else (0.5, 1.5)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(low, high)
    path = Path(tempfile.mkdtemp(prefix="timm-tower-bench-")) / "w.pt"
    torch.save(theirs.state_dict(), path)
    ours = clipforge.load(args.model, pretrained=str(path))[0]
    size = ours.image_size
    images = torch.randn(args.batch, 3, size, size)
    with torch.no_grad():
        difference = (ours.encode_image(images[:2]) - theirs.encode_image(images[:2])).abs().max().item()
    assert difference < 1e-4, difference

    def timed(model):
        def run():
            with torch.no_grad():
                model.encode_image(images)
        return run

    contestants = {"clipforge": timed(ours), "open_clip": timed(theirs)}
    if reparameterizable:
        from timm.utils.model import reparameterize_model

        fused = reparameterize_model(copy.deepcopy(theirs)).eval()
        contestants["open_clip_reparameterized"] = timed(fused)
    result = {"model": args.model, "image_size": size, "batch": args.batch, "max_abs_difference": difference,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "image_embed": summary(interleaved(contestants, args.repeats), args.batch, "images_per_s")}
    print(json.dumps(result, indent=1))
    if args.profile:
        with torch.no_grad(), torch.profiler.profile() as prof:
            ours.encode_image(images)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
