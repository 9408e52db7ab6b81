"""What a training objective decides: the model, the config saved with it, what turns a sample's text into the
model's second input, the loss, and what the data stream pairs each image with.

- ``contrastive``: CLIP (or SigLIP), the zoo model and its tokenizer (a CoCa adds its captioning loss);
- ``bow`` / ``labels``: the image tower and a linear head over caption words, caption nouns or classes
  (``clipforge.bow``);
- ``classify``: a --pretrained CLIP fine-tuned from its zero-shot head (``clipforge.finetune``);
- ``self-supervised``: the image tower on two augmented views of each image (``clipforge.ssl``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..data.pipeline import caption_texts
from ..loss import create_loss
from ..tokenizer import get_tokenizer


@dataclass
class Objective:
    """What the objective decides: the model (None: the zoo model built from ``model_config``), the config saved
    with it, what turns texts into the model's second input, the loss, and what the data stream pairs each image
    with (``tokens``, ``labels`` or a second augmented view, ``views``)."""

    model: object
    model_config: dict
    tokenizer: object
    loss_fn: object
    targets: str = "tokens"


def objective_for(cfg, source, labels, model_config: dict, model=None, loss_fn=None) -> Objective:
    """``model_config``: the architecture the run's flags name (``train.loop.model_config_for``)."""
    if cfg.objective in ("bow", "labels"):
        model, tokenizer, loss_fn, model_config = _word_prediction(cfg, source, labels, model_config, model, loss_fn)
        return Objective(model, model_config, tokenizer, loss_fn, "labels" if labels.classnames else "tokens")
    if cfg.objective == "caption":
        model, tokenizer, loss_fn, model_config = _caption_lm(cfg, source, labels, model_config, model, loss_fn)
        return Objective(model, model_config, tokenizer, loss_fn, "tokens")
    if cfg.objective == "classify":
        model, loss_fn, model_config = _classifier(cfg, labels, model, loss_fn)
        return Objective(model, model_config, None, loss_fn, "labels")
    if cfg.objective == "self-supervised":
        model, model_config = _self_supervised(cfg, model_config, model)
        return Objective(model, model_config, None, loss_fn or create_loss("clip"), "views")
    return Objective(model, model_config, get_tokenizer(model_config), loss_fn or _contrastive_loss(cfg, model_config))


def _contrastive_loss(cfg, model_config: dict):
    """CLIP's or SigLIP's loss; for a CoCa (``multimodal_cfg``) with its captioning term beside it."""
    from ..loss import CoCaLoss

    loss = create_loss(cfg.loss, local_loss=cfg.local_loss, chunk_size=cfg.loss_chunk_size)
    names = ("coca_caption_loss_weight", "coca_contrastive_loss_weight")
    weights = tuple(getattr(cfg, name) for name in names)
    if "multimodal_cfg" not in model_config:
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        if weights != tuple(defaults[name] for name in names):
            raise ValueError("--coca-caption-loss-weight / --coca-contrastive-loss-weight weigh a CoCa's losses; "
                             f"{cfg.model} is not a CoCa (coca_* in clipforge models)")
        return loss
    if min(weights) < 0 or max(weights) == 0:
        raise ValueError(f"CoCa's loss weights must be >= 0 and not both 0 (caption {weights[0]}, contrastive "
                         f"{weights[1]})")
    return CoCaLoss(loss, caption_weight=weights[0], contrastive_weight=weights[1])


