"""``CLIPModel``, ``SiglipModel``, ``Siglip2Model`` and ``AutoModel`` over a clipforge ``CLIP``: features, logits,
loss and the towers' outputs as transformers gives them."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..models.clip import CLIP
from .configuration import _Config
from .loading import _load_clip
from .outputs import BaseModelOutputWithPooling, CLIPOutput, Features, SiglipOutput, _PooledOutput

if TYPE_CHECKING:  # the towers' module builds on this one
    from .towers import CLIPTextModel, CLIPVisionModel


class CLIPModel(torch.nn.Module):
    """transformers' ``CLIPModel`` over a clipforge ``CLIP`` (``self.clip``): ``from_pretrained`` reads what
    ``clipforge.load`` reads (transformers' folders and hub repos, open_clip's, OpenAI's, clipforge's); the state
    dict is clipforge's, under ``clip.``, and ``save_pretrained`` writes a folder transformers loads."""

    def __init__(self, clip: CLIP):
        super().__init__()
        if not isinstance(clip, CLIP):
            raise TypeError(f"CLIPModel wraps a clipforge CLIP model, not a {type(clip).__name__}")
        self.clip = clip

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype=None, torch_dtype=None, device_map=None,
                        **kwargs) -> "CLIPModel":
        """A folder, a hub repo (``OWNER/NAME``, fetched once into clipforge's cache, or ``cache_dir``; nothing
        fetched with ``local_files_only``) or a checkpoint file. ``dtype`` (``torch_dtype``): float32 unless given
        ("auto" keeps float32: the weights are read into clipforge's float32 model). ``device_map``: a device, or
        "auto" (a GPU where there is one)."""
        clip = _load_clip(name_or_path, dtype if dtype is not None else torch_dtype, device_map, kwargs)
        model_class = AutoModel.model_class(clip)
        if model_class is not cls and cls is not AutoModel:
            raise ValueError(f"{name_or_path}: a {model_class.__name__[:-5]} model; load it with "
                             f"{model_class.__name__}.from_pretrained")
        return model_class(clip).eval()

    @property
    def config(self) -> _Config:
        """transformers' config for this model (``CLIPConfig``'s keys, or ``SiglipConfig``'s); one that neither
        can hold (a Hugging Face text encoder, a ResNet) is named."""
        from ..checkpoint.hf import config_from_clipforge

        return _Config(config_from_clipforge(self.clip.config, float(self.clip.logit_scale.detach())))

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.visual.parameters()).dtype

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        return self.clip.logit_scale

    @property
    def vision_model(self) -> CLIPVisionModel:
        """transformers' ``model.vision_model``: the image tower's states (``last_hidden_state``, the post-norm
        ``pooler_output``, ``hidden_states``, ``attentions``), sharing this model's weights."""
        return _tower_classes(self)[0](self.clip)

    @property
    def text_model(self) -> CLIPTextModel:
        """transformers' ``model.text_model``: the text transformer's states, sharing this model's weights."""
        return _tower_classes(self)[1](self.clip)

    @property
    def visual_projection(self) -> "Projection":
        """transformers' ``model.visual_projection``: the image tower's pooled state to the joint space."""
        return Projection(self.clip.visual.proj)

    @property
    def text_projection(self) -> "Projection":
        return Projection(self.clip.text.text_projection)

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> None:
        """A transformers ``CLIPModel`` folder (``config.json``, ``model.safetensors``, the tokenizer and processor
        files), as ``clipforge convert --to hf`` writes it."""
        from ..checkpoint import hf

        if set(kwargs) - {"safe_serialization"} or not kwargs.get("safe_serialization", True):
            raise TypeError("save_pretrained writes safetensors; other options are not built here")
        hf.save(self.clip, folder)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, **kwargs) -> Features:
        """The projected text features [N, D], not normalised."""
        _refuse(kwargs, position_ids=position_ids)
        text = self.clip.text
        if attention_mask is not None and not bool(attention_mask.all()):
            if not hasattr(text, "features_masked"):
                raise ValueError("attention_mask masks padding, which this model's text tower (a Hugging Face "
                                 "encoder) is not given here: pass input_ids alone")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                                 f"{tuple(input_ids.shape)}")
            if not text.causal:  # SigLIP's: every position would see the padding; transformers hides it
                return text.features_masked(input_ids, attention_mask).as_subclass(Features)
            _check_right_padded(input_ids, attention_mask, text)
        return self.clip.encode_text(input_ids).as_subclass(Features)

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                           **kwargs) -> Features:
        """The projected image features [N, D], not normalised. ``interpolate_pos_encoding``: images of another size
        than the model's, its position grid resized to theirs as transformers resizes it (bicubic)."""
        _refuse(kwargs)
        if not interpolate_pos_encoding:
            return self.clip.encode_image(pixel_values).as_subclass(Features)
        tower = _positioned_tower(self.clip)
        return tower(_pixels_for(tower, pixel_values), interpolate_positions=True).as_subclass(Features)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_loss: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, interpolate_pos_encoding: bool = False,
                **kwargs) -> CLIPOutput:
        """Both towers, their normalised embeddings and the scaled cosine similarities (the temperature unclamped,
        as transformers'); ``return_loss``: CLIP's symmetric cross-entropy over the batch's pairs. The towers'
        outputs, ``vision_model_output`` and ``text_model_output``, as transformers 5 gives them: the projected
        features as ``pooler_output`` (transformers 4's was the tower's own: ``model.vision_model(...)`` gives it)
        and, with ``output_hidden_states`` / ``output_attentions``, ``last_hidden_state``, ``hidden_states`` and
        ``attentions``. Without either, the last blocks run for the pooled token alone (about a tenth less work):
        reading ``last_hidden_state`` then names the flag to pass."""
        return self._forward({"pixel_values": pixel_values, "interpolate_pos_encoding": interpolate_pos_encoding},
                             input_ids, attention_mask, position_ids, return_loss,
                             {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions},
                             kwargs)

    def _forward(self, image_inputs: dict, input_ids, attention_mask, position_ids, return_loss, asked: dict,
                 kwargs: dict) -> CLIPOutput:
        """``forward`` for the image inputs each model takes (``get_image_features``' keywords)."""
        if input_ids is None or image_inputs["pixel_values"] is None:
            raise ValueError(f"{type(self).__name__}'s forward takes both input_ids and pixel_values; "
                             "get_text_features and get_image_features take one")
        _refuse(kwargs)
        if any(asked.values()):  # a tower that is not transformers' kind (a ResNet, a BERT) is named here
            vision_model, text_model = self.vision_model, self.text_model
            # as transformers 5 gives them: each tower's states with its projected features as pooler_output
            # (transformers 4's was the tower's own, unprojected: model.vision_model(...) gives that)
            vision_output = vision_model(**image_inputs, **asked)
            text_output = text_model(input_ids, attention_mask, position_ids, **asked)
            image_features, text_features = vision_model.embeds(vision_output), text_model.embeds(text_output)
            vision_output = BaseModelOutputWithPooling(**{**vision_output, "pooler_output": image_features})
            text_output = BaseModelOutputWithPooling(**{**text_output, "pooler_output": text_features})
        else:
            image_features = self.get_image_features(**image_inputs)
            text_features = self.get_text_features(input_ids, attention_mask, position_ids)
            vision_output = _PooledOutput(pooler_output=image_features)
            text_output = _PooledOutput(pooler_output=text_features)
        image_embeds, text_embeds = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        logits_per_text, loss, output = self._logits_and_loss(text_embeds, image_embeds, return_loss)
        return output(loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                      text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_output,
                      vision_model_output=vision_output)

    def _logits_and_loss(self, text_embeds, image_embeds, return_loss):
        logits_per_text = self.clip.logit_scale.exp() * text_embeds @ image_embeds.t()
        loss = None
        if return_loss:
            labels = torch.arange(len(logits_per_text), device=logits_per_text.device)
            loss = (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2
        return logits_per_text, loss, CLIPOutput


class Projection(torch.nn.Module):
    """A tower's projection as transformers holds it (a ``Linear`` without bias: ``weight`` is [out, in]) over
    clipforge's [in, out] matrix, the same tensor."""

    def __init__(self, matrix: torch.Tensor | None):
        super().__init__()
        if matrix is None:
            raise ValueError("this tower has no projection (pruned by prune_intermediate_layers)")
        self.matrix = matrix

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


class SiglipModel(CLIPModel):
    """transformers' ``SiglipModel`` over a clipforge SigLIP model: ``CLIPModel``'s calls, the logits
    ``scale * cos + bias`` and, with ``return_loss``, the pairwise sigmoid loss. Without an ``attention_mask`` the
    text tower attends to every position, padding included, as SigLIP was trained (Google's SigLIP tokenizers give
    none); with one (SigLIP 2's Gemma tokenizer gives one) padding is hidden, as transformers hides it."""

    def _logits_and_loss(self, text_embeds, image_embeds, return_loss):
        from ..loss import SigLipLoss

        scale, bias = self.clip.logit_scale.exp(), self.clip.logit_bias
        logits_per_text = scale * text_embeds @ image_embeds.t() + bias
        loss = SigLipLoss()(image_embeds, text_embeds, scale, bias) if return_loss else None
        return logits_per_text, loss, SiglipOutput

    def _absent(self):
        raise AttributeError  # then nn.Module's __getattr__ names the attribute, as for any other it lacks

    # transformers' SiglipModel has neither (its heads are in its towers): hasattr is False here too
    visual_projection = text_projection = property(_absent)


class Siglip2Model(SiglipModel):
    """transformers' ``Siglip2Model`` over a SigLIP 2 NaFlex model: images as its image processor gives them, each at
    its own aspect ratio (``pixel_values`` [N, patches, 3 * patch**2], ``pixel_attention_mask``, ``spatial_shapes``),
    the position grid resized to each image's; ``SiglipModel``'s logits and sigmoid loss; its towers
    ``Siglip2VisionModel`` / ``Siglip2TextModel``."""

    def get_image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                           spatial_shapes: torch.Tensor | None = None, **kwargs) -> Features:
        """The image embeddings [N, D], not normalised."""
        _refuse(kwargs)
        batch = _naflex_inputs(pixel_values, pixel_attention_mask, spatial_shapes, "Siglip2Model")
        return self.clip.encode_image(batch).as_subclass(Features)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                pixel_attention_mask: torch.Tensor | None = None, spatial_shapes: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_loss: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs) -> SiglipOutput:
        """Both towers, their normalised embeddings, the logits ``scale * cos + bias`` and, with ``return_loss``,
        the pairwise sigmoid loss; the towers' outputs as ``CLIPModel``'s forward gives them."""
        image_inputs = {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask,
                        "spatial_shapes": spatial_shapes}
        return self._forward(image_inputs, input_ids, attention_mask, position_ids, return_loss,
                             {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions},
                             kwargs)


