"""Worker processes for the multi-process tests: a simulated kill, forked ranks, launching."""

from __future__ import annotations

import torch.multiprocessing as mp

from ccalign.train import TrainConfig, run_training


class Killed(Exception):
    """Raised by ``kill_after``: stands for the process dying after a step."""


def kill_after(step: int):
    """A trainer callback that 'kills' the run once ``step`` has been logged."""

    def callback(trainer, record):
        if record["step"] == step:
            raise Killed

    return callback


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a gloo rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_rank(rank: int, world: int, port: int) -> None:
    """Make this forked worker rank ``rank`` of ``world`` as torchrun would, on one thread."""
    import os

    import torch

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )

def _worker(rank: int, world: int, port: int, config: TrainConfig, kill: int, resume: bool) -> None:
    become_rank(rank, world, port)
    try:
        run_training(config, resume=resume, callbacks=[kill_after(kill)] if kill else [])
    except Killed:
        pass

def launch(config: TrainConfig, kill: int = 0, resume: bool = False) -> None:
    """Two workers started by a fork server: a clean process that imported torch once, so the
    workers start fast without inheriting the test process's threads (a plain fork deadlocked a
    worker on a lock another thread held, once in a full suite run)."""
    args = (2, free_port(), config, kill, resume)
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="forkserver")
