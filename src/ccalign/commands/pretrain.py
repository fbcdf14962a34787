"""`ccalign pretrain`: train a class-conditional model by maximum likelihood from scratch."""

from __future__ import annotations

import argparse

HELP = "pretrain a model by next-token maximum likelihood with class dropout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    from ccalign.train.command import add_training_arguments

    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Read the config, force the MLE objective, and train (from --init when given)."""
    from ccalign.train import methods
    from ccalign.train.command import config_from_args, run_from_args

    return run_from_args(args, config_from_args(args, method=methods.pretraining()))