def _word_prediction(cfg, source, labels, model_config: dict, model, loss_fn):
    """(model, targets "tokenizer", loss, config to save) for ``--objective bow`` / ``labels``: an image tower and a
    linear head over a vocabulary read off the training data (its caption words, caption nouns, or class names),
    saved with the model (clipforge.bow)."""
    from ..bow import BagOfWordsLoss, BagOfWordsModel, LabelLoss, Vocabulary, word_counts

    if cfg.text_model or cfg.lock_text or cfg.text_cache or cfg.pretrained or \
            (labels.classnames and cfg.objective == "bow"):
        raise ValueError(f"--objective {cfg.objective} trains an image tower from scratch: no --text-model, "
                         "--lock-text, --text-cache or --pretrained (and bow no --label-captions)")
    captions = None
    if labels.classnames:  # labelled data: its classes, one per image
        vocabulary = Vocabulary(labels.classnames)
    else:
        kind = "nouns" if cfg.objective == "labels" else "words"
        captions = caption_texts(source, cfg.seed)
        vocabulary = Vocabulary.from_captions(captions, cfg.bow_vocab, kind)
    if not len(vocabulary):
        raise ValueError(f"--objective {cfg.objective}: the training captions hold no words to predict")
    config = {**{k: v for k, v in model_config.items() if k != "text_cfg"}, "objective": cfg.objective,
              "vocabulary": vocabulary.words, "vocabulary_kind": vocabulary.kind}
    if cfg.objective == "bow":  # zero-shot subtracts the captions' word prior (bow.zero_shot_logits): keep it
        config["word_counts"] = [int(n) for n in word_counts(vocabulary, captions).tolist()]
    loss = BagOfWordsLoss() if cfg.objective == "bow" else LabelLoss()
    return model or BagOfWordsModel(config, vocabulary), vocabulary, loss_fn or loss, config


def _caption_lm(cfg, source, labels, model_config: dict, model, loss_fn):
    """(model, targets "tokenizer", loss, config to save) for ``--objective caption``: an image tower and a causal
    decoder the size of the zoo model's text tower, predicting the training captions word by word
    (clipforge.caption_lm)."""
    from ..caption_lm import CONTEXT_LENGTH, CaptionLMModel, CaptionLoss, CaptionVocabulary

    if cfg.text_model or cfg.lock_text or cfg.text_cache or cfg.pretrained or labels.classnames:
        raise ValueError("--objective caption trains an image tower from scratch on captioned data: no --text-model, "
                         "--lock-text, --text-cache, --pretrained or --label-captions")
    vocabulary = CaptionVocabulary.from_captions(caption_texts(source, cfg.seed), cfg.bow_vocab)
    if not vocabulary.words:
        raise ValueError("--objective caption: the training captions hold no words to predict")
    text = model_config["text_cfg"]
    config = {**{k: v for k, v in model_config.items() if k != "text_cfg"}, "objective": "caption",
              "vocabulary": vocabulary.words, "decoder": {"width": text["width"], "layers": text["layers"],
                                                          "heads": text["heads"], "context_length": CONTEXT_LENGTH}}
    return model or CaptionLMModel(config, vocabulary), vocabulary, loss_fn or CaptionLoss(), config


def _self_supervised(cfg, model_config: dict, model):
    """(model, config to save) for ``--objective self-supervised``: two augmented views, no language (clipforge.ssl)."""
    from ..ssl import SelfSupervisedModel

    if cfg.text_model or cfg.lock_text or cfg.text_cache or cfg.pretrained or cfg.label_captions:
        raise ValueError("--objective self-supervised trains an image tower from scratch on images alone: no "
                         "--text-model, --lock-text, --text-cache, --pretrained or --label-captions")
    config = {**{k: v for k, v in model_config.items() if k != "text_cfg"}, "objective": "self-supervised"}
    return model or SelfSupervisedModel(config), config


def _classifier(cfg, labels, model, loss_fn):
    """(model, loss, config to save) for ``--objective classify``: the --pretrained CLIP with its zero-shot head
    for the training data's classes (clipforge.finetune)."""
    from ..finetune import ClassificationLoss, CLIPClassifier
    from ..inference import load_for_inference
    from ..prompts import DEFAULT_TEMPLATES

    if not cfg.pretrained or not labels.classnames:
        raise ValueError("fine-tuning (objective classify) needs --pretrained weights and labelled training data "
                         "(classnames.txt beside the shards)")
    if model is None:
        named = None if os.path.exists(cfg.pretrained) else cfg.model
        clip, _, tokenizer = load_for_inference(named, cfg.pretrained, device="cpu")
        model = CLIPClassifier.from_zero_shot(clip, labels.classnames, cfg.templates or list(DEFAULT_TEMPLATES),
                                              tokenizer)
        model.normalisation = getattr(clip, "normalisation", {})  # its images as its weights were trained on
    model.lock_text_tower()  # the head replaces the text tower; its weights are kept as they are
    if cfg.head_only:
        model.lock_all_but_head()
    return model, loss_fn or ClassificationLoss(), model.config
