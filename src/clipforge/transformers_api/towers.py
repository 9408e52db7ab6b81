"""One tower as transformers' classes give it (``CLIPVisionModel``, ``CLIPTextModel``, their ``...WithProjection``,
the SigLIP and SigLIP 2 towers): hidden states and attention maps as transformers counts them, from a whole model's
folder or a folder holding that tower alone."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from ..models.clip import CLIP
from .configuration import _Config
from .loading import _folder, _hub_options, _inner, _load_clip, _model_folder, _placed, _read_json
from .modeling import AutoModel, _naflex_inputs, _pixels_for, _refuse
from .outputs import BaseModelOutputWithPooling, CLIPTextModelOutput, CLIPVisionModelOutput


def _run_blocks(transformer, x: torch.Tensor, output_hidden_states, output_attentions, causal: bool = False,
                attn_mask: torch.Tensor | None = None):
    """A tower's blocks over their input ``x``: ``(last output, hidden_states or None, attentions or None)`` as
    transformers gives them (the hidden states: ``x`` and every block's output)."""
    maps = None
    if output_attentions:
        last, blocks, maps = transformer.forward_attentions(x, causal, attn_mask)
    elif output_hidden_states:
        last, blocks = transformer.forward_intermediates(x, causal=causal, attn_mask=attn_mask)
    else:
        last = transformer(x, causal=causal, attn_mask=attn_mask)
    return last, (x, *blocks) if output_hidden_states else None, None if maps is None else tuple(maps)


class _TowerModel(torch.nn.Module):
    """One tower of a CLIP or SigLIP model, as transformers' tower classes load it: from a whole model's folder, or
    from a folder transformers saved one tower in (``CLIPTextModel`` ... alone: diffusers' ``text_encoder``,
    IP-Adapter's ``image_encoder``, a vision-language model's SigLIP tower). ``config``: that tower's part of
    transformers' config (``config_key``)."""

    config_key = ""
    family = "CLIPModel"  # the whole model's class, as AutoModel.model_class names it
    projected = False  # the ...WithProjection classes: a one-tower folder must hold the projection

    def __init__(self, clip: CLIP | None = None, *, tower: torch.nn.Module | None = None,
                 model_config: dict | None = None):
        """``clip``: a whole model, whose tower this is (sharing its weights); or ``tower`` alone with the clipforge
        ``model_config`` it was built from (a one-tower folder's, ``checkpoint.hf.tower_config_to_clipforge``)."""
        super().__init__()
        self._logit_scale = 2.6592  # CLIPConfig's default, for a tower saved alone
        if clip is not None:
            tower, model_config = self._tower_of(clip), clip.config
            self._logit_scale = float(clip.logit_scale.detach())
        self._model_config = model_config
        self._attach(tower)

    @property
    def config(self) -> _Config:
        from ..checkpoint.hf import config_from_clipforge

        settings = config_from_clipforge(self._model_config, self._logit_scale)[self.config_key]
        if "vision_use_head" in settings and getattr(self, "vision", None) is not None and self.vision.head is None:
            settings = {**settings, "vision_use_head": False}  # a SigLIP image tower saved without its pooling head
        return _Config(settings)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype=None, torch_dtype=None, device_map=None,
                        **kwargs):
        """As ``CLIPModel.from_pretrained`` reads a whole model's folder or hub repo; or a one-tower folder
        (``subfolder``: the one inside a repo or folder that holds it, diffusers' "text_encoder"; ``variant``: its
        weights' variant, diffusers' "fp16": ``model.fp16.safetensors``)."""
        dtype = dtype if dtype is not None else torch_dtype
        folder = _one_tower_folder(name_or_path, kwargs)
        if folder is not None:
            return _placed(cls._from_tower_folder(folder, name_or_path, kwargs.get("variant")), dtype,
                           device_map).eval()
        clip = _load_clip(name_or_path, dtype, device_map, kwargs)
        family = AutoModel.model_class(clip).__name__
        if family != cls.family:
            raise ValueError(f"{name_or_path}: a {family[:-5]} model; {cls.__name__} reads a {cls.family[:-5]} "
                             "model's towers")
        return cls(clip).eval()

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> None:
        """A folder transformers reads as this class, and ``from_pretrained`` reads back: ``config.json`` (the
        tower's config: a resized vocabulary's size included) and ``model.safetensors`` under transformers' names
        (``text_model.`` / ``vision_model.``, the projection for the ``...WithProjection`` classes), as diffusers
        saves a pipeline's text encoder (textual inversion's ``--save_as_full_pipeline``)."""
        from ..checkpoint.hf import TOWER_TYPES, keys_from_clipforge
        from ..checkpoint.io import save_safetensors
        from ..files import write_json

        if set(kwargs) - {"safe_serialization"} or not kwargs.get("safe_serialization", True):
            raise TypeError("save_pretrained writes safetensors; other options are not built here")
        side = self.config_key[:-len("_config")]
        model_type = f"{self.family[:-len('Model')].lower()}_{side}_model"
        if model_type not in TOWER_TYPES:
            raise TypeError(f"{type(self).__name__}.save_pretrained is built for CLIP's, SigLIP's and SigLIP 2's "
                            "towers")
        prefix, tower = ("text.", self.text) if side == "text" else ("visual.", self.vision)
        state = keys_from_clipforge({prefix + k: v for k, v in tower.state_dict().items()},
                                    siglip=self.family != "CLIPModel", naflex=model_type == "siglip2_vision_model")
        if self.family == "CLIPModel" and not self.projected:  # transformers' CLIPTextModel has no projection
            state = {k: v for k, v in state.items() if not k.endswith("_projection.weight")}
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(state, folder / "model.safetensors", {"format": "pt"})
        write_json(folder / "config.json", {**self.config.to_dict(), "model_type": model_type,
                                            "architectures": [type(self).__name__]})

    @classmethod
    def _from_tower_folder(cls, folder: Path, name, variant: str | None) -> "_TowerModel":
        """The tower a one-tower folder holds, built from its ``config.json`` and loaded from its weights."""
        from ..checkpoint import CheckpointError
        from ..checkpoint.hf import MODEL_TYPES, TOWER_TYPES, to_clipforge, tower_config_to_clipforge
        from ..checkpoint.io import read_weight_files, weight_file_names, weight_files
        from ..models.clip import build_text_tower, build_vision_tower

        folder_config = _read_json(folder / "config.json")
        model_type = folder_config["model_type"]
        family, side = TOWER_TYPES[model_type]
        if (MODEL_TYPES[family], side) != (cls.family, cls.config_key[:-7]):
            raise ValueError(f"{name}: a transformers {model_type} folder; {cls.__name__} reads a {cls.family[:-5]} "
                             f"model's {cls.config_key[:-7]} tower")
        config, _ = tower_config_to_clipforge(folder_config)
        build = build_text_tower if side == "text" else build_vision_tower
        tower = build(config[f"{side}_cfg"], config["embed_dim"], config.get("quick_gelu", False))
        files = weight_files(folder, variant)
        if not files:
            raise FileNotFoundError(f"{name}: no weights (none of {', '.join(weight_file_names(variant))})")
        # transformers 4 saved a tower under its model's prefix (text_model.), 5 may save it bare
        prefix, projections = f"{side}_model.", ("text_projection.", "visual_projection.")
        state = {k if k.startswith((prefix, *projections)) else prefix + k: v
                 for k, v in read_weight_files(files).items()}
        mine = "text." if side == "text" else "visual."
        state = to_clipforge(state)
        strays = sorted(k for k in state if not k.startswith(mine))
        if strays:
            raise CheckpointError(f"{name}: a {model_type} folder holding another tower's weights ({strays[0]})")
        loaded = tower.load_state_dict({k[len(mine):]: v for k, v in state.items()}, strict=False)
        projection = "text_projection" if side == "text" else "proj"
        absent = set(loaded.missing_keys)
        siglip = family != "clip"
        optional = {projection} | ({k for k in absent if k.startswith("head.")} if siglip else set())
        if absent - optional or loaded.unexpected_keys:
            wrong = sorted(absent - optional) or sorted(loaded.unexpected_keys)
            raise CheckpointError(f"{name}: its weights do not fit the {model_type} its config describes "
                                  f"({'missing' if absent - optional else 'unexpected'} {wrong[0]})")
        if projection in absent:  # a CLIPTextModel / CLIPVisionModel saved without its projection
            if cls.projected:
                raise ValueError(f"{name}: a {folder_config.get('architectures', [model_type])[0]} folder holds no "
                                 f"projection; {cls.__name__} needs one ({cls.__name__[:-14]} reads it)")
            setattr(tower, projection, None)
        if siglip and side == "vision" and "head.probe" in absent:  # vision_use_head: false
            tower.head = None
        return cls(tower=tower, model_config=config)