def _naflex_inputs(pixel_values, pixel_attention_mask, spatial_shapes, who: str) -> dict:
    """A NaFlex batch (``models.siglip_vision.is_naflex_batch``) from a Siglip2 image processor's outputs."""
    if spatial_shapes is None:
        raise ValueError(f"{who} takes its image processor's pixel_values with spatial_shapes (and "
                         "pixel_attention_mask)")
    batch = {"pixel_values": pixel_values, "spatial_shapes": spatial_shapes}
    if pixel_attention_mask is not None:
        batch["pixel_attention_mask"] = pixel_attention_mask
    return batch


class AutoModel(CLIPModel):
    """transformers' ``AutoModel`` for the models these classes answer: ``from_pretrained`` gives a ``CLIPModel``
    or a ``SiglipModel``, as the folder's model is."""

    @staticmethod
    def model_class(clip: CLIP) -> type:
        from ..checkpoint.hf import is_siglip
        from ..models import is_naflex

        if is_naflex(clip.config):
            return Siglip2Model
        return SiglipModel if is_siglip(clip.config) else CLIPModel


def _tower_classes(model: CLIPModel) -> tuple[type, type]:
    """The tower classes of ``model.vision_model`` / ``model.text_model``."""
    from .towers import (CLIPTextModel, CLIPVisionModel, Siglip2TextModel, Siglip2VisionModel, SiglipTextModel,
                         SiglipVisionModel)  # here: the towers' module builds on this one

    if isinstance(model, Siglip2Model):
        return Siglip2VisionModel, Siglip2TextModel
    if isinstance(model, SiglipModel):
        return SiglipVisionModel, SiglipTextModel
    return CLIPVisionModel, CLIPTextModel


