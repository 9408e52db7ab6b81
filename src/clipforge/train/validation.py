"""Validation during training: retrieval recall on held-out pairs, zero-shot accuracy when they are labelled, and
zero-shot accuracy on labelled data sets of their own (``--zeroshot-data``, open_clip's ``--imagenet-val``)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..data import evaluation_set, open_source
from ..data.sources import folder_classnames, source_classnames
from ..evaluate.metrics import top1_top5
from ..loss import linear_cross_entropy
from ..preprocess import Preprocess, image_batch
from ..prompts import DEFAULT_TEMPLATES
from ..zeroshot import zero_shot_classifier


PRIOR_IMAGES = 256  # training images over which a word-by-word model's prompt prior is averaged at validation


def open_validation(cfg, val_source, image_size: int, label_templates: list[str] | None, train_source=None,
                    labels=None, preprocess_cfg: dict | None = None):
    """(the fixed validation set, zero-shot templates) or (None, None). Labelled validation data (classnames.txt
    beside the shards) gets zero-shot accuracy besides retrieval, whether or not training uses label captions;
    ``preprocess_cfg``: a --pretrained model's own image preprocessing (``Preprocess`` arguments);
    samples without text are captioned from their label. For ``--objective caption`` the first ``PRIOR_IMAGES``
    usable images of ``train_source`` (decoded as training decodes them, by ``labels``) come along: zero-shot
    subtracts each prompt's mean likelihood over them (``caption_lm.prompt_log_prior``)."""
    if val_source is None and not cfg.val_data:
        return None, None
    preprocess = Preprocess(image_size, **(preprocess_cfg or {}))  # a --pretrained model's own, else OpenAI's
    source = val_source if val_source is not None else open_source(
        cfg.val_data, shuffle_buffer=0, csv_keys=cfg.csv_keys(), classnames=folder_classnames(cfg.val_data, False))
    classnames = source_classnames(source)
    templates = label_templates  # --label-captions FILE: the same prompts caption and classify
    val_set = evaluation_set(source, preprocess, cfg.val_samples, classnames, templates,
                             bool(cfg.label_captions and classnames), seed=cfg.seed, compact=True)
    if not val_set.images:
        raise ValueError(f"validation data {cfg.val_data or source!r} has no usable samples "
                         f"(skipped: {dict(val_set.skipped) or 'none'}); labelled shards need classnames.txt "
                         "beside the split folder")
    if cfg.objective == "caption" and val_set.labels is not None and train_source is not None:
        val_set.prior_images = _prior_images(cfg, train_source, labels, preprocess)
    return val_set, templates or list(DEFAULT_TEMPLATES)


def _prior_images(cfg, train_source, labels, preprocess):
    """The first ``PRIOR_IMAGES`` usable training images, decoded as training decodes them (a word-by-word model's
    prompt prior is averaged over them)."""
    return evaluation_set(train_source, preprocess, PRIOR_IMAGES, labels.classnames, labels.templates,
                          bool(labels.classnames), seed=cfg.seed, compact=True).images


@dataclass
class ZeroShotSet:
    """One ``--zeroshot-data`` set: its name (the metrics' prefix), its labelled images and its prompt templates."""
    name: str
    samples: object  # an EvaluationSet (its captions made from the labels)
    templates: list[str]


def open_zero_shot_sets(cfg, image_size: int, preprocess_cfg: dict | None = None, train_source=None, labels=None,
                        val_set=None) -> list[ZeroShotSet]:
    """Each ``cfg.zeroshot_data`` root's ``cfg.zeroshot_split`` (any layout ``clipforge eval`` reads), its first
    ``cfg.val_samples`` usable images, with its own templates (a templates file beside it or the shipped set of its
    name, as ``clipforge eval zeroshot`` picks them; else "a photo of a {}.")."""
    from ..evaluate.datasets import open_labelled

    if not cfg.zeroshot_data:
        return []
    preprocess = Preprocess(image_size, **(preprocess_cfg or {}))
    prior = None
    if cfg.objective == "caption" and train_source is not None:  # one prior sample for every set
        prior = getattr(val_set, "prior_images", None) or _prior_images(cfg, train_source, labels, preprocess)
    sets, names = [], set()
    for root in cfg.zeroshot_data:
        dataset = open_labelled(root, cfg.zeroshot_split)
        samples = evaluation_set(dataset.source, preprocess, cfg.val_samples, dataset.classnames, None, True,
                                 seed=cfg.seed, compact=True)
        if samples.labels is None:
            raise ValueError(f"--zeroshot-data {root}: no usable labelled samples in split {cfg.zeroshot_split!r} "
                             f"(skipped: {dict(samples.skipped) or 'none'})")
        samples.prior_images = prior
        name, n = dataset.name, 1
        while name in names:  # two roots of one name (e.g. two "test" folders): the metrics stay apart
            n += 1
            name = f"{dataset.name}-{n}"
        names.add(name)
        sets.append(ZeroShotSet(name, samples, dataset.templates or list(DEFAULT_TEMPLATES)))
    return sets