def _one_tower_folder(name_or_path, options: dict) -> Path | None:
    """The folder of a one-tower model (``config.json``'s model_type a tower's: ``checkpoint.hf.TOWER_TYPES``),
    local or fetched from the hub with its weights; None where ``name_or_path`` is a whole model's."""
    from ..checkpoint.hf import TOWER_TYPES
    from ..pretrained import DownloadError

    subfolder, path = options.get("subfolder"), Path(name_or_path)
    with _hub_options("from_pretrained", dict(options), own=("variant",)):
        if path.is_dir():
            folder = path / _inner(subfolder)
        elif path.exists():
            return None  # a checkpoint file
        else:
            try:
                folder = _folder(name_or_path, ("config.json",), subfolder)
            except DownloadError:
                if subfolder is not None:
                    raise
                return None  # offline, a whole model fetched before by load_model: _load_clip reads it
        if _read_json(folder / "config.json").get("model_type") not in TOWER_TYPES:
            return None
        return _model_folder(name_or_path, subfolder, options.get("variant"))


class _VisionTowerModel(_TowerModel):
    config_key = "vision_config"

    @staticmethod
    def _tower_of(clip: CLIP) -> torch.nn.Module:
        return clip.visual

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                interpolate_pos_encoding: bool = False, output_attentions: bool | None = None,
                **kwargs) -> BaseModelOutputWithPooling:
        """``interpolate_pos_encoding``: images of another size than the model's, its position grid resized to
        theirs as transformers resizes it (bicubic)."""
        last, pooled, hidden, maps = self._states(pixel_values, output_hidden_states, output_attentions,
                                                  interpolate_pos_encoding, kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden,
                                          attentions=maps)

    def _states(self, pixel_values, output_hidden_states, output_attentions, interpolate_pos_encoding, kwargs):
        _refuse(kwargs)
        tower = self.vision
        x = tower._tokens(_pixels_for(tower, pixel_values), interpolate_pos_encoding)
        last, hidden, maps = _run_blocks(tower.transformer, x, output_hidden_states, output_attentions)
        return (*self._pooled(last), hidden, maps)


