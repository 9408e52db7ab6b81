"""Checkpoint formats: read OpenAI, open_clip, Hugging Face and clipforge weights; write clipforge, HF and OpenAI.

Every reader returns a state dict in clipforge's key layout (``visual.*`` for the image tower, ``text.*`` for the
text tower, ``logit_scale``), which is OpenAI's layout with the text tower under ``text.``.

- ``io``: reading files and folders of any kind, writing clipforge folders and safetensors, loading into a model;
- ``openai``, ``hf``: one module per foreign layout (keys, and for Hugging Face the config), both directions;
- ``infer``: the architecture read off weight shapes.
"""
from . import hf, openai
from .errors import CheckpointError, ImageTowerCheckpointError
from .infer import infer_config
from .io import (CONFIG_NAME, WEIGHTS_NAME, load_into, read_checkpoint, read_config, read_preprocess_cfg,
                 save_pretrained, save_safetensors, to_clipforge_state_dict)

# The converters under the names the rest of the package (and users) call them by.
openai_to_clipforge, clipforge_to_openai = openai.to_clipforge, openai.from_clipforge
hf_to_clipforge, clipforge_to_hf = hf.to_clipforge, hf.from_clipforge
hf_config_to_clipforge, clipforge_config_to_hf = hf.config_to_clipforge, hf.config_from_clipforge

__all__ = ["CheckpointError", "ImageTowerCheckpointError", "infer_config", "load_into", "read_checkpoint",
           "read_config", "read_preprocess_cfg", "save_pretrained", "save_safetensors",
           "to_clipforge_state_dict", "CONFIG_NAME", "WEIGHTS_NAME", "openai_to_clipforge", "clipforge_to_openai",
           "hf_to_clipforge", "clipforge_to_hf", "hf_config_to_clipforge", "clipforge_config_to_hf"]
