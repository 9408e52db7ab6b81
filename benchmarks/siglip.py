"""SigLIP on CPU: clipforge vs open_clip (timm image tower) vs transformers (SiglipModel), the same weights in each.

    python benchmarks/siglip.py [--data ../shared/data] [--repeats 5] [--json out.json]

ViT-B-16-SigLIP with open_clip's random initialisation, converted to clipforge and to a transformers folder (no
pretrained SigLIP can be downloaded here; speed does not depend on the values). Features are checked equal first.
Timed, implementations taking turns (``bench.timing.interleaved``): image embedding (224 px, batch 32), text embedding
(64 tokens, batch 128), and tokenizing Flickr8k's human captions with a SentencePiece (Unigram) vocabulary trained on
them, since Google's T5 vocabulary cannot be downloaded: clipforge's ``HubTokenizer`` against open_clip's
``HFTokenizer`` (both clean with "canonicalize", then run the same tokenizer.json). Medians and the median of
adjacent-run ratios; fp32, the threads torch is given.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from clipforge.bench.corpora import flickr8k_captions, noisy_captions
from clipforge.bench.timing import interleaved, summary, without_grad
from clipforge.files import write_json


def make_tokenizer(folder: Path, corpus: list[str], vocab_size: int = 8000) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                                            special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="</s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--bf16", action="store_true", help="also time clipforge with bf16 weights (CPUs that multiply "
                   "bf16 natively: AMX / AVX512-BF16), as `--precision bf16` runs it, and its features' cosine to fp32")
    args = p.parse_args()
    import open_clip
    import transformers

    import clipforge
    from clipforge.checkpoint import hf
    from clipforge.hub_tokenizer import HubTokenizer

    work = Path(tempfile.mkdtemp(prefix="siglip-bench-"))
    captions = flickr8k_captions(args.data, 30_000)
    noisy = noisy_captions(args.data, 5_000)
    make_tokenizer(work / "tokenizer", captions)
    torch.manual_seed(0)
    theirs = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
    torch.save(theirs.state_dict(), work / "w.pt")
    ours = clipforge.load_model("ViT-B-16-SigLIP", pretrained=str(work / "w.pt")).eval()
    ours.config["text_cfg"]["hf_tokenizer_name"] = str(work / "tokenizer")
    hf.save(ours, work / "hf")
    hf_model = transformers.SiglipModel.from_pretrained(work / "hf").eval()

    images = torch.randn(32, 3, 224, 224)
    tokenizer = HubTokenizer(work / "tokenizer", 64)
    tokens = tokenizer(captions[:128])
    with torch.no_grad():
        reference = ours.encode_image(images[:4]), ours.encode_text(tokens[:8])
        for name, image_fn, text_fn in (
                ("open_clip", theirs.encode_image, theirs.encode_text),
                ("transformers", lambda x: hf_model.get_image_features(pixel_values=x).pooler_output,
                 lambda t: hf_model.get_text_features(input_ids=t).pooler_output)):
            diffs = ((image_fn(images[:4]) - reference[0]).abs().max().item(),
                     (text_fn(tokens[:8]) - reference[1]).abs().max().item())
            assert max(diffs) < 1e-4, (name, diffs)

    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                            "transformers": transformers.__version__}}
    image_runs = {"clipforge": without_grad(lambda: ours.encode_image(images)),
                  "open_clip": without_grad(lambda: theirs.encode_image(images)),
                  "transformers": without_grad(lambda: hf_model.get_image_features(pixel_values=images))}
    if args.bf16:
        import copy

        ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
        image_runs["bf16"] = without_grad(lambda: ours_bf16.encode_image(images))
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(ours_bf16.encode_image(images[:8]).float(),
                                                           ours.encode_image(images[:8]), dim=-1)
        results["bf16_min_cosine_to_fp32"] = cosine.min().item()
    results["image_embed"] = summary(interleaved(image_runs, args.repeats), len(images), "images_per_s")
    text_runs = {"clipforge": without_grad(lambda: ours.encode_text(tokens)),
                 "open_clip": without_grad(lambda: theirs.encode_text(tokens)),
                 "transformers": without_grad(lambda: hf_model.get_text_features(input_ids=tokens))}
    results["text_embed"] = summary(interleaved(text_runs, args.repeats), len(tokens), "texts_per_s")
    theirs_tokenizer = open_clip.tokenizer.HFTokenizer(str(work / "tokenizer"), context_length=64, clean="canonicalize")
    for corpus_name, corpus in (("flickr8k", captions), ("noisy", noisy)):
        assert torch.equal(tokenizer(corpus), theirs_tokenizer(corpus)), f"ids differ on {corpus_name}"
        runs = {"clipforge": lambda c=corpus: tokenizer(c), "open_clip": lambda c=corpus: theirs_tokenizer(c)}
        results[f"tokenizer_{corpus_name}"] = summary(interleaved(runs, args.repeats), len(corpus), "captions_per_s")
    print(json.dumps(results, indent=1))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
