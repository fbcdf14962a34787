"""Training: CCA / DDO / GFT / DPO / unlearning fine-tuning and MLE pretraining of AR models.

``run_training(config)`` does a whole run from a ``TrainConfig`` (``load_config`` reads TOML or
YAML); each method is one record of ``ccalign.train.methods``; ``Trainer`` is the loop itself
(single process, DDP or FSDP under torchrun, gradient accumulation, bf16, resumable checkpoints,
EMA, LoRA, JSONL metrics).
"""

from __future__ import annotations

import importlib

#: public name -> submodule defining it; imported on first use so that ``ccalign --help`` and
#: the config reader do not pay for torch.distributed at start-up.
_EXPORTS = {
    "TrainConfig": "config",
    "load_config": "config",
    "Objective": "objectives",
    "ObjectiveOutput": "objectives",
    "AlignmentObjective": "objectives",
    "DDOObjective": "objectives",
    "MLEObjective": "objectives",
    "EMA": "optim",
    "LRSchedule": "optim",
    "make_optimizer": "optim",
    "param_groups": "optim",
    "Trainer": "trainer",
    "NonFiniteLossError": "trainer",
    "run_training": "run",
    "model_from_config": "build",
    "open_training_data": "build",
    "run_rounds": "ddo",
    "Method": "methods",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ccalign.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ccalign.train.{_EXPORTS[name]}"), name)
