"""`ccalign finetune`: align a pretrained model with CCA or DDO (or the DPO / unlearning
baselines), or train it guidance-free with GFT."""

from __future__ import annotations

import argparse

HELP = (
    "CCA / DDO / GFT / DPO / unlearning fine-tuning on extracted codes or images encoded on the fly"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    from ccalign.train.command import add_training_arguments

    add_training_arguments(parser)
    parser.add_argument(
        "--method",
        help="the method: cca, ddo, gft, dpo or unlearning (sets method.name; default: the "
        "config's; `ccalign.train.methods` lists them). DDO runs "
        "method.rounds rounds, each from and against the one before: for one round at a time "
        "pass --init the previous round's final.safetensors and --set method.round=R",
    )


def run(args: argparse.Namespace) -> int:
    """Read the config, refuse MLE (that is `ccalign pretrain`), and train."""
    from ccalign.train import methods
    from ccalign.train.command import config_from_args, run_from_args

    config = config_from_args(args, method=args.method)
    if methods.get(config.method.name).pretrains:
        raise ValueError(
            f"method.name = {config.method.name!r} is pretraining: use `ccalign pretrain`"
        )
    return run_from_args(args, config)
