"""Helpers shared by the trainer tests: a simulated kill at a chosen step."""


class Killed(Exception):
    """Raised by ``kill_after``: stands for the process dying after a step."""


def kill_after(step: int):
    """A trainer callback that 'kills' the run once ``step`` has been logged."""

    def callback(trainer, record):
        if record["step"] == step:
            raise Killed

    return callback
