"""``AutoConfig`` and the tower configs: a folder's ``config.json`` with transformers' defaults filled in."""
from __future__ import annotations

import os
from pathlib import Path

from .loading import _folder, _hub_options, _read_json


class _Config:
    """A config's keys as attributes (``model.config.projection_dim``, ``model.config.vision_config.image_size``)."""

    def __init__(self, values: dict):
        for key, value in values.items():
            setattr(self, key, _Config(value) if isinstance(value, dict) else value)

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, _Config) else v for k, v in vars(self).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


class AutoConfig:
    """transformers' ``AutoConfig`` (``CLIPConfig``, ``SiglipConfig``) ``.from_pretrained``: a model folder's or hub
    repo's ``config.json`` keys as attributes (``config.projection_dim``, ``config.vision_config.image_size``), with
    transformers' values for what the file leaves out (Google's SigLIP configs are sparse); for a checkpoint clipforge
    reads in another format, the config ``CLIPModel.from_pretrained(...).config`` gives; for a folder holding one
    tower (diffusers' ``text_encoder``), that tower's config."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> _Config:
        from ..checkpoint.hf import MODEL_TYPES, TOWER_TYPES, config_from_clipforge, config_to_clipforge
        from ..checkpoint.hf import tower_config_to_clipforge
        from ..models import merge_config

        path = Path(name_or_path)
        if not path.is_file():
            with _hub_options("AutoConfig.from_pretrained", kwargs):
                path = _folder(name_or_path, ("config.json",), kwargs.get("subfolder"))
        own = _read_json(path / "config.json") if path.is_dir() else {}
        scale = own.get("logit_scale_init_value", 2.6592)  # CLIPConfig's default
        if own.get("model_type") in TOWER_TYPES:
            config, side = tower_config_to_clipforge(own)
            return _Config(merge_config(config_from_clipforge(config, scale)[f"{side}_config"], own))
        if own.get("model_type") not in MODEL_TYPES:  # clipforge's, open_clip's or OpenAI's weights
            from .modeling import CLIPModel  # here: the model module reads its config through this one

            return CLIPModel.from_pretrained(name_or_path, **kwargs).config
        return _Config(merge_config(config_from_clipforge(config_to_clipforge(own), scale), own))


class CLIPTextConfig(AutoConfig):
    """transformers' ``CLIPTextConfig`` (``SiglipTextConfig``) ``.from_pretrained``: the text tower's config, of a
    whole model's folder or of one holding the tower alone."""

    tower = "text_config"

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> _Config:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        return getattr(config, cls.tower, config)  # a one-tower folder's config is the tower's


class CLIPVisionConfig(CLIPTextConfig):
    """transformers' ``CLIPVisionConfig`` (``SiglipVisionConfig``): the image tower's config."""

    tower = "vision_config"
