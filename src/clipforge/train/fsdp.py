"""Fully sharded training (``clipforge train --fsdp``): PyTorch's FSDP2 and sharded checkpoints (DCP).

Each rank holds 1/world of the weights, gradients and AdamW state: parameters are gathered per residual block just
before it runs and freed after, so a model whose training state exceeds one device fits across several. The units
are ``fully_shard`` per residual block (every child of a ``ModuleList``), per tower and for the root (the temperature
and what else sits at the top). On GPU with bf16 the mixed-precision policy computes in bf16 and reduces gradients in
fp32; on CPU everything stays fp32.

Checkpoints are written by every rank at once with ``torch.distributed.checkpoint`` into ``sharded/`` of the step
folder (model and optimizer, each rank its shard), beside ``config.json`` and the usual ``train_state.pt`` (schedule,
scaler, RNG and data positions; the optimizer lives in the shards). The folder is assembled under a temporary name and
renamed by rank 0 once every rank has written, like every clipforge checkpoint. ``read_sharded_weights`` turns one
back into a plain state dict in a single process (no process group), which is how ``clipforge.load`` and
``clipforge convert`` read such a folder.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.io import SHARDED


def shard_model(model: nn.Module, bf16: bool = False) -> nn.Module:
    """``fully_shard`` every residual block, each tower, then the root; in place (the module stays itself)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    # FSDP2 cannot shard 0-dim parameters (the temperature, SigLIP's bias): they stay whole on every rank, and their
    # gradients are averaged across ranks by a hook, as DDP would
    scalars = {p for p in model.parameters() if p.dim() == 0}
    if dist.get_world_size() > 1:  # every rank starts from rank 0's weights, as DDP makes it (seeds differ by rank)
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, src=0)

    def shard(module: nn.Module) -> None:
        fully_shard(module, mp_policy=policy, ignored_params={p for p in module.parameters() if p in scalars} or None)

    done = set()
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if id(block) not in done and any(True for _ in block.parameters()):
                    shard(block)
                    done.add(id(block))
    for name in ("visual", "text"):
        tower = getattr(model, name, None)
        if isinstance(tower, nn.Module) and any(True for _ in tower.parameters()):
            shard(tower)
            if hasattr(tower, "forward_tokens"):  # CoCa's towers are also called by this method: gather for it too
                register_fsdp_forward_method(tower, "forward_tokens")
    shard(model)
    if dist.get_world_size() > 1:
        for parameter in scalars:
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(_average_gradient)
    return model


def _average_gradient(parameter: nn.Parameter) -> None:
    """The mean of this gradient over ranks (gloo has no AVG: sum the shares). Under accumulation the part already
    averaged is the same on every rank, so averaging again after each micro-batch stays exact."""
    share = parameter.grad / dist.get_world_size()
    dist.all_reduce(share)
    parameter.grad.copy_(share)


def init_single_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one process (``--fsdp`` without torchrun): a private one-rank group."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def save_sharded_checkpoint(run_dir: Path, step: int, model, optimizer, model_config: dict, train_state: dict,
                            rank: int, keep: int | None) -> Path:
    """Every rank writes its shard of model + optimizer into a temporary step folder; rank 0 adds ``config.json``
    and ``train_state.pt``, renames the folder into place and prunes old ones. Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ..files import write_json
    from .checkpoints import new_step_folder, publish_step_folder, write_train_state

    names = [None, None]
    if rank == 0:
        names = [str(path) for path in new_step_folder(run_dir, step)]
    dist.broadcast_object_list(names, src=0)
    tmp, final = map(Path, names)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / SHARDED))
    dist.barrier()
    if rank == 0:
        try:
            write_json(tmp / "config.json", {"format": "clipforge-sharded", "model_cfg": model_config})
            write_train_state(tmp, train_state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_step_folder(tmp, final, run_dir, keep)
    dist.barrier()
    return final


def load_sharded_checkpoint(folder: Path, model, optimizer) -> None:
    """Each rank reads its shard of model and optimizer state from ``folder/sharded`` (any world size DCP allows)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_sharded_weights(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full state dict, model config) of a sharded step folder, in this one process: the model is built from the
    folder's config and DCP fills its tensors (the optimizer shards are not read)."""
    import torch.distributed.checkpoint as dcp

    from ..models import create_model

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())["model_cfg"]
    state = create_model(config).state_dict()
    wrapped = {"model": state}
    with warnings.catch_warnings():  # (DCP warns that it loads in one process: that is the point here)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wrapped, checkpoint_id=str(folder / SHARDED), no_dist=True)
    return wrapped["model"], config