class CLIPVisionModel(_VisionTowerModel):
    """transformers' ``CLIPVisionModel``: a CLIP model's ViT image tower alone (``self.vision``, clipforge's
    ``VisionTransformer``; the text tower is not kept): ``last_hidden_state`` [N, 1 + patches, width] (the last
    block's, before ``post_layernorm``), ``pooler_output`` [N, width] (the class token after it); what
    vision-language models (LLaVA's ``hidden_states[-2]``) load for patch features. ``config``: the vision config's
    keys (``hidden_size``, ``image_size``, ``patch_size`` ...)."""

    def _attach(self, tower: torch.nn.Module) -> None:
        from ..models.vision_transformer import VisionTransformer

        if type(tower) is not VisionTransformer or tower.pool != "tok" or tower.final_ln_after_pool:
            averaged = " pooled by averaging" if getattr(tower, "pool", "") == "avg" else ""
            raise ValueError("CLIPVisionModel is CLIP's ViT image tower pooled at its class token; this model's is "
                             f"a {type(tower).__name__}{averaged}")
        self.vision = tower

    def _pooled(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return last, self.vision.ln_post(last[:, 0])

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        """The projected image features (``get_image_features``'), from this tower's output."""
        return self.vision._project(output.pooler_output)


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """transformers' ``CLIPVisionModelWithProjection``: ``CLIPVisionModel``'s states and the projected
    ``image_embeds`` (what ``CLIPModel.get_image_features`` gives)."""

    projected = True

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                interpolate_pos_encoding: bool = False, output_attentions: bool | None = None,
                **kwargs) -> CLIPVisionModelOutput:
        output = super().forward(pixel_values, output_hidden_states, interpolate_pos_encoding, output_attentions,
                                 **kwargs)
        return CLIPVisionModelOutput(image_embeds=self.embeds(output), last_hidden_state=output.last_hidden_state,
                                     hidden_states=output.hidden_states, attentions=output.attentions)


