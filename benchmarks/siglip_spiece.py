"""SigLIP's SentencePiece tokenizer (Google's SigLIP repos: ``spiece.model``, no tokenizer.json) on CPU: clipforge's
(``spiece``: the model rebuilt in ``tokenizers``) against transformers' ``SiglipTokenizer`` (over ``sentencepiece``).

    python benchmarks/siglip_spiece.py [--data ../shared/data] [--repeats 5] [--json out.json]

The vocabulary is a Unigram model that ``sentencepiece`` trains on Flickr8k's training captions laid out as T5's
(NFKC, 8,000 pieces: Google's cannot be downloaded here), saved as ``SiglipTokenizer`` saves it. Two pairs, ids
checked identical first: what ``clipforge.load`` gives for such a folder (``HubTokenizer``: open_clip's
"canonicalize" cleaning, padded to 64) against open_clip's ``HFTokenizer`` on the same folder, and
``clipforge.transformers_api.AutoTokenizer`` against transformers' ``AutoTokenizer`` (``padding="max_length",
truncation=True``, as SigLIP is called). On 30,000 Flickr8k captions and 5,000 noisy web-style strings; medians and
the median of adjacent-run ratios (``bench.timing``).
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
from pathlib import Path

import torch

from clipforge.bench.corpora import flickr8k_captions, noisy_captions
from clipforge.bench.timing import interleaved, summary
from clipforge.files import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    import open_clip
    import sentencepiece
    import transformers

    from clipforge import transformers_api
    from clipforge.hub_tokenizer import HubTokenizer

    captions, noisy = flickr8k_captions(args.data, 30_000), noisy_captions(args.data, 5_000)
    if not captions:
        raise SystemExit(f"{args.data}: no Flickr8k training shards (the vocabulary and the corpus)")
    folder = Path(tempfile.mkdtemp(prefix="siglip-spiece-bench-"))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=8000, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    transformers.SiglipTokenizer(str(folder / "spiece.model")).save_pretrained(folder)

    ours_hub, theirs_hub = HubTokenizer(folder, 64, clean="canonicalize"), open_clip.tokenizer.HFTokenizer(
        str(folder), context_length=64, clean="canonicalize")
    ours_api, theirs_api = (transformers_api.AutoTokenizer.from_pretrained(folder),
                            transformers.AutoTokenizer.from_pretrained(folder))

    def api(tokenizer, texts):
        return tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")

    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "versions": {"open_clip": open_clip.__version__, "transformers": transformers.__version__,
                            "sentencepiece": sentencepiece.__version__}}
    for corpus_name, corpus in (("flickr8k", captions), ("noisy", noisy)):
        assert torch.equal(ours_hub(corpus), theirs_hub(corpus)), f"clipforge.load's ids differ on {corpus_name}"
        assert torch.equal(api(ours_api, corpus).input_ids, api(theirs_api, corpus).input_ids), \
            f"transformers_api's ids differ on {corpus_name}"
        runs = {"clipforge": lambda c=corpus: ours_hub(c), "open_clip": lambda c=corpus: theirs_hub(c)}
        results[f"load_{corpus_name}"] = summary(interleaved(runs, args.repeats), len(corpus), "captions_per_s")
        runs = {"clipforge": lambda c=corpus: api(ours_api, c), "transformers": lambda c=corpus: api(theirs_api, c)}
        results[f"transformers_api_{corpus_name}"] = summary(interleaved(runs, args.repeats), len(corpus),
                                                             "captions_per_s")
    print(json.dumps(results, indent=1))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
