"""CoCa captioning on CPU: clipforge's ``generate`` vs open_clip's (greedy: ``generation_type="top_k", top_k=1``), the
same weights, and image embedding.

    python benchmarks/coca.py [--model coca_ViT-B-32] [--batch 8] [--length 30] [--repeats 5] [--json out.json]

open_clip's random initialisation (its decoder's vocabulary projection drawn, as open_clip leaves it empty), loaded
into clipforge; captions checked identical token for token, then both timed taking turns
(``bench.timing.interleaved``); fp32, the threads torch is given. Random weights rarely emit end-of-text, so every
caption runs to ``--length`` tokens: the most work a caption can take. open_clip 3.3 turns ``generate`` off when
transformers lacks ``BeamSearchScorer`` (transformers 5.x); its greedy path needs only the logits warpers, switched
back on here.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from clipforge.bench.timing import interleaved, summary
from clipforge.files import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="coca_ViT-B-32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=30, help="caption length in tokens, start and end included")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    import open_clip
    from open_clip import coca_model
    from transformers import TopKLogitsWarper

    import clipforge

    coca_model._has_transformers = True
    coca_model.GENERATION_TYPES["top_k"] = TopKLogitsWarper
    torch.manual_seed(0)
    theirs = open_clip.create_model(args.model, pretrained=None).eval()
    with torch.no_grad():
        vocabulary = theirs.text_decoder.text_projection
        torch.nn.init.normal_(vocabulary, std=vocabulary.shape[0] ** -0.5)
    path = Path(tempfile.mkdtemp(prefix="coca-bench-")) / "w.pt"
    torch.save(theirs.state_dict(), path)
    ours = clipforge.load(args.model, pretrained=str(path))[0]
    size = ours.image_size
    images = torch.randn(args.batch, 3, size, size)

    def generate_ours():
        return ours.generate(images, max_length=args.length)

    def generate_theirs():
        return theirs.generate(images, generation_type="top_k", top_k=1, seq_len=args.length)

    same = torch.equal(generate_ours(), generate_theirs())
    assert same, "captions differ"

    def embed(model):
        def run():
            with torch.no_grad():
                model.encode_image(images)
        return run

    result = {"model": args.model, "image_size": size, "batch": args.batch, "length": args.length,
              "captions_identical": same, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(),
              "generate": summary(interleaved({"clipforge": generate_ours, "open_clip": generate_theirs},
                                              args.repeats), args.batch, "captions_per_s"),
              "image_embed": summary(interleaved({"clipforge": embed(ours), "open_clip": embed(theirs)},
                                                 args.repeats), args.batch, "images_per_s")}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
