"""The implementations compared: clipforge's model, and the same architecture and weights in open_clip or
transformers (None when the peer is not installed or has no such architecture); and open_clip's model and loss
speaking clipforge's training-loop interface, for recipes run through the same loop."""
from __future__ import annotations

import torch

from ..checkpoint import CheckpointError, clipforge_config_to_hf, clipforge_to_hf, clipforge_to_openai
from ..models import create_model, get_model_config
from .timing import CLIPFORGE_BACKENDS

IMPLEMENTATIONS = ("clipforge", "open_clip", "transformers", *CLIPFORGE_BACKENDS)


def build(name: str):
    """clipforge's randomly initialised zoo model, carrying its config."""
    model = create_model(name)
    model.config = get_model_config(name)
    return model


_ONNX_EXPORTS: dict[int, str] = {}  # one export (with its int8 graph) per model, shared by onnx and onnx-int8


def _onnx_peer(ours, int8: bool):
    """``ours`` exported to ONNX (in a temporary folder, removed at exit) and run by ONNX Runtime."""
    import atexit
    import shutil
    import tempfile

    from ..onnx_backend import OnnxCLIP, export_onnx

    try:
        if id(ours) not in _ONNX_EXPORTS:
            folder = tempfile.mkdtemp(prefix="clipforge-bench-onnx-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            export_onnx(ours, folder, int8=True)
            _ONNX_EXPORTS[id(ours)] = folder
        return OnnxCLIP(_ONNX_EXPORTS[id(ours)], int8=int8)
    except ImportError:  # clipforge[onnx] is not installed
        return None


def peer(impl: str, ours):
    """``ours`` (a clipforge model with ``.config``) as ``impl`` builds it, with the same weights."""
    if impl == "clipforge":
        return ours
    if impl == "open_clip":
        try:
            from open_clip.model import CLIP, CustomTextCLIP
        except ImportError:
            return None
        cfg = ours.config
        hf_text = "hf_model_name" in cfg["text_cfg"]  # open_clip builds those as CustomTextCLIP, keys under text.
        model = (CustomTextCLIP if hf_text else CLIP)(
            embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=open_clip_text_cfg(cfg["text_cfg"]),
            quick_gelu=cfg.get("quick_gelu", False))
        model.load_state_dict(ours.state_dict() if hf_text else clipforge_to_openai(ours.state_dict()))
        return model
    if impl in ("onnx", "onnx-int8"):
        return _onnx_peer(ours, int8=impl == "onnx-int8")
    if impl == "bf16":  # as `--precision bf16` runs it: the weights cast, images cast by encode_image
        import copy

        return copy.deepcopy(ours).to(torch.bfloat16)
    if impl == "transformers":
        try:
            import transformers
        except ImportError:
            return None
        try:
            hf_cfg = clipforge_config_to_hf(ours.config, ours.logit_scale.item())
        except CheckpointError:  # no CLIPModel of this kind (a ResNet, LayerScale, CLIPA's pooling ...)
            return None
        config = transformers.CLIPConfig(text_config=hf_cfg["text_config"], vision_config=hf_cfg["vision_config"],
                                         projection_dim=hf_cfg["projection_dim"])
        model = transformers.CLIPModel(config)
        model.load_state_dict(clipforge_to_hf(ours.state_dict()), strict=False)
        return model
    raise ValueError(f"unknown implementation {impl!r}: expected one of {', '.join(IMPLEMENTATIONS)}")


def open_clip_text_cfg(text_cfg: dict) -> dict:
    """clipforge's text config as open_clip spells it: a Hugging Face tower by its local folder, mean-pooled, with a
    linear projection (clipforge's HFTextEncoder); CLIP's own text tower as it is."""
    if "hf_model_name" not in text_cfg:
        return text_cfg
    from ..models.hf_text import resolve_hf_model

    if text_cfg.get("pooling", "mean") != "mean":
        raise ValueError("open_clip peer: only mean-pooled Hugging Face text towers are built alike")
    return {"hf_model_name": resolve_hf_model(text_cfg["hf_model_name"]), "hf_tokenizer_name":
            resolve_hf_model(text_cfg["hf_model_name"]), "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
            "context_length": text_cfg.get("context_length", 77)}


class OpenClipForTraining(torch.nn.Module):
    """open_clip's CLIP, built from a clipforge model's config with that model's weights, speaking the training
    loop's interface (``forward`` -> ``CLIPOutput``; ``lock_*_tower`` as open_clip locks them)."""

    def __init__(self, ours):
        super().__init__()
        self.inner = peer("open_clip", ours)
        if self.inner is None:
            raise ImportError("open_clip is not installed (pip install open-clip-torch)")
        self.image_size = ours.image_size
        self.text = _OpenClipTextCache(self)  # a plain object (not a module): ``text.cache_features()`` for the loop
        self.text_features = None  # once cached: the frozen Hugging Face transformer's pooled output per token row

    @property
    def logit_scale(self):
        return self.inner.logit_scale

    def forward(self, images, tokens):
        from ..models import CLIPOutput

        if self.text_features is None:
            image_features, text_features, scale = self.inner(images, tokens)[:3]
            return CLIPOutput(image_features, text_features, scale)
        text = self.inner.text.proj(self.text_features(tokens))
        return CLIPOutput(self.inner.encode_image(images, normalize=True),
                          torch.nn.functional.normalize(text, dim=-1), self.inner.logit_scale.exp())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.text_features is not None:  # cached features are dropout-free: so must any computed afresh be
            self.inner.text.transformer.eval()
        return self

    def encode_image(self, images, normalize=False):
        return self.inner.encode_image(images, normalize=normalize)

    def encode_text(self, tokens, normalize=False):
        return self.inner.encode_text(tokens, normalize=normalize)

    def lock_image_tower(self):
        self.inner.lock_image_tower()

    def lock_text_tower(self):
        self.inner.lock_text_tower()

    def set_grad_checkpointing(self, enable=True):
        self.inner.set_grad_checkpointing(enable)


class _OpenClipTextCache:
    """``cache_features()`` for open_clip's locked Hugging Face text tower, as clipforge's towers have it: the frozen
    transformer's mean-pooled output kept per distinct token row, computed without dropout (open_clip itself leaves
    dropout on in a locked tower, so its text features are noisy; cached ones cannot be). The projection still trains."""

    def __init__(self, owner: OpenClipForTraining):
        self.owner = owner

    def cache_features(self):
        from ..models.feature_cache import FeatureCache

        text = self.owner.inner.text
        if not hasattr(text, "transformer") or any(p.requires_grad for p in text.transformer.parameters()):
            raise ValueError("open_clip peer: only a locked Hugging Face text tower's features can be cached")
        text.transformer.eval()

        def pooled(tokens: torch.Tensor) -> torch.Tensor:
            mask = (tokens != text.config.pad_token_id).long()
            return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)

        self.owner.text_features = FeatureCache(pooled)
        return self.owner.text_features


class OpenClipLoss(torch.nn.Module):
    """open_clip's ClipLoss behind the loop's loss signature."""

    def __init__(self):
        super().__init__()
        import open_clip

        self.inner = open_clip.ClipLoss()

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        return self.inner(image_features, text_features, logit_scale)
