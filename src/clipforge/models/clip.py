"""CLIP: an image tower and a text tower trained to agree, compared by scaled cosine similarity."""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import batch_input, check_token_batch, checked_images, empty_features
from .layers import Transformer
from .locking import frozen_batch_norms, unlock_last
from .convnext import ConvNeXt
from .fastvit import FastViT
from .eva import EvaVisionTower
from .modified_resnet import ModifiedResNet
from .siglip_vision import SigLIPVisionTransformer
from .text_transformer import TextTransformer
from .vision_transformer import VisionTransformer

LOGIT_SCALE_MAX = 100.0


class _CLIPOutputFields(NamedTuple):
    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    caption_nll: torch.Tensor | None = None  # CoCa in training: the caption tokens' summed cross-entropy ...
    caption_labels: torch.Tensor | None = None  # ... and those tokens [tokens]


class CLIPOutput(_CLIPOutputFields):
    """What ``CLIP.forward`` returns: L2-normalised features plus the (clamped, exponentiated) temperature.

    Features rather than logits come out of ``forward`` so distributed losses can gather them across ranks;
    ``logits_per_image`` computes the local N x M logits when they are wanted.

    It unpacks as open_clip's forward returns: ``image_features, text_features, logit_scale = model(images, texts)``,
    with ``logit_bias`` fourth only for a model that has one (SigLIP); ``out["image_features"]`` reads a field as
    open_clip's ``output_dict=True`` does. The fields are always there by name (``out.logit_bias`` is None without).
    A CoCa in training adds its captioning decoder's logits and their labels (``CoCa.forward``), by name only.
    """

    __slots__ = ()

    def __iter__(self):
        return iter(tuple.__getitem__(self, slice(0, 3 if self.logit_bias is None else 4)))

    def __len__(self) -> int:
        return 3 if self.logit_bias is None else 4

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)

    # the namedtuple helpers, over all the fields whatever ``__iter__`` shows (torch.compile rebuilds outputs with
    # ``_make`` from the fields it was given)
    @classmethod
    def _make(cls, iterable) -> "CLIPOutput":
        return cls(*iterable)

    def _asdict(self) -> dict:
        return dict(zip(self._fields, tuple.__iter__(self)))

    def _replace(self, **changes) -> "CLIPOutput":
        return type(self)(**{**self._asdict(), **changes})

    @property
    def logits_per_image(self) -> torch.Tensor:
        logits = self.logit_scale * self.image_features @ self.text_features.T
        return logits if self.logit_bias is None else logits + self.logit_bias

    @property
    def logits_per_text(self) -> torch.Tensor:
        return self.logits_per_image.T


def is_resnet(config: dict) -> bool:
    """Whether a model config (or its ``vision_cfg``) has a ResNet image tower: its ``layers`` are stage depths."""
    return isinstance(config.get("vision_cfg", config).get("layers"), (list, tuple))


def is_siglip(config: dict) -> bool:
    """Whether a model config (or its ``vision_cfg``) has SigLIP's image tower: attention pooling (PE's, the other
    attention-pooled tower, is an EVA tower)."""
    cfg = config.get("vision_cfg", config)
    return cfg.get("pool") == "map" and cfg.get("tower") != "eva"


def is_naflex(config: dict) -> bool:
    """Whether a model config (or its ``vision_cfg``) has SigLIP 2's NaFlex image tower (images at their own aspect
    ratio, as grids of patches of their own shapes)."""
    return bool(config.get("vision_cfg", config).get("naflex"))


def is_convnext(config: dict) -> bool:
    """Whether a model config (or its ``vision_cfg``) has a ConvNeXt image tower: its stages' ``depths`` (and no
    other ``tower`` named)."""
    cfg = config.get("vision_cfg", config)
    return "depths" in cfg and cfg.get("tower", "convnext") == "convnext"


def is_fastvit(config: dict) -> bool:
    """Whether a model config (or its ``vision_cfg``) has a FastViT (MobileCLIP-S) image tower."""
    return config.get("vision_cfg", config).get("tower") == "fastvit"


def is_eva(config: dict) -> bool:
    """Whether a model config (or its ``vision_cfg``) has an EVA-CLIP image tower."""
    return config.get("vision_cfg", config).get("tower") == "eva"


