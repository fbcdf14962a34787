"""Options shared by ``ccalign finetune`` and ``ccalign pretrain`` and how they become a config."""

from __future__ import annotations

import argparse
import os

from ccalign.io import output_folder
from ccalign.settings import MAX_THREADS, declared_range, number
from ccalign.train.config import TrainConfig, TrainSection, load_config

#: command-line shortcut -> dotted config key
SHORTCUTS = {
    "data": "data.path",
    "tokenizer": "data.tokenizer",
    "init": "model.init",
    "out": "checkpoint.out",
    "steps": "train.steps",
    "device": "train.device",
}


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --set and the shortcut overrides (applied after --set, so they win)."""
    parser.add_argument("--config", help="TOML or YAML config (see configs/)")
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--data",
        help="training codes (a flat .safetensors file or a code folder); with --tokenizer, "
        "images (a <class>/<image> folder or fashion-mnist:train)",
    )
    parser.add_argument(
        "--tokenizer",
        help="encode --data images on the fly with this tokenizer (a tokenizer file, fmnist-vq, "
        "a registry name such as llamagen-vq16, or hf://owner/repo/file); --set "
        "data.views=flip adds random mirrors",
    )
    parser.add_argument(
        "--init",
        help="starting checkpoint: ccalign .safetensors, official .pt, a registry name "
        "(`ccalign models`, e.g. llamagen-L-384) or hf://owner/repo/file",
    )
    parser.add_argument(
        "--out", type=output_folder, help="output folder for checkpoints, logs and the final model"
    )
    parser.add_argument(
        "--steps",
        type=number(int, within=declared_range(TrainSection, "steps")),
        help="optimizer steps (default: from train.epochs)",
    )
    parser.add_argument("--device", help="cpu, cuda or auto")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="--out holds a run: move it aside to <out>.old-<time> (nothing is deleted) and start "
        "over",
    )
    parser.add_argument(
        "--threads",
        type=number(int, ge=1, le=MAX_THREADS),
        help="CPU threads for torch (default: torch's)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan (weights, gradients, optimizer, reference, activations per "
        "micro-batch, the largest micro-batch that fits) and exit without training",
    )
    parser.add_argument(
        "--gpu-memory",
        help="GPU memory for --dry-run's largest micro-batch, e.g. 80GiB (default: the visible "
        "GPU's)",
    )


def config_from_args(args: argparse.Namespace, *, method: str | None = None) -> TrainConfig:
    """The config file, then --set, then the shortcuts; ``method`` forces method.name."""
    assignments = list(args.assignments)
    for option, key in SHORTCUTS.items():
        value = getattr(args, option)
        if value is not None:
            assignments.append(f"{key}={_toml_literal(value)}")
    if method is not None:
        assignments.append(f"method.name={_toml_literal(method)}")
    return load_config(args.config, assignments)


def _toml_literal(value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def run_from_args(args: argparse.Namespace, config: TrainConfig) -> int:
    """Set threads, train, and say where the results are."""
    import torch

    from ccalign.train.run import run_training

    if args.dry_run:
        from ccalign.train.memory import parse_memory, plan_from_config

        memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
        print(plan_from_config(config, memory).table())
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run_training(config, resume=args.resume, restart=args.restart)
    logs = out / "metrics.jsonl" if (out / "metrics.jsonl").exists() else out / "round_*"
    print(f"done: final model in {out / 'final.safetensors'}, metrics in {logs}")
    return 0