def _pixels_for(tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixels in the tower's dtype (a model cast to bf16 takes the processor's float32), integers left for the tower's
    own check to name."""
    dtype = next(tower.parameters()).dtype
    return pixel_values.to(dtype) if pixel_values.is_floating_point() else pixel_values


def _positioned_tower(clip: CLIP) -> torch.nn.Module:
    """The image tower, where it has a learned position grid that ``interpolate_pos_encoding`` can resize."""
    from ..models.siglip_vision import SigLIPVisionTransformer
    from ..models.vision_transformer import VisionTransformer

    tower = clip.visual
    if type(tower) not in (VisionTransformer, SigLIPVisionTransformer) or getattr(tower, "naflex", False):
        raise ValueError(f"interpolate_pos_encoding: this model's image tower (a {type(tower).__name__}) has no "
                         "position grid to resize here")
    return tower


def _refuse(kwargs: dict, position_ids=None) -> None:
    """What transformers' CLIPModel takes and this one does not build, named."""
    if position_ids is not None:
        raise ValueError("position_ids: only the positions 0..L-1 are built here")
    if kwargs.pop("return_dict", True) is False:
        raise ValueError("return_dict=False: features come as a tensor, outputs as a CLIPOutput (index it by "
                         "position for the tuple's order)")
    for asked in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(asked, False):
            raise ValueError(f"{asked}: get_*_features give the features; the model's forward, model.vision_model "
                             "and model.text_model (CLIPVisionModel, CLIPTextModel ...) give the towers' states")
    if kwargs:
        raise TypeError(f"CLIPModel: {', '.join(sorted(kwargs))} not built here")


def _check_right_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, text: torch.nn.Module) -> None:
    """CLIP's causal text tower pools one position, which sees nothing after it: a mask that pads after that position
    changes nothing (the tower skips that padding anyway); one that masks a token at or before it (left padding, which
    transformers then pools at a padding token) is refused."""
    pooled = text._pool_index(input_ids).to(attention_mask.device)
    leading = attention_mask.to(torch.long).cumprod(dim=-1).sum(dim=-1)  # each row's unmasked start
    if bool((leading <= pooled).any()):
        raise ValueError("attention_mask masks a token at or before a text's end-of-text token (left padding?): "
                         "CLIP's text is padded on the right")
