"""Process-group setup from torchrun's environment, and the deterministic batch plan.

Sharding is ours rather than DistributedSampler's so the data position (epoch, step within the
epoch) fully determines what every process reads next: a resumed run continues exactly.
The epoch's order is a permutation seeded by (seed, epoch); optimizer step s of the epoch takes
the global slice [s * G, (s + 1) * G) (G = global batch, the remainder is dropped), and that
slice is cut into micro-batches of M rows, chunk c = rank * accum + micro_step. The same chunks
therefore exist for 1 process x k micro-steps and k processes x 1 micro-step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...); single process if absent.

    Backend: nccl for CUDA, gloo for CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank, world_size, local_rank, True)


def launched_as_main() -> bool:
    """Whether this process is rank 0 (or alone), known from torchrun's environment before the
    process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def shutdown(info: DistInfo) -> None:
    """Leave the process group if this module created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``auto``: this process's CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device is cuda but no CUDA device is visible; use cpu")
        device = torch.device("cuda", info.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split over processes and micro-steps."""

    dataset_size: int
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int

    def __post_init__(self):
        per_step = self.micro_batch * self.world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"train.global_batch {self.global_batch} is not a multiple of micro_batch "
                f"{self.micro_batch} x {self.world_size} process(es); change one of them"
            )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data set has {self.dataset_size} samples, fewer than one global batch of "
                f"{self.global_batch}; lower train.global_batch"
            )

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of sample indices for ``epoch`` (the same on every process)."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.dataset_size)

    def micro_batches(self, order: np.ndarray, step_in_epoch: int, rank: int) -> list[np.ndarray]:
        """Sample indices of this process's micro-batches for one optimizer step."""
        start = step_in_epoch * self.global_batch
        size = self.micro_batch
        return [order[start + lo : start + lo + size] for lo in self.chunk_offsets(rank)]

    def chunk_offsets(self, rank: int) -> list[int]:
        """Offsets within the global batch of this process's micro-batches."""
        first = rank * self.accum_steps
        return [(first + m) * self.micro_batch for m in range(self.accum_steps)]


#: streams of keyed draws: the null-class row mask, and the objectives' per-row uniforms
MASK_STREAM = 0x6D61736B  # "mask"
DRAWS_STREAM = 0x64726177  # "draw"


def keyed_row_mask(seed: int, step: int, size: int, ratio: float) -> torch.Tensor:
    """(size,) bool with P(True) = ratio, a pure function of (seed, step): equal on all ranks."""
    if ratio <= 0.0:
        return torch.zeros(size, dtype=torch.bool)
    return keyed_uniforms(seed, step, size, MASK_STREAM) < ratio


def keyed_uniforms(seed: int, step: int, size: int, stream: int) -> torch.Tensor:
    """(size,) float32 U[0, 1), a pure function of (seed, step, stream): equal on all ranks."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.rand(size, generator=generator)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over processes (identity for one process)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def gather_objects(obj: object, info: DistInfo) -> list:
    """Every process's ``obj``, in rank order (a one-element list for one process)."""
    if not info.distributed:
        return [obj]
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