def tower_kind(config: dict) -> str:
    """The image tower's family by name (as `clipforge models` lists it; timm's Eva trunk builds EVA, PE and plain
    ViTs)."""
    vision = config.get("vision_cfg", config)
    if is_fastvit(vision):
        return "FastViT"
    if vision.get("attentional_pool") or "multimodal_cfg" in config:  # a CoCa's (coca_base's: a plain ViT)
        return "CoCa"
    if is_eva(vision):
        return "PE" if vision.get("pool") == "map" else "ViTamin" if vision.get("stem") == "vitamin" else \
            "ViT" if vision.get("key_bias") else "EVA"
    return "ResNet" if is_resnet(vision) else "ConvNeXt" if is_convnext(vision) else "SigLIP" if is_siglip(vision) \
        else "ViT"


def set_grad_checkpointing(model: nn.Module, enable: bool) -> None:
    """Turn block recomputation on or off in every part of ``model`` that offers it (a ``grad_checkpointing``
    flag, or a Hugging Face model's own switch)."""
    for module in model.modules():
        if hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = enable
        elif getattr(module, "supports_gradient_checkpointing", False):  # a transformers PreTrainedModel
            # transformers 5.x's name for it, else the older one (the same switch)
            on, off, kwargs = ("activation_checkpointing_enable", "activation_checkpointing_disable",
                               "activation_checkpointing_kwargs") \
                if hasattr(module, "activation_checkpointing_enable") else \
                ("gradient_checkpointing_enable", "gradient_checkpointing_disable", "gradient_checkpointing_kwargs")
            if enable:
                getattr(module, on)(**{kwargs: {"use_reentrant": False}})
            else:
                getattr(module, off)()


def tower_activation(cfg: dict, quick_gelu: bool) -> str:
    """A tower's MLP activation: its own ``act``, else QuickGELU or GELU as the tower's or model's flag says."""
    return cfg.get("act") or ("quick_gelu" if cfg.get("quick_gelu", quick_gelu) else "gelu")


def build_vision_tower(cfg: dict, embed_dim: int, quick_gelu: bool) -> nn.Module:
    quick_gelu = cfg.get("quick_gelu", quick_gelu)
    if cfg.get("patch_dropout") and (is_siglip(cfg) or is_convnext(cfg) or is_resnet(cfg) or is_eva(cfg)
                                     or is_fastvit(cfg)):
        raise ValueError("patch dropout is built for CLIP's ViT only (not SigLIP's, EVA, ConvNeXt, FastViT or ResNet "
                         "towers)")
    if is_eva(cfg):  # EVA-CLIP's (timm's, under its names)
        return EvaVisionTower.from_config(cfg, embed_dim)
    if is_siglip(cfg):  # SigLIP's tower: attention pooling, no class token, no projection
        if cfg["width"] != embed_dim:
            raise ValueError(f"a SigLIP image tower's width is its embedding: width {cfg['width']} != embed_dim "
                             f"{embed_dim}")
        return SigLIPVisionTransformer(
            image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["width"], layers=cfg["layers"],
            heads=cfg["width"] // cfg.get("head_width", 64), mlp_ratio=cfg.get("mlp_ratio", 4.0),
            act=tower_activation(cfg, quick_gelu), eps=cfg.get("norm_eps", 1e-6), naflex=is_naflex(cfg))
    if is_fastvit(cfg):  # MobileCLIP-S's FastViT (timm's, under its names)
        return FastViT(image_size=cfg["image_size"], depths=list(cfg["depths"]), dims=list(cfg["dims"]),
                       mixers=list(cfg["mixers"]), output_dim=embed_dim, mlp_ratio=cfg.get("mlp_ratio", 3.0),
                       se_downsample=cfg.get("se_downsample"), norm=cfg.get("norm", "batch"),
                       stem_scale_branch=cfg.get("stem_scale_branch", True))
    if is_convnext(cfg):  # LAION's ConvNeXt (timm's, under its names)
        return ConvNeXt(image_size=cfg["image_size"], depths=list(cfg["depths"]), dims=list(cfg["dims"]),
                        output_dim=embed_dim, proj=cfg.get("proj", "linear"), eps=cfg.get("norm_eps", 1e-6))
    if is_resnet(cfg):
        width = cfg.get("width", 64)
        return ModifiedResNet(
            layers=list(cfg["layers"]),
            output_dim=embed_dim,
            heads=width * 32 // cfg.get("head_width", 64),
            image_size=cfg["image_size"],
            width=width,
        )
    vit = VisionTransformer
    if cfg.get("attentional_pool"):  # CoCa's: attentional pooling, tokens for its decoder
        from .coca import CoCaVisionTransformer

        vit = partial(CoCaVisionTransformer, pool_heads=cfg.get("attn_pooler_heads", 8),
                      pool_queries=cfg.get("attn_pooler_queries", 256))
    return vit(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        width=cfg["width"],
        layers=cfg["layers"],
        heads=cfg["width"] // cfg.get("head_width", 64),
        output_dim=embed_dim,
        mlp_ratio=cfg.get("mlp_ratio", 4.0),
        quick_gelu=quick_gelu,
        patch_dropout=cfg.get("patch_dropout", 0.0),
        pool=cfg.get("pool", "tok"),
        ln_pre=cfg.get("ln_pre", True),
        final_ln_after_pool=cfg.get("final_ln_after_pool", False),
        ls_init_value=cfg.get("ls_init_value"),
    )


