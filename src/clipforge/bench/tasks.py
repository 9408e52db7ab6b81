"""One measurement each. ``embed``, ``train_speed`` and ``train_memory`` take a task dict (model, batch, steps,
device, ...) and the implementations to compare, and run inside a worker process (``bench.worker``)."""
from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.nn.functional as F

from ..loss import ClipLoss
from ..models import is_resnet
from ..tokenizer import get_tokenizer
from ..train.optim import build_optimizer
from .corpora import distinct_captions, real_captions
from .timing import interleaved, rss_peak_growth, summary


def autocast(task: dict):
    """bf16 autocast on GPU; fp32 on CPU, where bf16 matmul is slow."""
    device = task.get("device", "cpu")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=device != "cpu" and task.get("bf16", True))


def _sync(task: dict) -> None:
    if task.get("device", "cpu") != "cpu":
        torch.cuda.synchronize()


def embed_speed(task: dict, ours, models: dict) -> dict:
    """Images (or texts, ``task["what"] == "text"``) per second through each implementation's encoder."""
    device = task.get("device", "cpu")
    text = task.get("what", "image") == "text"
    if text:
        inputs = get_tokenizer(task["model"])(distinct_captions(task.get("data"), task["n"])).to(device)
    else:
        inputs = torch.randn(task["n"], 3, ours.image_size, ours.image_size, device=device)
    runs = {}
    for impl, model in models.items():
        model.eval()
        if impl == "transformers":
            encode = ((lambda x, m=model: m.get_text_features(input_ids=x)) if text
                      else (lambda x, m=model: m.get_image_features(pixel_values=x)))
        else:
            encode = model.encode_text if text else model.encode_image

        def run(encode=encode):
            with torch.no_grad(), autocast(task):
                for i in range(0, len(inputs), task["batch"]):
                    encode(inputs[i:i + task["batch"]])
            _sync(task)

        run()  # warm-up (and cuDNN / kernel selection on GPU)
        runs[impl] = run
    return summary(interleaved(runs, task["repeats"]), len(inputs), "texts_per_s" if text else "images_per_s")


def _features_for_loss(impl: str, model, net):
    """``(images, tokens) -> (image features, text features, logit scale)`` through ``net`` (``model`` itself or
    compiled), as each implementation's training computes them: transformers' CLIPModel by keyword, returning
    normalised embeddings, with the scale applied by the caller as its own loss does."""
    if impl == "transformers":
        def forward(images, tokens):
            out = net(input_ids=tokens, pixel_values=images)
            return out.image_embeds, out.text_embeds, model.logit_scale.exp()
        return forward
    return lambda images, tokens: net(images, tokens)[:3]


def train_step_fn(impl: str, model, tokens: torch.Tensor, images: torch.Tensor, task: dict):
    """forward, contrastive loss, backward, AdamW step: clipforge with its own optimiser (fused AdamW where the
    kernel exists), the peers with the same parameter groups on torch's default AdamW, as open_clip's training uses;
    every implementation through the same loss."""
    optimizer = build_optimizer(model, 1e-4, 0.2, fused=None if impl == "clipforge" else False)
    loss_fn, batch = ClipLoss(), len(images)
    model.train()
    if task.get("device", "cpu") != "cpu" and impl == "clipforge" and is_resnet(model.config):
        model.to(memory_format=torch.channels_last)  # as clipforge train does for ResNets on GPU
    eager = _features_for_loss(impl, model, model)
    compiled = _features_for_loss(impl, model, torch.compile(model)) if task.get("compile") else eager

    def step(i, eager_step=False):
        """One step on batch ``i``; ``eager_step`` runs the uncompiled model (FLOP counting cannot see into a
        compiled graph; the arithmetic is the same)."""
        optimizer.zero_grad(set_to_none=True)
        with autocast(task):
            forward = eager if eager_step else compiled
            image_features, text_features, scale = forward(images, tokens[i * batch:(i + 1) * batch])
            loss = loss_fn(image_features.float(), text_features.float(), scale)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _train_inputs(task: dict, ours):
    device = task.get("device", "cpu")
    captions = real_captions(task.get("data"), task["batch"] * (task["steps"] + 2))
    images = torch.randn(task["batch"], 3, ours.image_size, ours.image_size, device=device)
    return get_tokenizer(task["model"])(captions).to(device), images


