"""A trained LiMBer map loaded with the frozen image encoder and language model it was trained with: what every
command that uses a trained map (``caption generate|eval|classify|vqa``, ``serve --mapping``) starts from, and
its two uses on images: ``caption`` and ``answer``.
torch is imported when a map is loaded, not with this module: the CLI imports it at start-up."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

RANDOM_TOWER = "tower"  # a randomly initialised encoder is saved in the map's folder under this name


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
        if spec == RANDOM_TOWER:
            spec = str(Path(mapping_folder) / RANDOM_TOWER)
        elif "@" in spec and not Path(spec).exists():
            spec, pretrained = spec.rsplit("@", 1)
        encoder = open_encoder(spec, pretrained, device, mapping.config.features, mapping.config.prefix_tokens)
        lm, tokenizer = load_language_model(mapping.config.lm or "smollm2")
        lm.to(device)
        return cls(mapping, encoder, lm.eval(), tokenizer)

    def caption(self, images: list, prompt: str | None = None, max_new_tokens: int = 24) -> list[str]:
        """Greedy captions of PIL images; ``prompt`` after the image prefix [the map's own training prompt]."""
        import torch

        from .limber import generate

        with torch.no_grad():
            features = self.encoder.features(images).to(self.mapping.proj.weight.device)
            return generate(self.mapping, self.lm, self.tokenizer, features, max_new_tokens, prompt)

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
