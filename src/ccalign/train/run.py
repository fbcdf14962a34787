"""From a config to a finished run: build or load the model, open and check the data, train."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ccalign import hub
from ccalign.data.codes import CodeDataset, open_codes, validate_codes
from ccalign.models import families, llamagen, var
from ccalign.tokenizers.files import resolve_file
from ccalign.train.config import ALIGNMENT_METHODS, ModelSection, TrainConfig
from ccalign.train.distributed import launched_as_main
from ccalign.train.rundir import check_output_folder, claim_output_folder
from ccalign.train.trainer import Callback, Trainer


def model_from_config(section: ModelSection, method: str | None = None) -> nn.Module:
    """Load ``section.init`` (ccalign safetensors or any official layout) or build a fresh model.

    The family (LlamaGen or VAR) comes from the file's metadata, the registry entry or the
    preset ``name``; each family reads the section in its own function below.
    ``init`` may be a registry name or an hf:// URI (:mod:`ccalign.hub`). ``arch`` overrides
    config fields either way (e.g. dropouts, or sizes of a custom model).
    """
    return MODEL_LOADERS[config_family(section)](section, method)


def config_family(section: ModelSection) -> str:
    """The model family a model section describes: the file's metadata, the registry entry,
    ``model.vae`` (VAR's), else the preset ``name`` (LlamaGen by default)."""
    if section.init is not None:
        release = hub.find(section.init)
        if release is not None and release.family in families.FAMILIES:
            return release.family
        if release is None and Path(section.init).exists():
            recorded = families.family_of_file(section.init)
            if recorded is not None:
                return recorded
    if section.vae is not None:  # only VAR reads a VQVAE
        return "var"
    return families.family_of_preset(section.name) or "llamagen"


def _llamagen_from_config(section: ModelSection, method: str | None) -> llamagen.LlamaGen:
    """LlamaGen: a ccalign file carries its architecture, a registry name supplies it; other
    official files need ``name`` and ``grid``. ``method`` "gft" adds the beta embedding (a
    fresh one when the model has none)."""
    _refuse_key(section.vae is not None, "model.vae", "LlamaGen", "VAR's VQVAE")
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


#: objectives a VAR model cannot train yet, and what they lack
VAR_UNSUPPORTED = {
    "gft": "GFT needs a beta embedding, which ccalign's VAR does not have",
}


def _var_from_config(section: ModelSection, method: str | None) -> var.VAR:
    """VAR: a ccalign file carries its architecture and quantiser; an official file (or a
    registry name) needs its preset and ``model.vae`` (registry names default to theirs)."""
    if method in VAR_UNSUPPORTED:
        raise ValueError(
            f"method {method} does not train VAR models yet: {VAR_UNSUPPORTED[method]}; use "
            "cca, ddo, dpo, unlearning or mle"
        )
    vae = var_vae_file(section)
    if section.init is None:
        _require_vae(vae, f"a fresh {section.name}")
        return var.build(section.name, vae=vae, **section.arch)
    init, release = hub.resolve(section.init, kind="model"), hub.find(section.init)
    if var.config_from_file(init) is not None:
        return var.load(init, vae=vae, **section.arch)
    name = release.preset if release is not None else section.name
    if name not in var.PRESETS and name != "custom":
        raise ValueError(
            f"{section.init} is an official VAR file: set model.name to its preset, one of "
            f"{sorted(var.PRESETS)} (var_d16.pth -> VAR-d16), or 'custom' with model.arch"
        )
    _require_vae(vae, f"the official VAR file {section.init}")
    return var.load(init, name, vae=vae, **section.arch)


def var_vae_file(section: ModelSection) -> Path | None:
    """``model.vae`` resolved to a file (a path, ``fmnist-msvq``, a registry name or hf://); for
    a registry VAR ``init``, its VQVAE by default."""
    name = section.vae
    if name is None and section.init is not None:
        release = hub.find(section.init)
        name = release.tokenizer if release is not None else None
    return None if name is None else resolve_file(name)


def _require_vae(vae: Path | None, what: str) -> None:
    if vae is None:
        raise ValueError(
            f"{what} needs the multi-scale VQVAE whose quantiser builds VAR's teacher-forcing "
            "input: set model.vae (e.g. vae_ch160v4096z32.pth or the registry name var-vae)"
        )


def _refuse_key(given: bool, key: str, family: str, meaning: str) -> None:
    if given:
        raise ValueError(f"{key} is {meaning}, which {family} models do not use: remove it")


#: family -> reader of a model section
MODEL_LOADERS: dict[str, Callable[[ModelSection, str | None], nn.Module]] = {
    "llamagen": _llamagen_from_config,
    "var": _var_from_config,
}


def open_training_data(config: TrainConfig, model: nn.Module) -> CodeDataset:
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
        dataset.require_seq_len(model.seq_len)
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
