"""FSDP (``train.parallel = "fsdp"``): shard each transformer block and the root with FSDP2.

Checkpoints are sharded by default (``ccalign.train.sharded``). With ``checkpoint.format =
"full"`` the whole model and optimizer states are gathered here with
``torch.distributed.checkpoint.state_dict`` (to the CPU, on rank 0) and loaded back the same way;
the final model is always gathered into one file. Works with nccl on CUDA and with gloo on the
CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_LOAD = StateDictOptions(full_state_dict=True)


def shard(model: nn.Module, device_type: str, world_size: int) -> nn.Module:
    """Apply FSDP2 to every block in ``model.layers`` and to the root, in place."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"FSDP shards per block and needs a model with a .layers ModuleList; "
            f"{type(model).__name__} has none: use train.parallel = 'ddp'"
        )
    mesh = init_device_mesh(device_type, (world_size,))
    for block in layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole state_dict on the CPU of rank 0 (empty elsewhere); every rank must call."""
    return get_model_state_dict(model, options=_GATHER)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state keyed by parameter name, on rank 0; every rank must call."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state_dict (given on every rank) into a sharded model."""
    set_model_state_dict(model, state, options=_LOAD)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load a full optimizer state (given on every rank) into a sharded model's optimizer."""
    set_optimizer_state_dict(model, optimizer, state, options=_LOAD)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor behind a DTensor shard (a collective), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def copy_full_into(target: Tensor, full: Tensor) -> None:
    """Copy a whole tensor into ``target``, keeping only this rank's shard of a DTensor."""
    if isinstance(target, DTensor):
        local = distribute_tensor(full.to(target.device), target.device_mesh, target.placements)
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(full)
