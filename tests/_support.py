"""Helpers shared by the trainer tests: a simulated kill at a chosen step, and forked ranks."""


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
