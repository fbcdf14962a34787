"""The training methods behind one interface, and their registry.

A method (CCA, DPO, unlearning, DDO, GFT, MLE) is one :class:`Method` record: the validation of
its settings, the objective a step minimises, whether it needs an init and a frozen reference,
the sequences per item for the memory plan, what it requires of a model family, and its runner
(one run, or DDO's rounds). Nothing else in ccalign branches on a method's name: the trainer,
the memory plan, the commands and the demo look the record up with :func:`get`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ccalign.conditions import ConditionKind
from ccalign.train import ddo
from ccalign.train.objectives import (
    AlignmentObjective,
    DDOObjective,
    GFTObjective,
    MLEObjective,
    Objective,
)

if TYPE_CHECKING:
    from ccalign.train.config import MethodSection, TrainConfig
    from ccalign.train.trainer import Trainer

#: ``run(config, resume=, callbacks=, train_once=)``: train_once is ``ccalign.train.run``'s
Runner = Callable[..., None]


def run_once(config: TrainConfig, *, resume: bool, callbacks, train_once: Callable) -> None:
    """The runner of every method but DDO: one training run into ``checkpoint.out``."""
    train_once(config, resume=resume, callbacks=callbacks)


@dataclass(frozen=True)
class Method:
    """One training method, as the generic layers see it."""

    name: str  # the config's method.name
    title: str  # for messages and reports
    summary: str  # one line: what it minimises
    objective: Callable[[MethodSection, ConditionKind], Objective]
    pretrains: bool = False  # MLE: ``ccalign pretrain``; the others: ``ccalign finetune``
    needs_init: bool = True  # fine-tunes a pretrained model (``model.init``)
    reference_copy: bool = True  # holds a frozen copy of the policy as its reference
    #: (method section) -> sequences per item with gradient through the policy
    policy_rows: Callable[[MethodSection], float] = lambda method: 2.0
    #: (method section) -> sequences per item through a no-gradient forward
    nograd_rows: Callable[[MethodSection], float] = lambda method: 2.0
    #: no-gradient passes whose final hidden states stay alive through backward (GFT's mix)
    held_hidden: bool = False
    #: negatives or keyed draws live within a micro-batch: micro_batch >= 2 where ``pairs``,
    #: and it may not change on resume
    micro_batch_keyed: bool = True
    pairs: bool = False  # a row's negative is the next row's condition (the roll)
    requires: frozenset[str] = frozenset()  # family capabilities ("beta_embedding")
    model_options: Mapping[str, Any] = field(default_factory=dict)  # config fields it adds
    validate: Callable[[TrainConfig], None] = lambda config: None
    check_data: Callable[[Any], None] = lambda dataset: None  # refuses data it cannot use
    run: Runner = run_once
    prepare: Callable[[Trainer], None] | None = None  # before fitting (DDO: its negatives)

    def refusal(self, family) -> str | None:
        """Why ``family`` cannot be trained with this method, or None when it can."""
        lacking = sorted(self.requires - family.capabilities)
        if not lacking:
            return None
        usable = [m.name for m in _METHODS.values() if m.requires <= family.capabilities]
        return (
            f"method {self.name} does not train {family.title} models: "
            f"{family.missing(lacking[0])}; use {', '.join(usable)}"
        )


def _alignment(name: str, title: str, summary: str) -> Method:
    def objective(method: MethodSection, condition: ConditionKind) -> Objective:
        return AlignmentObjective(
            name,
            condition=condition,
            beta=method.beta,
            lam=method.lam,
            uncond_ratio=method.uncond_ratio,
        )

    return Method(name, title, summary, objective, pairs=True, validate=_validate_pairs(name),
                  check_data=_two_classes(name))


def _validate_pairs(name: str) -> Callable[[TrainConfig], None]:
    def validate(config: TrainConfig) -> None:
        if config.train.micro_batch < 2:
            raise ValueError(
                f"train.micro_batch = {config.train.micro_batch} leaves {name} without "
                "negatives: a row's negative label is the next row's in its micro-batch, and a "
                "batch of one rolls onto itself; use micro_batch >= 2 (the official recipe: 2)"
            )
        _some_conditional_rows(name, config)

    return validate


def _some_conditional_rows(name: str, config: TrainConfig) -> None:
    if config.method.uncond_ratio >= 1.0:
        raise ValueError(
            f"method.uncond_ratio = {config.method.uncond_ratio} gives every row the null class, "
            f"which leaves {name} no conditional row to train; use a ratio below 1 (0.1 is the "
            "paper's)"
        )


def _two_classes(name: str) -> Callable[[Any], None]:
    """Contrastive pairs need another class in the data: a row's negative is another row's."""

    def check(dataset) -> None:
        labels = dataset.all_labels()
        if len(labels) == 0:  # captioned data: rows whose captions coincide are weighed as such
            return
        classes = np.unique(labels)
        if len(classes) < 2:
            raise ValueError(
                f"every item of the training data has label {int(classes[0])}: {name}'s negative "
                "for a row is the next row's label, so data of one class gives no negative; "
                "train on data with at least two classes"
            )

    return check


def _ddo_objective(method: MethodSection, condition: ConditionKind) -> Objective:
    return DDOObjective(
        condition=condition, beta=method.beta, alpha=method.alpha, uncond_ratio=method.uncond_ratio
    )


def _validate_gft(config: TrainConfig) -> None:
    if config.model.arch.get("beta_embedding") is False:
        raise ValueError(
            "method gft trains the beta embedding: remove model.arch.beta_embedding = false "
            "(gft adds it to a plain model)"
        )
    if config.method.lora.enabled:
        raise ValueError(
            "method gft with method.lora: LoRA freezes every weight of the base model, GFT's "
            "new beta embedding included, so beta would stay without effect; fine-tune GFT in "
            "full (bf16 weights and activation checkpointing fit GPT-3B: see --dry-run)"
        )


def _validate_ddo(config: TrainConfig) -> None:
    ddo.validate(config)
    _some_conditional_rows("ddo", config)


def _ddo_rows(method: MethodSection) -> float:
    """Data rows plus one reference sample per conditional row, expected: 2 - uncond_ratio."""
    return 2.0 - method.uncond_ratio


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry; its name must be new."""
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    _METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The method called ``name``; unknown names raise ValueError listing the known ones."""
    if name not in _METHODS:
        raise ValueError(f"method.name = {name!r} is not one of {names()}")
    return _METHODS[name]


def names() -> list[str]:
    return list(_METHODS)


def finetuning() -> list[str]:
    """The methods ``ccalign finetune`` runs."""
    return [m.name for m in _METHODS.values() if not m.pretrains]


def pretraining() -> str:
    """The method ``ccalign pretrain`` runs (maximum likelihood)."""
    return next(m.name for m in _METHODS.values() if m.pretrains)


register(_alignment("cca", "CCA", "condition contrastive alignment against a frozen reference"))
register(
    Method(
        "ddo",
        "DDO",
        "direct discriminative optimization: data vs the reference's own samples, in rounds",
        _ddo_objective,
        policy_rows=_ddo_rows,
        nograd_rows=_ddo_rows,
        validate=_validate_ddo,
        run=ddo.run_rounds,
        prepare=ddo.attach_negatives,
    )
)
register(
    Method(
        "gft",
        "GFT",
        "guidance-free training: the NLL of mixed conditional / unconditional logits",
        lambda method, condition: GFTObjective(
            condition=condition, class_dropout=method.class_dropout
        ),
        needs_init=False,
        reference_copy=False,
        policy_rows=lambda method: 1.0,
        nograd_rows=lambda method: 1.0,  # the unconditional pass
        held_hidden=True,
        micro_batch_keyed=False,
        requires=frozenset({"beta_embedding"}),
        model_options={"beta_embedding": True},
        validate=_validate_gft,
    )
)
register(_alignment("dpo", "DPO", "the DPO baseline on (true, mismatched) label pairs"))
register(_alignment("unlearning", "unlearning", "the unlearning baseline: linear in D"))
register(
    Method(
        "mle",
        "MLE",
        "maximum likelihood with class dropout (pretraining)",
        lambda method, condition: MLEObjective(
            condition=condition, class_dropout=method.class_dropout
        ),
        pretrains=True,
        needs_init=False,
        reference_copy=False,
        policy_rows=lambda method: 1.0,
        nograd_rows=lambda method: 0.0,
        micro_batch_keyed=False,
    )
)
