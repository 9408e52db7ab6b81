"""transformers' output containers: ``Features`` (a tensor answering ``.pooler_output``), ``ModelOutput`` and
the model and tower outputs built on it, ``BatchEncoding``."""
from __future__ import annotations

import torch


class Features(torch.Tensor):
    """Projected features as transformers 4's ``get_*_features`` returned them (a tensor) that also answer
    transformers 5's ``.pooler_output``, where its ``BaseModelOutputWithPooling`` holds them. Operations on them give
    plain tensors, and ``torch.save`` stores a plain tensor (one ``torch.load(weights_only=True)`` reads)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def pooler_output(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


class ModelOutput(dict):
    """transformers' ``ModelOutput``: fields by attribute, key or position (the fields that are set, in order)."""

    fields: tuple[str, ...] = ()

    def __init__(self, **values):
        unknown = set(values) - set(self.fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        super().__init__((k, values[k]) for k in self.fields if values.get(k) is not None)

    def __getattr__(self, name: str):
        if name in self:
            return self[name]
        if name in self.fields:
            return None
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


class CLIPOutput(ModelOutput):
    """``CLIPModel``'s output: the contrastive ``loss`` (with ``return_loss``), ``logits_per_image`` [images, texts],
    ``logits_per_text`` [texts, images], the L2-normalised ``text_embeds`` and ``image_embeds``, and the towers' own
    outputs (``text_model_output``, ``vision_model_output``: ``model.text_model``'s and ``model.vision_model``'s)."""

    fields = ("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "text_model_output",
              "vision_model_output")


class BatchEncoding(dict):
    """A processor's or tokenizer's output (``input_ids``, ``attention_mask``, ``pixel_values``) by key or attribute;
    ``.to(device)`` moves every tensor, ``.to(dtype)`` casts the floating ones (pixels), as transformers' does."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no {name!r} in this batch (it has {', '.join(self) or 'nothing'})") from None

    def to(self, *args, **kwargs) -> "BatchEncoding":
        device = kwargs.get("device", next((a for a in args if not isinstance(a, torch.dtype)), None))

        def moved(value):
            if not torch.is_tensor(value):
                return value
            if value.is_floating_point():
                return value.to(*args, **kwargs)
            return value if device is None else value.to(device)  # ids and masks keep their integer type
        return BatchEncoding({k: moved(v) for k, v in self.items()})


class SiglipOutput(CLIPOutput):
    """``SiglipModel``'s output: ``CLIPOutput``'s fields, the logits with SigLIP's bias and its sigmoid loss."""


class BaseModelOutputWithPooling(ModelOutput):
    """A tower's output (``CLIPVisionModel``'s, ``CLIPTextModel``'s, the Siglip ones'): ``last_hidden_state`` and
    ``pooler_output`` as each class describes them; with ``output_hidden_states`` ``hidden_states``: the blocks'
    input and every block's output, as transformers counts them (``hidden_states[-2]``: the next-to-last block's,
    which LLaVA reads); with ``output_attentions`` ``attentions``: every block's attention map [N, heads, L, L]."""

    fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class _PooledOutput(BaseModelOutputWithPooling):
    """A tower's output from ``CLIPModel``'s forward without ``output_hidden_states`` / ``output_attentions``: the
    projected features as ``pooler_output``; the states were not computed, and asking for them says how to."""

    def __getattr__(self, name: str):
        if name == "last_hidden_state":
            raise AttributeError("last_hidden_state: CLIPModel's forward computes the towers' states with "
                                 "output_hidden_states=True (or output_attentions=True); model.vision_model(...) and "
                                 "model.text_model(...) give them too")
        return super().__getattr__(name)


class CLIPVisionModelOutput(ModelOutput):
    """``CLIPVisionModelWithProjection``'s output: the projected ``image_embeds`` beside the states."""

    fields = ("image_embeds", "last_hidden_state", "hidden_states", "attentions")


class CLIPTextModelOutput(ModelOutput):
    """``CLIPTextModelWithProjection``'s output: the projected ``text_embeds`` beside the states."""

    fields = ("text_embeds", "last_hidden_state", "hidden_states", "attentions")