def train_speed(task: dict, ours, models: dict) -> dict:
    """Samples per second of full training steps, every implementation on the same batches, from the same weights
    (so the same first loss); clipforge's FLOPs per step for MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens, images = _train_inputs(task, ours)
    steps = {impl: train_step_fn(impl, m, tokens, images, task) for impl, m in models.items()}
    first_loss = {impl: step(0) for impl, step in steps.items()}  # under torch.compile this step compiles
    flops = None
    if "clipforge" in steps:
        counter = FlopCounterMode(display=False)
        with counter:
            steps["clipforge"](1, eager_step=True)
        flops = counter.get_total_flops()
    for impl, step in steps.items():
        step(1)  # a second untimed step each (clipforge's FLOP-counting step was eager)
    positions = {impl: iter(range(2, task["steps"] + 2)) for impl in steps}  # every implementation sees each batch
    times = interleaved({impl: (lambda s=step, pos=positions[impl]: s(next(pos))) for impl, step in steps.items()},
                        task["steps"])
    out = summary(times, task["batch"], "samples_per_s")
    for impl in steps:
        out[impl]["first_loss"] = first_loss[impl]
    if flops is not None:
        out["clipforge"]["flops_per_step"] = flops
        out["clipforge"]["achieved_gflops"] = flops / statistics.median(times["clipforge"]) / 1e9
    return out


def train_memory(task: dict, ours, models: dict) -> dict:
    """Peak memory over a few steps, one implementation per process so peaks do not mix: resident-set growth on
    CPU, ``torch.cuda.max_memory_allocated`` on GPU."""
    if not models:  # the implementation is not installed or has no such architecture: the worker says so
        return {}
    (impl, model), = models.items()
    tokens, images = _train_inputs(task, ours)
    on_gpu = task.get("device", "cpu") != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # the optimiser is built before the baseline: constructing the first one imports torch._dynamo (~140 MB of
    # modules), a one-off cost a process pays wherever it first touches torch.optim, not training memory
    step = train_step_fn(impl, model, tokens, images, task)
    growth = rss_peak_growth()
    for i in range(task["steps"]):
        step(i)
    if on_gpu:
        return {impl: {"peak_memory_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}}
    return {impl: {"peak_rss_growth_mb": growth()}}


def tokenizer_speed(makers: dict, captions: list[str], repeats: int, warm: bool = False) -> dict:
    """Captions/s of each tokenizer class, taking turns with the order alternating. Cold (default): a fresh
    tokenizer per repeat, its construction not timed; warm: one tokenizer that has seen the captions."""
    tokenizers = {name: make() for name, make in makers.items()} if warm else {}
    for tokenizer in tokenizers.values():
        tokenizer(captions)
    times = {name: [] for name in makers}
    for r in range(repeats):
        for name in (list(makers) if r % 2 == 0 else list(makers)[::-1]):
            tokenizer = tokenizers[name] if warm else makers[name]()
            # as timeit does: the garbage of earlier turns collected first, no collection pause inside a timed run
            # (a full collection walking the previous tokenizer's caches cost some runs 2.5x)
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                tokenizer(captions)
                times[name].append(time.perf_counter() - start)
            finally:
                gc.enable()
    return summary(times, len(captions), "captions_per_s")


def loss_memory(sizes=(512, 1024, 2048, 4096), device: str = "cpu") -> dict:
    """MB autograd keeps between forward and backward, dense vs chunked ClipLoss."""
    rows = {}
    for n in sizes:
        row = {}
        for name, loss_fn in (("dense", ClipLoss()), ("chunked", ClipLoss(chunk_size=256))):
            a = F.normalize(torch.randn(n, 128, device=device), dim=-1).requires_grad_()
            b = F.normalize(torch.randn(n, 128, device=device), dim=-1).requires_grad_()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                          lambda t: t):
                loss = loss_fn(a, b, torch.tensor(10.0, device=device))
            loss.backward()
            row[name] = sum(saved) / 2**20
        rows[n] = row
    return rows