def build_text_tower(cfg: dict, embed_dim: int, quick_gelu: bool) -> nn.Module:
    if "hf_model_name" in cfg:
        from .hf_text import HFTextEncoder  # optional: needs transformers

        return HFTextEncoder(cfg["hf_model_name"], output_dim=embed_dim, pooling=cfg.get("pooling", "mean"),
                             context_length=cfg.get("context_length", 77), proj=cfg.get("proj", "linear"),
                             pretrained=cfg.get("hf_pretrained", True))
    text = TextTransformer
    if cfg.get("embed_cls"):  # CoCa's: a class token appended after the text
        from .coca import CoCaTextTransformer

        text = partial(CoCaTextTransformer, pad_id=cfg.get("pad_id", 0),
                       correct_cls_mask=cfg.get("correct_cls_mask", False))
    return text(
        context_length=cfg["context_length"],
        vocab_size=cfg["vocab_size"],
        width=cfg["width"],
        layers=cfg["layers"],
        heads=cfg.get("heads", cfg["width"] // 64),
        output_dim=embed_dim,
        mlp_ratio=cfg.get("mlp_ratio", 4.0),
        act=tower_activation(cfg, quick_gelu),
        causal=cfg.get("causal", True),
        pool=cfg.get("pool", "eot"),
        proj=cfg.get("proj", "matrix"),
        eps=cfg.get("norm_eps", 1e-5),
        eos_id=cfg.get("eos_id"),
        ls_init_value=cfg.get("ls_init_value"),
    )


class CLIP(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict,
        text_cfg: dict,
        quick_gelu: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
        logit_scale_max: float | None = LOGIT_SCALE_MAX,
    ):
        """``logit_scale_max``: the temperature's ceiling in ``forward`` (CLIP's 100); None for none (SigLIP's
        configs: neither open_clip nor transformers clamps a loaded SigLIP's temperature). ``vision_cfg`` /
        ``text_cfg`` may also be open_clip's ``CLIPVisionCfg`` / ``CLIPTextCfg``, as its ``CLIP`` takes them (its keys
        translated as an open_clip folder's are; ``config`` then holds clipforge's spelling)."""
        super().__init__()
        if not (isinstance(vision_cfg, dict) and isinstance(text_cfg, dict)):
            from ..open_clip_api import config_from_open_clip_cfgs

            self.config = config_from_open_clip_cfgs(embed_dim, vision_cfg, text_cfg, quick_gelu, init_logit_bias)
            vision_cfg, text_cfg = self.config["vision_cfg"], self.config["text_cfg"]
            quick_gelu = self.config.get("quick_gelu", quick_gelu)
        self.logit_scale_max = logit_scale_max
        self.embed_dim = embed_dim
        self.visual = build_vision_tower(vision_cfg, embed_dim, quick_gelu)
        self.text = build_text_tower(text_cfg, embed_dim, quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        # SigLIP learns a bias next to the temperature; plain CLIP has none.
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # preprocessing gives float32: a model cast to bf16 or fp16 for inference takes images in its own dtype (a
        # NaFlex batch of patches, SigLIP 2's, is cast by its tower)
        dtype = next(self.visual.parameters()).dtype
        images, empty = checked_images(images, self.embed_dim, dtype)
        if empty is not None:
            return empty
        cast = isinstance(images, torch.Tensor) and images.is_floating_point()
        features = self.visual(images.to(dtype) if cast else images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        tokens = batch_input(tokens, "encode_text")
        check_token_batch(tokens, self.context_length)
        if (empty := empty_features(tokens, self.embed_dim, next(self.text.parameters()).dtype)) is not None:
            return empty
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> CLIPOutput:
        image_features = self.encode_image(images, normalize=True) if images is not None else None
        text_features = self.encode_text(tokens, normalize=True) if tokens is not None else None
        scale = self.logit_scale.exp()
        if self.logit_scale_max is not None:
            scale = scale.clamp(max=self.logit_scale_max)
        return CLIPOutput(image_features, text_features, scale, self.logit_bias)

    def forward_intermediates(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                              image_indices=None, text_indices=None, stop_early: bool = False, normalize: bool = True,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              image_output_fmt: str = "NCHW", image_output_extra_tokens: bool = False,
                              text_output_fmt: str = "NLC", text_output_extra_tokens: bool = False,
                              output_logits: bool = False, output_logit_scale_bias: bool = False) -> dict:
        """open_clip's ``forward_intermediates``: the towers' block outputs beside their embeddings, in one dict.

        ``image_indices`` / ``text_indices``: which blocks (a ResNet: stem and stages) to return, None for all, n for
        the last n, a list for those (negative from the end). Keys: ``image_intermediates`` (patch maps [N, width, H,
        W] for "NCHW", tokens for "NLC"), ``image_intermediates_prefix`` (a ViT's class tokens, with
        ``image_output_extra_tokens``), ``text_intermediates`` ([N, L, width]), ``text_intermediates_suffix`` (a
        CoCa's class token), ``image_features`` / ``text_features`` (L2-normalised where ``normalize``), with
        ``output_logits`` ``image_logits`` / ``text_logits``, with ``output_logit_scale_bias`` ``logit_scale`` (and
        ``logit_bias``). ``intermediates_only`` leaves out the embeddings and logits. Built for every image tower
        (the timm-named ones as timm's trunks give them, as open_clip's ``TimmModel``) and every text tower (CoCa's
        included; a Hugging Face encoder's layers as transformers' ``hidden_states``, which open_clip does not
        offer)."""
        if intermediates_only:
            normalize = output_logits = False
        if output_logits and (image is None or text is None):
            raise ValueError("output_logits needs both an image and a text batch")
        output = {}
        for tower, inputs, indices, fmt, extra, key in (
                (self.visual, image, image_indices, image_output_fmt, image_output_extra_tokens, "image_features"),
                (self.text, text, text_indices, text_output_fmt, text_output_extra_tokens, "text_features")):
            if inputs is None:
                continue
            if not hasattr(tower, "forward_intermediates"):  # a tower of a kind added without one
                raise NotImplementedError(f"forward_intermediates: this model's {key.split('_')[0]} tower, a "
                                          f"{type(tower).__name__}, has none")
            if tower is self.visual and inputs.is_floating_point():
                inputs = inputs.to(next(tower.parameters()).dtype)  # as encode_image casts
            result = tower.forward_intermediates(inputs, indices, stop_early, normalize_intermediates,
                                                 intermediates_only, fmt, extra)
            if normalize and key in result:
                result[key] = F.normalize(result[key], dim=-1)
            output.update(result)
        if output_logits or output_logit_scale_bias:
            scale = self.logit_scale.exp()
        if output_logits:
            output["image_logits"] = scale * output["image_features"] @ output["text_features"].T
            if self.logit_bias is not None:
                output["image_logits"] = output["image_logits"] + self.logit_bias
            output["text_logits"] = output["image_logits"].T
        if output_logit_scale_bias:
            output["logit_scale"] = scale
            if self.logit_bias is not None:
                output["logit_bias"] = self.logit_bias
        return output

    def _block_stacks(self):
        """The towers' own transformer stacks (not a ResNet's, nor a Hugging Face text encoder's)."""
        for tower in (self.visual, self.text):
            if isinstance(getattr(tower, "transformer", None), Transformer):
                yield tower.transformer

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them: clipforge's transformer stacks,
        the timm-named trunks (EVA, PE, ViTamin, MobileCLIP's ViTs, ConvNeXt stages) and Hugging Face text towers.
        FastViT and ResNet towers train without it: recomputing a batch-norm block in training mode would move its
        running statistics twice."""
        set_grad_checkpointing(self, enable)

    def set_activation_recompute(self, enable: bool = True) -> None:
        """On (the default): the transformer blocks keep their LayerNorm, GELU and head-merge outputs out of memory
        and recompute them in backward, with the same gradients. Off keeps them: on an H200 (ViT-B-32, batch 256,
        bf16) steps are 1.15x faster and the peak above weights and optimiser state 1.38x higher
        (docs/BENCHMARKS.md)."""
        for transformer in self._block_stacks():
            transformer.lean = enable

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False, lock_head: bool = False) -> None:
        """LiT: freeze the image tower (weights and batch-norm statistics). ``unlocked_groups``: leave its last groups
        training, grouped as open_clip groups them (a ViT as its ``VisionTransformer.lock``: the patch and position
        embeddings with ln_pre, each block, the last block with ln_post, the projection; the timm-named towers, SigLIP's,
        EVA's, PE's, ViTamin's, ConvNeXt's and FastViT's, as timm's ``group_matcher``, open_clip's head always in the
        last group); the tower then stays in training mode. ``freeze_bn_stats``: with ``unlocked_groups``, the locked
        groups' batch norms keep their running statistics (open_clip's switch); a tower locked whole keeps them anyway.
        Locked whole, a timm-named tower freezes its ``trunk``: open_clip's projection head outside it (ConvNeXt's,
        ViTamin's) trains, as under open_clip's ``--lock-image``; ``lock_head`` freezes it too (LiT's whole tower)."""
        if lock_head and unlocked_groups:
            raise ValueError("a locked image head with unlocked groups: the head is in the last group, which trains; "
                             "lock the tower whole to freeze its head")
        if unlocked_groups:
            if not hasattr(self.visual, "lock_groups"):
                raise ValueError(f"unlocked image groups: built for ViT, ConvNeXt and FastViT image towers (a ResNet is "
                                 f"locked whole, as in open_clip); this model's is a {type(self.visual).__name__}: "
                                 f"lock it whole or not at all")
            unlock_last(self.visual, self.visual.lock_groups(), unlocked_groups, "--lock-image-unlocked-groups",
                        "groups")
            self._frozen_norms = frozen_batch_norms(self.visual) if freeze_bn_stats else []
            self._locked_image = False  # (a tower locked whole before) the unlocked part trains in training mode
            self.train(self.training)
            return
        # open_clip's TimmModel.lock freezes the trunk only: a projection head outside it (ConvNeXt's, ViTamin's) keeps
        # training, as it must when a new head sits on a pretrained trunk. Its mode follows the tower's (eval).
        (self.visual if lock_head else getattr(self.visual, "trunk", self.visual)).requires_grad_(False)
        self.visual.eval()
        self._locked_image = True

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower. A pretrained Hugging Face tower keeps its projection, new to this model, trainable
        (as open_clip does); CLIP's own text tower is frozen whole. ``unlocked_layers``: leave its last layers
        training, as open_clip counts them (CLIP's tower: the embeddings, each block, the last block with ln_final,
        the projection; a Hugging Face tower: the embeddings and each layer); the tower then stays in training mode.
        ``freeze_layer_norm=False`` (a Hugging Face tower): its LayerNorms train too, as open_clip's default does."""
        if hasattr(self.text, "lock"):
            self.text.lock(unlocked_layers, freeze_layer_norm)
            return
        if not freeze_layer_norm:
            raise ValueError("unfrozen LayerNorms in a locked text tower: built for Hugging Face text towers (as "
                             "open_clip's); CLIP's own text tower treats its LayerNorms as its other weights")
        if unlocked_layers:
            unlock_last(self.text, self.text.lock_groups(), unlocked_layers, "--lock-text-unlocked-layers", "layers")
            return
        self.text.requires_grad_(False)
        self.text.eval()
        self._locked_text = True

    def train(self, mode: bool = True) -> "CLIP":
        super().train(mode)
        # A locked tower stays in eval mode so its dropout and batch-norm statistics do not move.
        if getattr(self, "_locked_image", False):
            self.visual.eval()
        if getattr(self, "_locked_text", False):
            self.text.eval()
        for norm in getattr(self, "_frozen_norms", ()):  # a partly locked tower's frozen batch norms
            norm.eval()
        return self
