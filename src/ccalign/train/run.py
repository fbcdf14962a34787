"""From a config to a finished run: build or load the model, open and check the data, train."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ccalign import hub
from ccalign.data.codes import CodeDataset, open_codes, validate_codes
from ccalign.models import llamagen
from ccalign.train.config import ALIGNMENT_METHODS, ModelSection, TrainConfig
from ccalign.train.distributed import launched_as_main
from ccalign.train.rundir import check_output_folder, claim_output_folder
from ccalign.train.trainer import Callback, Trainer


def model_from_config(section: ModelSection, method: str | None = None) -> llamagen.LlamaGen:
    """Load ``section.init`` (ccalign safetensors or any official layout) or build a fresh model.

    ``init`` may be a registry name or an hf:// URI (:mod:`ccalign.hub`). A ccalign file carries
    its architecture, a registry name supplies it; other official files need ``name`` and ``grid``.
    ``arch`` overrides config fields either way (e.g. dropouts, or sizes of a custom model).
    ``method`` "gft" adds the beta embedding (a fresh one when the model has none).
    """
    arch = {"beta_embedding": True, **section.arch} if method == "gft" else section.arch
    if section.init is None:
        return llamagen.build(section.name, grid=section.grid, **arch)
    init, release = hub.resolve(section.init, kind="model"), hub.find(section.init)
    if llamagen.config_from_file(init) is not None:
        return llamagen.load(init, **arch)
    if release is not None:  # the registry knows the file's architecture
        return llamagen.load(init, release.preset, grid=release.grid, **arch)
    name = None if section.name == "custom" else section.name
    return llamagen.load(init, name, grid=section.grid, **arch)


def open_training_data(config: TrainConfig, model: llamagen.LlamaGen) -> CodeDataset:
    """The code data set (or images encoded by ``data.tokenizer``), checked against the model.

    The check is skipped when ``data.validate`` is off.
    """
    data = config.data
    if data.path is None:
        what = "an image folder or fashion-mnist:train" if data.tokenizer else "codes"
        raise ValueError(f"no training data: set data.path in the config or pass --data ({what})")
    if data.tokenizer is not None:
        from ccalign.data.encoded import EncodedImages

        dataset = EncodedImages(
            data.path,
            data.tokenizer,
            views=data.views,
            seed=data.seed,
            image_size=data.image_size,
        )
        dataset.require_grid(model.config.grid)
    else:
        dataset = open_codes(data.path, seed=data.seed)
    if data.validate:
        validate_codes(
            dataset,
            num_classes=model.num_classes,
            vocab_size=model.vocab_size,
            seq_len=model.seq_len,
        )
    return dataset


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
    and it is locked while this run writes. Alignment methods and DDO need ``model.init``;
    ``mle`` and ``gft`` start from it when given, else from a fresh model initialised from
    ``train.seed`` (the same on every process). ``ddo`` runs ``method.rounds`` rounds
    (``ccalign.train.ddo``).
    """
    if config.method.name in (*ALIGNMENT_METHODS, "ddo") and config.model.init is None:
        raise ValueError(
            f"{config.method.name} fine-tunes a pretrained model: set model.init or pass --init"
        )
    out = Path(config.checkpoint.out)
    check_output_folder(out, resume=resume, restart=restart)
    # claimed first (a conflict fails before any model work) and by the main process only:
    # the others never write into the folder
    lock = claim_output_folder(out, restart=restart) if launched_as_main() else None
    try:
        if config.method.name == "ddo":
            from ccalign.train.ddo import run_rounds

            run_rounds(config, resume=resume, callbacks=callbacks)
        else:
            train_once(config, resume=resume, callbacks=callbacks)
    finally:
        if lock is not None:
            lock.release()
    return out


def train_once(
    config: TrainConfig,
    *,
    resume: bool,
    callbacks: Sequence[Callback] = (),
    prepare: Callable[[Trainer], None] | None = None,
) -> None:
    """Load the model and data, build the trainer, resume if asked, ``prepare`` it, train."""
    torch.manual_seed(config.train.seed)
    model = model_from_config(config.model, config.method.name)
    dataset = open_training_data(config, model)
    trainer = Trainer(config, model, dataset, callbacks=callbacks)
    try:
        if resume and trainer.resume() and trainer.dist.is_main:
            out = config.checkpoint.out
            print(f"resuming {out} at step {trainer.step} of {trainer.total_steps}")
        if prepare is not None:
            prepare(trainer)
        trainer.fit()
    finally:
        trainer.close()
