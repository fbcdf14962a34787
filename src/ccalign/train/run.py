"""From a config to a finished run: claim the output folder, then run the method.

``run_training`` is the entry point (``ccalign finetune`` / ``pretrain`` call it); a method's
runner calls ``train_once`` once (DDO: once per round). Building the model and the data is
``ccalign.train.build``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ccalign.io import atomic_write, read_json_record
from ccalign.train import methods
from ccalign.train.build import model_from_config, open_training_data
from ccalign.train.config import TrainConfig, check_same_recipe
from ccalign.train.distributed import launched_as_main
from ccalign.train.memory import check_fits
from ccalign.train.rundir import check_output_folder, claim_output_folder
from ccalign.train.trainer import Callback, Trainer


def run_training(
    config: TrainConfig,
    *,
    resume: bool = False,
    restart: bool = False,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """Train as ``config`` says; returns the output folder.

    The folder holds one run (``ccalign.train.rundir``): one that has a run already needs
    ``resume`` (continue from its newest checkpoint) or ``restart`` (move it aside, start over),
    and it is locked while this run writes. Methods that fine-tune need ``model.init``; the
    others start from it when given, else from a fresh model initialised from ``train.seed``
    (the same on every process). The method's runner trains (DDO: ``method.rounds`` rounds).
    """
    method = methods.get(config.method.name)
    if method.needs_init and config.model.init is None:
        raise ValueError(
            f"{method.name} fine-tunes a pretrained model: set model.init or pass --init"
        )
    out = Path(config.checkpoint.out)
    if launched_as_main():  # the others would see the record the main process writes below
        check_output_folder(out, resume=resume, restart=restart)
    record = out / RUN_RECORD
    if resume and record.exists():  # before any work: the same recipe, or a clear refusal
        check_same_recipe(record, read_run_record(record), config.to_dict())
    check_fits(config, processes_per_device=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    # claimed first (a conflict fails before any model work) and by the main process only:
    # the others never write into the folder
    lock = claim_output_folder(out, restart=restart) if launched_as_main() else None
    if lock is not None:  # the folder holds this run from its start (a DDO run's many rounds)
        text = json.dumps(config.to_dict(), indent=2)
        atomic_write(record, lambda tmp: Path(tmp).write_text(text))
    try:
        method.run(config, resume=resume, callbacks=callbacks, train_once=train_once)
    finally:
        if lock is not None:
            lock.release()
    return out


#: the run's config, written when the run starts (and again by the trainer)
RUN_RECORD = "config.json"


def read_run_record(path: Path) -> dict:
    """A run's recorded config; a damaged record, or another tool's config.json, is named with
    the fix."""
    record = read_json_record(path)
    if "method" not in record:
        raise ValueError(
            f"{path} is not a ccalign run record; move the folder aside with --restart, or "
            "choose a new --out"
        )
    return record


def train_once(config: TrainConfig, *, resume: bool, callbacks: Sequence[Callback] = ()) -> None:
    """Load the model and data, build the trainer, resume if asked, let the method prepare it
    (DDO: its negatives), train."""
    method = methods.get(config.method.name)
    torch.manual_seed(config.train.seed)
    model = model_from_config(config.model, method)
    dataset = open_training_data(config, model)
    method.check_data(dataset)
    trainer = Trainer(config, model, dataset, callbacks=callbacks)
    try:
        if resume and trainer.resume() and trainer.dist.is_main:
            out = config.checkpoint.out
            print(f"resuming {out} at step {trainer.step} of {trainer.total_steps}")
        if method.prepare is not None:
            method.prepare(trainer)
        trainer.fit()
    finally:
        trainer.close()