def zero_shot_metrics(model, tokenizer, sets: list[ZeroShotSet], device, autocast=nullcontext()) -> dict:
    """``{"<set>/zeroshot_top1": ..., "<set>/zeroshot_top5": ...}`` for each set (a word-by-word model's
    ``zeroshot_plain_*`` too), by the same rules as ``validate``'s zero-shot."""
    metrics = {}
    for zs in sets:
        found = validate(model, tokenizer, zs.samples, device, autocast, zs.templates, zero_shot_only=True)
        metrics.update({f"{zs.name}/{k}": v for k, v in found.items()})
    return metrics


@torch.no_grad()
def validate(model, tokenizer, val_set, device, autocast=nullcontext(), templates=DEFAULT_TEMPLATES,
             zero_shot_only: bool = False) -> dict:
    """Retrieval recall@1/5/10 both ways over ``val_set``'s pairs (``class_*``: by class, when the captions were made
    from class names), and zero-shot top-1/top-5 when it is labelled; ``zero_shot_only``: the zero-shot figures
    alone (a labelled set's captions are not embedded or scored)."""
    from ..evaluate.retrieval import embed_pairs, retrieval_metrics

    from ..bow import BagOfWordsModel
    from ..caption_lm import CaptionLMModel
    from ..finetune import CLIPClassifier

    if isinstance(model, BagOfWordsModel):
        return validate_bag_of_words(model, val_set, device, autocast, zero_shot_only=zero_shot_only)
    if isinstance(model, CaptionLMModel):
        return validate_caption_lm(model, val_set, device, autocast, templates, zero_shot_only=zero_shot_only)
    if isinstance(model, CLIPClassifier):
        return validate_classifier(model, val_set, device, autocast)
    if not hasattr(model, "encode_text"):  # a self-supervised tower: nothing language-side to validate
        return {}
    was_training = model.training
    model.eval()
    with autocast:
        images, texts = embed_pairs(model, tokenizer, val_set.images, [] if zero_shot_only else val_set.captions,
                                    device=device)
        if zero_shot_only:
            metrics = {}
        elif val_set.captions_from_labels:  # "a photo of a cat" describes every cat: any same-class item is a hit
            same_class = val_set.labels[val_set.caption_images][:, None] == val_set.labels[None, :]
            metrics = {f"class_{k}": v for k, v in retrieval_metrics(images, texts, None, positives=same_class).items()}
        else:  # the standard protocol: image->text hits when any of the image's captions ranks in the top k
            metrics = retrieval_metrics(images, texts, val_set.caption_images)
        if val_set.labels is not None:
            weights = zero_shot_classifier(model, tokenizer, val_set.classnames, templates, device=device)
            logits = images @ weights.float().cpu()
            metrics.update(top1_top5(logits, val_set.labels, "zeroshot_top"))
        if hasattr(model, "caption_states") and not val_set.captions_from_labels and not zero_shot_only:  # CoCa: its decoder too
            metrics["caption_loss"] = coca_caption_loss(model, tokenizer, val_set, device)
    model.train(was_training)
    return metrics


@torch.no_grad()
def coca_caption_loss(model, tokenizer, val_set, device, batch_size: int = 64) -> float:
    """A CoCa's held-out captioning loss: the mean cross-entropy per caption token (after the first, padding left
    out) over every caption of every image, as its training term is computed (``CoCa.caption_states``)."""
    owners = torch.as_tensor(val_set.caption_images)
    total, count = 0.0, 0
    for start in range(0, len(val_set.images), batch_size):
        images = torch.stack(val_set.images[start:start + batch_size]).to(device)
        image_tokens = model.visual.forward_tokens(images.to(next(model.visual.parameters()).dtype))[1]
        rows = ((owners >= start) & (owners < start + len(images))).nonzero().flatten()
        for chunk in rows.split(batch_size):  # up to batch_size captions through the decoder at a time
            tokens = tokenizer([val_set.captions[i] for i in chunk.tolist()]).to(device)
            states, labels = model.caption_states(image_tokens[(owners[chunk] - start).to(device)],
                                                  model.text.forward_tokens(tokens)[1], tokens)
            total += linear_cross_entropy(states, model.text_decoder.text_projection, labels).item()
            count += len(labels)
    return total / max(1, count)


