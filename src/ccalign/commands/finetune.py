"""`ccalign finetune`: align a pretrained model with CCA (or the DPO / unlearning baselines), or
train it guidance-free with GFT."""

from __future__ import annotations

import argparse

HELP = "CCA / DPO / unlearning / GFT fine-tuning on extracted codes or images encoded on the fly"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    from ccalign.train.command import add_training_arguments

    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Read the config, refuse MLE (that is `ccalign pretrain`), and train."""
    from ccalign.train.command import config_from_args, run_from_args

    config = config_from_args(args)
    if config.method.name == "mle":
        raise ValueError("method.name = 'mle' is pretraining: use `ccalign pretrain`")
    return run_from_args(args, config)
