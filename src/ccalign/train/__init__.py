"""Training: CCA / DPO / unlearning fine-tuning and MLE pretraining of AR image models.

``run_training(config)`` does a whole run from a ``TrainConfig`` (``load_config`` reads TOML or
YAML); ``Trainer`` is the loop itself (single process or DDP under torchrun, gradient
accumulation, bf16 autocast on CUDA, resumable checkpoints, EMA, JSONL metrics).
"""

from ccalign.train.config import TrainConfig, load_config
from ccalign.train.objectives import (
    AlignmentObjective,
    MLEObjective,
    Objective,
    ObjectiveOutput,
    make_objective,
)
from ccalign.train.optim import EMA, LRSchedule, make_optimizer, param_groups
from ccalign.train.run import model_from_config, open_training_data, run_training
from ccalign.train.trainer import NonFiniteLossError, Trainer

__all__ = [
    "TrainConfig",
    "load_config",
    "Objective",
    "ObjectiveOutput",
    "AlignmentObjective",
    "MLEObjective",
    "make_objective",
    "EMA",
    "LRSchedule",
    "make_optimizer",
    "param_groups",
    "Trainer",
    "NonFiniteLossError",
    "run_training",
    "model_from_config",
    "open_training_data",
]