@torch.no_grad()
def validate_bag_of_words(model, val_set, device, autocast=nullcontext(), batch_size: int = 256,
                          zero_shot_only: bool = False) -> dict:
    """Held-out loss of predicting each caption's words (every caption of every image), and zero-shot top-1/top-5
    from the class names' words when the set is labelled (less the training captions' word prior, when saved)."""
    from ..bow import BagOfWordsLoss, LabelLoss, zero_shot_logits

    was_training = model.training
    model.eval()
    with autocast:
        log_probs = torch.cat([model.word_log_probs(torch.stack(val_set.images[i:i + batch_size]).to(device)).cpu()
                               for i in range(0, len(val_set.images), batch_size)])
    if zero_shot_only:
        metrics = {}
    elif model.config.get("objective") == "bow":
        metrics = {"bow_loss": BagOfWordsLoss()(log_probs[val_set.caption_images],
                                                model.vocabulary(val_set.captions)).item()}
    elif model.vocabulary.kind == "nouns":  # log-sigmoids back to logits: held-out multi-label loss
        logits = log_probs - torch.log1p(-log_probs.exp().clamp(max=1 - 1e-6))
        metrics = {"label_loss": LabelLoss()(logits[val_set.caption_images], model.vocabulary(val_set.captions)).item()}
    else:
        metrics = {}
    if val_set.labels is not None:
        logits = zero_shot_logits(log_probs, model.vocabulary, val_set.classnames, prior=model.word_log_prior)
        metrics.update(top1_top5(logits, val_set.labels, "zeroshot_top"))
    model.train(was_training)
    return metrics


@torch.no_grad()
def validate_caption_lm(model, val_set, device, autocast=nullcontext(), templates=DEFAULT_TEMPLATES,
                        batch_size: int = 256, zero_shot_only: bool = False) -> dict:
    """Held-out loss of predicting every caption of every image word by word, and zero-shot top-1/top-5 from each
    class prompt's likelihood when the set is labelled: less the prompts' prior over the training images the set
    carries (``zeroshot_*``; else the plain likelihood), and plainly (``zeroshot_plain_*``, which names one class
    for nearly every image)."""
    from ..caption_lm import prompt_log_prior, zero_shot_logits

    was_training = model.training
    model.eval()
    with autocast:
        embeddings = _encode_images(model, val_set.images, device, batch_size)
        metrics = {} if zero_shot_only else {"caption_loss": _caption_lm_loss(model, val_set, embeddings, batch_size)}
        if val_set.labels is not None:
            logits = zero_shot_logits(model, embeddings, val_set.classnames, templates)
            if getattr(val_set, "prior_images", None):
                metrics.update(top1_top5(logits, val_set.labels, "zeroshot_plain_top"))
                references = _encode_images(model, val_set.prior_images, device, batch_size)
                # as zero_shot_logits(prior=...), without scoring every prompt on the validation images again
                logits = logits - prompt_log_prior(model, references, val_set.classnames, templates)
            metrics.update(top1_top5(logits, val_set.labels, "zeroshot_top"))
    model.train(was_training)
    return metrics


def _caption_lm_loss(model, val_set, embeddings: torch.Tensor, batch_size: int) -> float:
    """The held-out loss per predicted word (and <eos>) of every caption of every image."""
    import torch.nn.functional as F

    from ..caption_lm import PAD

    tokens, owners = model.vocabulary(val_set.captions).to(embeddings.device), torch.as_tensor(val_set.caption_images)
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        rows, targets = tokens[i:i + batch_size], tokens[i:i + batch_size, 1:]
        logits = model.next_word_logits(embeddings[owners[i:i + batch_size]], rows)
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD,
                                 reduction="sum").item()
        count += int(targets.ne(PAD).sum())
    return total / max(1, count)


def _encode_images(model, images: list, device, batch_size: int) -> torch.Tensor:
    return torch.cat([model.encode_image(image_batch(images[i:i + batch_size], device))
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def validate_classifier(model, val_set, device, autocast=nullcontext(), batch_size: int = 256) -> dict:
    """Top-1/top-5 of a fine-tuned model's head on the labelled validation images."""
    if val_set.labels is None:
        raise ValueError("validating a classifier needs labelled validation data (classnames.txt beside it)")
    was_training = model.training
    model.eval()
    with autocast:
        logits = torch.cat([model.classify(torch.stack(val_set.images[i:i + batch_size]).to(device)).float().cpu()
                            for i in range(0, len(val_set.images), batch_size)])
    model.train(was_training)
    return top1_top5(logits, val_set.labels, "top")
