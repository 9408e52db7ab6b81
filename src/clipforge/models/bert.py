"""BERT's encoder in plain PyTorch, under transformers' parameter names, as a text tower's transformer.

Models built on a BERT sentence encoder (the Flickr8k recipe's all-MiniLM-L6-v2) would otherwise import transformers
in every command that loads them: ~3.5 s of a 2-core box's start-up (its import pulls in torch's compiler, torch's
distributed tensors and scipy), paid by each `clipforge search`, `classify` or server start. The weights and their
names are transformers' ``BertModel``'s, so checkpoints are interchangeable both ways, and the features agree with
transformers' to float rounding (``tests/test_bert.py``). What this does not cover (relative positions, another
activation, a decoder, RoBERTa's position offsets, T5) is built by transformers, as before (``supports``).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}  # transformers' "gelu" is the exact (erf) GELU
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_config(folder: str | Path) -> dict:
    """A Hugging Face model folder's ``config.json`` as a dict."""
    from ..files import read_json

    try:
        return read_json(Path(folder) / "config.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} holds no config.json: not a Hugging Face model folder") from None


def supports(config: dict, folder: str | Path | None = None) -> bool:
    """Whether this module builds the model ``config`` describes (and, given ``folder``, reads its weights: one
    file, not shards): a BERT encoder with absolute positions and a GELU or ReLU."""
    plain_bert = config.get("model_type") == "bert" \
        and config.get("position_embedding_type", "absolute") == "absolute" \
        and config.get("hidden_act", "gelu") in ACTIVATIONS \
        and not config.get("is_decoder") and not config.get("add_cross_attention") \
        and not config.get("chunk_size_feed_forward")
    return plain_bert and (folder is None or any((Path(folder) / name).is_file() for name in WEIGHT_FILES))


class BertOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # the embeddings' and each layer's, where asked for


class BertEmbeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        width = config["hidden_size"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], width, padding_idx=config.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(config.get("max_position_embeddings", 512), width)
        self.token_type_embeddings = nn.Embedding(config.get("type_vocab_size", 2), width)
        self.LayerNorm = nn.LayerNorm(width, eps=config.get("layer_norm_eps", 1e-12))
        self.dropout = nn.Dropout(config.get("hidden_dropout_prob", 0.1))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"{length} tokens: this text transformer has {self.position_embeddings.num_embeddings} "
                             "positions")
        types = self.token_type_embeddings.weight[0] if token_type_ids is None else \
            self.token_type_embeddings(token_type_ids)
        x = self.word_embeddings(input_ids) + types + self.position_embeddings.weight[:length]
        return self.dropout(self.LayerNorm(x))


class BertLayer(nn.Module):
    """Post-norm attention and MLP; the containers only reproduce transformers' names (``attention.self.query``,
    ``attention.output.dense``, ``intermediate.dense``, ``output.LayerNorm``, ...)."""

    def __init__(self, config: dict):
        super().__init__()
        width, hidden = config["hidden_size"], config["intermediate_size"]
        eps = config.get("layer_norm_eps", 1e-12)
        self.heads = config["num_attention_heads"]
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({name: nn.Linear(width, width) for name in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": nn.Linear(width, width), "LayerNorm": nn.LayerNorm(width, eps=eps)})})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(width, hidden)})
        self.output = nn.ModuleDict({"dense": nn.Linear(hidden, width), "LayerNorm": nn.LayerNorm(width, eps=eps)})
        self.act = ACTIVATIONS[config.get("hidden_act", "gelu")]
        self.dropout = config.get("hidden_dropout_prob", 0.1)
        self.attention_dropout = config.get("attention_probs_dropout_prob", 0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, length, width = x.shape
        projections = self.attention["self"]
        q, k, v = (projections[name](x).view(n, length, self.heads, -1).transpose(1, 2)
                   for name in ("query", "key", "value"))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  dropout_p=self.attention_dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(n, length, width)
        out = self.attention["output"]
        x = out["LayerNorm"](F.dropout(out["dense"](attended), self.dropout, self.training) + x)
        mlp = self.output["dense"](self.act(self.intermediate["dense"](x)))
        return self.output["LayerNorm"](F.dropout(mlp, self.dropout, self.training) + x)


class BertEncoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config["num_hidden_layers"]))


class Bert(nn.Module):
    """transformers' ``BertModel`` as an encoder: ``(input_ids, attention_mask)`` -> ``BertOutput``. ``pooler``:
    keep BERT's pooler head (a tanh layer on the first token), used only by "cls_pooler" pooling."""

    def __init__(self, config: dict, pooler: bool = False):
        super().__init__()
        if not supports(config):
            raise ValueError(f"not a plain BERT encoder: {config.get('model_type')!r} with "
                             f"{config.get('position_embedding_type', 'absolute')} positions and "
                             f"{config.get('hidden_act')!r}; build it with transformers")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        width = config["hidden_size"]
        self.pooler = nn.ModuleDict({"dense": nn.Linear(width, width)}) if pooler else None
        self.grad_checkpointing = False
        self.init_parameters()

    def init_parameters(self) -> None:
        """transformers' initialisation for BERT: normal weights, zero biases, unit norms, a zero padding row."""
        std = self.config.get("initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, folder: str | Path, pooler: bool = False) -> "Bert":
        """The encoder with the weights in ``folder`` (``model.safetensors``, else ``pytorch_model.bin`` read
        without unpickling code), saved by transformers from a ``BertModel`` or a model holding one (``bert.``)."""
        folder = Path(folder)
        model = cls(read_config(folder), pooler=pooler)
        model.load_state_dict(_pretrained_state(folder, model), strict=True)
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False) -> BertOutput:
        """``output_hidden_states``: also the embeddings' output and each layer's (transformers' ``hidden_states``)."""
        x = self.embeddings(input_ids, token_type_ids)
        states = [x]
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # [N, 1, 1, length]: which keys each query may attend
            tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
            if not tracing and not mask.is_cuda and bool(mask.all()):
                mask = None  # unmasked attention takes SDPA's fastest kernel (the check would cost a GPU a sync)
        for layer in self.encoder.layer:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
            states.append(x)
        pooled = torch.tanh(self.pooler["dense"](x[:, 0])) if self.pooler is not None else None
        return BertOutput(x, pooled, tuple(states) if output_hidden_states else None)


def _pretrained_state(folder: Path, model: nn.Module) -> dict:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    else:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if not any(key.startswith("embeddings.") for key in state):  # a BertForMaskedLM's etc.: the encoder under bert.
        state = {key.removeprefix("bert."): value for key, value in state.items()}
    # the pooler, where wanted and not saved (a masked-LM's weights), keeps its initialisation, as in transformers
    expected = {key: state.get(key, value) if key.startswith("pooler.") else state.get(key)
                for key, value in model.state_dict().items()}
    missing = [key for key, value in expected.items() if value is None]
    if missing:
        raise ValueError(f"{folder}: the weights lack {len(missing)} of this BERT's parameters, e.g. "
                         f"{', '.join(missing[:3])}")
    return expected  # heads (a pooler unused here, MLM, NSP) and buffers left out