class SiglipVisionModel(_VisionTowerModel):
    """transformers' ``SiglipVisionModel``: a SigLIP model's image tower alone (``self.vision``, clipforge's
    ``SigLIPVisionTransformer``), what vision-language models (PaliGemma's, LLaVA-OneVision's) load:
    ``last_hidden_state`` [N, patches, width] after the final LayerNorm (``post_layernorm``), ``pooler_output`` the
    attention pooling's [N, width] (SigLIP's image embedding)."""

    family = "SiglipModel"

    def _attach(self, tower: torch.nn.Module) -> None:
        from ..models.siglip_vision import SigLIPVisionTransformer

        if type(tower) is not SigLIPVisionTransformer or tower.naflex:
            kind = type(tower).__name__ + (" (NaFlex)" if getattr(tower, "naflex", False) else "")
            raise ValueError(f"SiglipVisionModel is SigLIP's fixed-size image tower; this model's is a {kind}")
        self.vision = tower

    def _pooled(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        last = self.vision.ln_post(last)
        return last, None if self.vision.head is None else self.vision.head(last)  # None: saved without its head

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        return output.pooler_output


class _TextTowerModel(_TowerModel):
    config_key = "text_config"

    @staticmethod
    def _tower_of(clip: CLIP) -> torch.nn.Module:
        return clip.text

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The token embedding, as transformers' ``get_input_embeddings`` gives it (textual inversion reads it)."""
        return self.text.token_embedding

    def set_input_embeddings(self, embedding: torch.nn.Embedding) -> None:
        width = self.text.token_embedding.embedding_dim
        if not isinstance(embedding, torch.nn.Embedding) or embedding.embedding_dim != width:
            raise ValueError(f"set_input_embeddings takes an nn.Embedding of width {width}, got {embedding!r}")
        self.text.token_embedding = embedding
        self._vocabulary_is(embedding.num_embeddings)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> torch.nn.Embedding:
        """transformers' ``resize_token_embeddings``: room for ``new_num_tokens`` ids (rounded up to a multiple of
        ``pad_to_multiple_of``), the known rows kept, rows cut from the end when it shrinks. Added rows are drawn as
        transformers draws them, so a seeded run gives the same values: from a normal distribution with the known
        rows' mean and 1e-9 times their covariance (``mean_resizing``; the mean itself where that covariance is not
        positive definite), else N(0, 0.02). The embedding module stays the same object, its weight the same
        parameter (an optimizer holding it keeps it); the config's ``vocab_size`` follows."""
        embedding = self.text.token_embedding
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r}: expected a positive integer")
            wanted = embedding.num_embeddings if new_num_tokens is None else new_num_tokens
            new_num_tokens = -(-wanted // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return embedding
        if not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens={new_num_tokens!r}: expected a positive number of tokens")
        known, width = embedding.weight.shape
        if new_num_tokens != known:
            old = embedding.weight.data
            grown = torch.empty(new_num_tokens, width, dtype=old.dtype, device=old.device)
            # transformers builds a new nn.Embedding, whose construction draws N(0, 1) for every row: drawn here too,
            # so that the rows drawn next come from the same generator state as transformers' do
            torch.nn.init.normal_(grown)
            if new_num_tokens > known and mean_resizing:
                grown[known:] = _rows_like(old, new_num_tokens - known)
            elif new_num_tokens > known:
                torch.nn.init.normal_(grown, mean=0.0, std=0.02)  # transformers' initializer_range for CLIP
            grown[:min(known, new_num_tokens)] = old[:new_num_tokens]
            embedding.weight.data = grown
            embedding.num_embeddings = new_num_tokens
            if embedding.padding_idx is not None and embedding.padding_idx >= new_num_tokens:
                embedding.padding_idx = None
        self._vocabulary_is(new_num_tokens)
        return embedding

    def _vocabulary_is(self, size: int) -> None:
        """The tower and its config (what ``config`` and a save write) take a new vocabulary size."""
        self.text.vocab_size = size
        text = self._model_config["text_cfg"]
        if text.get("vocab_size") != size:
            self._model_config = {**self._model_config, "text_cfg": {**text, "vocab_size": size}}

    @property
    def final_layer_norm(self) -> torch.nn.Module:
        """The last LayerNorm, where scripts reach for it (diffusers' clip skip applies it to an earlier block's
        output): transformers 5's ``model.final_layer_norm``, 4's ``model.text_model.final_layer_norm``."""
        return self.text.ln_final

    @property
    def embeddings(self) -> SimpleNamespace:
        """``embeddings.token_embedding`` (transformers 5's layout; 4's under ``text_model``)."""
        return SimpleNamespace(token_embedding=self.text.token_embedding)

    @property
    def text_model(self) -> SimpleNamespace:
        """transformers 4's ``model.text_model``: ``final_layer_norm`` and ``embeddings``, this tower's own."""
        return SimpleNamespace(final_layer_norm=self.final_layer_norm, embeddings=self.embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        last, pooled, hidden, maps = self._states(input_ids, attention_mask, position_ids, output_hidden_states,
                                                  output_attentions, kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden,
                                          attentions=maps)

    def _states(self, input_ids, attention_mask, position_ids, output_hidden_states, output_attentions, kwargs):
        from ..models.inputs import check_token_batch

        _refuse(kwargs, position_ids=position_ids)
        tower = self.text
        check_token_batch(input_ids, tower.context_length)
        x, mask = tower._embed(input_ids), None
        if attention_mask is not None and not bool(attention_mask.all()):
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                                 f"{tuple(input_ids.shape)}")
            mask = self._visible(attention_mask.to(device=x.device, dtype=torch.bool))
        last, hidden, maps = _run_blocks(tower.transformer, x, output_hidden_states, output_attentions,
                                         causal=tower.causal and mask is None, attn_mask=mask)
        last = tower.ln_final(last)
        pooled = last[torch.arange(len(last), device=last.device), tower._pool_index(input_ids)]
        return last, self._head(pooled), hidden, maps


def _rows_like(known: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` new embedding rows near the ``known`` ones' mean, as transformers' ``mean_resizing`` draws them: from
    N(mean, 1e-9 * covariance) (in float32, with torch's generator), or the mean where that is not positive definite."""
    rows = known.float()
    mean = rows.mean(dim=0)
    centred = rows - mean
    covariance = 1e-9 * (centred.T @ centred / len(rows))
    if bool(torch.distributions.constraints.positive_definite.check(covariance)):
        drawn = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((count,))
    else:
        drawn = mean[None].repeat(count, 1)
    return drawn.to(known.dtype)


class CLIPTextModel(_TextTowerModel):
    """transformers' ``CLIPTextModel``: a CLIP model's text transformer alone (``self.text``; the image tower is not
    kept). ``last_hidden_state`` [N, L, width] after ``final_layer_norm``, ``pooler_output`` at each text's end token.
    An ``attention_mask`` hides padding from every position, as transformers' does (the states of the text's own
    tokens are the same either way: they see nothing after them)."""

    def _attach(self, tower: torch.nn.Module) -> None:
        from ..models.text_transformer import TextTransformer

        if type(tower) is not TextTransformer or not tower.causal:
            kind = type(tower).__name__ + ("" if getattr(tower, "causal", True) else " attending both ways")
            raise ValueError(f"CLIPTextModel is CLIP's causal text transformer; this model's text tower is a {kind}")
        self.text = tower

    @staticmethod
    def _visible(attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, 1, L, L]: the keys each position sees: those before it that the mask keeps."""
        length = attention_mask.shape[-1]
        causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        mask = attention_mask[:, None, None, :] & causal
        return (mask | ~mask.any(dim=-1, keepdim=True)) & causal  # a row left nothing to see sees all it may

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        """The projected text features (``get_text_features``'), from this tower's output."""
        return self.text._project(output.pooler_output)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' ``CLIPTextModelWithProjection``: ``CLIPTextModel``'s states and the projected ``text_embeds``
    (what ``CLIPModel.get_text_features`` gives)."""

    projected = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, **kwargs) -> CLIPTextModelOutput:
        output = super().forward(input_ids, attention_mask, position_ids, output_hidden_states, output_attentions,
                                 **kwargs)
        return CLIPTextModelOutput(text_embeds=self.embeds(output), last_hidden_state=output.last_hidden_state,
                                   hidden_states=output.hidden_states, attentions=output.attentions)


class SiglipTextModel(_TextTowerModel):
    """transformers' ``SiglipTextModel``: a SigLIP model's text transformer alone (``self.text``), attending both
    ways: ``last_hidden_state`` [N, L, width] after ``final_layer_norm``, ``pooler_output`` the last position's
    through the head (SigLIP's text embedding). Without an ``attention_mask`` every position sees the padding, as
    SigLIP was trained; with one the padding is hidden, as transformers hides it."""

    family = "SiglipModel"

    def _attach(self, tower: torch.nn.Module) -> None:
        from ..models.text_transformer import TextTransformer

        if type(tower) is not TextTransformer or tower.causal:
            raise ValueError(f"SiglipTextModel is SigLIP's text transformer; this model's text tower is a "
                             f"{type(tower).__name__}")
        self.text = tower

    @staticmethod
    def _visible(attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, 1, 1, L]: the keys every position sees (all of a row that keeps none, as ``features_masked``)."""
        return (attention_mask | ~attention_mask.any(dim=-1, keepdim=True))[:, None, None, :]

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text._project(pooled)

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        return output.pooler_output


class Siglip2VisionModel(_TowerModel):
    """transformers' ``Siglip2VisionModel``: a SigLIP 2 NaFlex model's image tower alone (``self.vision``), on its
    image processor's ``pixel_values``, ``pixel_attention_mask`` and ``spatial_shapes``: ``last_hidden_state`` [N,
    patches, width] after ``post_layernorm`` (padding positions included, as transformers gives them),
    ``pooler_output`` the attention pooling's over the image's own patches."""

    config_key, family = "vision_config", "Siglip2Model"

    @staticmethod
    def _tower_of(clip: CLIP) -> torch.nn.Module:
        return clip.visual

    def _attach(self, tower: torch.nn.Module) -> None:
        from ..models.siglip_vision import SigLIPVisionTransformer

        if type(tower) is not SigLIPVisionTransformer or not tower.naflex:
            raise ValueError(f"Siglip2VisionModel is SigLIP 2's NaFlex image tower; this model's is a "
                             f"{type(tower).__name__}{'' if getattr(tower, 'naflex', True) else ' of a fixed size'}")
        self.vision = tower

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                spatial_shapes: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        _refuse(kwargs)
        batch = _naflex_inputs(pixel_values, pixel_attention_mask, spatial_shapes, "Siglip2VisionModel")
        x, visible = self.vision._naflex_tokens(batch)
        mask = None if visible is None else visible[:, None, None, :]  # the keys every token may see
        last, hidden, maps = _run_blocks(self.vision.transformer, x, output_hidden_states, output_attentions,
                                         attn_mask=mask)
        last = self.vision.ln_post(last)
        pooled = None if self.vision.head is None else self.vision.head(last, visible)  # None: saved without its head
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden,
                                          attentions=maps)

    def embeds(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        return output.pooler_output


class Siglip2TextModel(SiglipTextModel):
    """transformers' ``Siglip2TextModel``: SigLIP's text tower, as a SigLIP 2 NaFlex model holds it."""

    family = "Siglip2Model"
