"""A trained LiMBer map loaded with the frozen image encoder and language model it was trained with: what every
command that uses a trained map (``caption generate|eval|classify|vqa``, ``serve --mapping``) starts from, and
its two uses on images: ``caption`` and ``answer``.
torch is imported when a map is loaded, not with this module: the CLI imports it at start-up."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from ..files import PathReferences

RANDOM_TOWER = "tower"  # a randomly initialised encoder is saved in the map's folder under this name


# limber.json names its encoder and LM as files.PathReferences of the map's folder records them (a tower saved
# beside the map is just "tower"); names that are not paths (a zoo name with @pretrained, "smollm2") as given.


def rebase_references(config, from_folder: str | Path, to_folder: str | Path) -> None:
    """A map's config (``limber.MappingConfig``) read from ``from_folder`` made right for saving into ``to_folder``:
    its encoder and LM paths recorded anew, so that a copy (e.g. the blind baseline's zeroed map) finds them too."""
    for field in ("clip", "lm"):
        value = getattr(config, field)
        named = PathReferences(from_folder).find(value)
        if named and not os.path.isabs(value):  # relative stays relative (absolute ones need nothing)
            setattr(config, field, os.path.relpath(named, PathReferences(to_folder).folder))


class Captioner(NamedTuple):
    mapping: object  # limber.ImageToPrefix
    encoder: object  # encoders.FrozenImageEncoder
    lm: object
    tokenizer: object

    @classmethod
    def load(cls, mapping_folder: str | Path, device: str = "cpu") -> "Captioner":
        """The map in ``mapping_folder`` (``caption train --output``), the encoder its ``limber.json`` names and its
        language model, on ``device``, in evaluation mode."""
        from .encoders import open_encoder
        from .limber import ImageToPrefix, load_language_model

        mapping = ImageToPrefix.load(mapping_folder).to(device).eval()
        spec, pretrained = mapping.config.clip, None
        if not spec:
            raise ValueError(f"{mapping_folder}: limber.json does not say which image encoder made the features")
        references = PathReferences(mapping_folder)
        found = references.find(spec)
        if found:
            spec = found
        elif "@" in spec:  # a zoo name and its pretrained tag
            spec, pretrained = spec.rsplit("@", 1)
        else:
            raise FileNotFoundError(
                f"{Path(mapping_folder) / 'limber.json'}: its image encoder {spec!r} is not there (read relative to "
                "the map's folder); put the tower back, or set \"clip\" to where it is now")
        encoder = open_encoder(spec, pretrained, device, mapping.config.features, mapping.config.prefix_tokens)
        lm_spec = mapping.config.lm or "smollm2"
        lm, tokenizer = load_language_model(references.find(lm_spec) or lm_spec)
        lm.to(device)
        return cls(mapping, encoder, lm.eval(), tokenizer)

    def caption(self, images: list, prompt: str | None = None, max_new_tokens: int = 24, num_beams: int = 1,
                repetition_penalty: float = 1.0) -> list[str]:
        """Captions of PIL images (``limber.generate``: greedy, or beam search with ``num_beams`` > 1); ``prompt``
        after the image prefix [the map's own training prompt]."""
        import torch

        from .limber import generate

        with torch.no_grad():
            features = self.encoder.features(images).to(self.mapping.proj.weight.device)
            return generate(self.mapping, self.lm, self.tokenizer, features, max_new_tokens, prompt, num_beams,
                            repetition_penalty)

    def answer(self, images: list, questions: list[str], max_new_tokens: int = 5) -> list[str]:
        """Greedy zero-shot answers, one question per PIL image, each asked as " Q: {question} A:" after its image
        (as ``caption vqa`` asks them); questions of different lengths are answered in one left-padded batch. Unlike
        ``caption vqa``, the LM may not end the text before its first token: a Flickr8k caption map, asked about
        photos, otherwise ends it at once for most of them (the map learned that captions end)."""
        import torch

        from .vqa import answer_batch

        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions: one question per image")
        with torch.no_grad():
            features = self.encoder.features(images)
            prompts = [(f, q, ()) for f, q in zip(features, questions)]  # no solved examples before it
            return answer_batch(self.mapping, self.lm, self.tokenizer, prompts, max_new_tokens, min_new_tokens=1)
