"""AdamW with LlamaGen's parameter groups, the learning-rate schedule and an optional EMA.

Groups follow the official trainers: weight decay on every tensor with >= 2 dims (linear and
embedding weights), none on 1-D tensors (RMSNorm weights, biases) nor on the tensors a model
names in ``no_weight_decay`` (VAR: its position / level embeddings and attention scales).
AdamW is fused on CUDA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ccalign.train.sharding import copy_full_into, full_tensor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (dim >= 2) and not decayed (dim < 2, or a name containing one
    of the model's ``no_weight_decay`` words, e.g. VAR's position embeddings), trainable only."""
    decay, no_decay = [], []
    exempt = tuple(getattr(model, "no_weight_decay", ()))
    for name, param in model.named_parameters():
        if param.requires_grad:
            decayed = param.dim() >= 2 and not any(word in name for word in exempt)
            (decay if decayed else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, optim, device: torch.device) -> torch.optim.Optimizer:
    """AdamW from an ``OptimSection`` for the model's weights: torch's (fused on CUDA) for
    float32 weights, ``CompensatedAdamW`` for bf16 ones, torchao's 8-bit one when asked."""
    groups = param_groups(model, optim.weight_decay)
    settings = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    if optim.optimizer == "adamw8bit":
        return adamw8bit(groups, bf16=bf16, **settings)
    if bf16:
        from ccalign.train.precision import CompensatedAdamW

        return CompensatedAdamW(groups, **settings)
    return torch.optim.AdamW(groups, **settings, fused=device.type == "cuda")


def adamw8bit(groups: list[dict], *, bf16: bool, **settings) -> torch.optim.Optimizer:
    """torchao's AdamW8bit (8-bit block-quantised moments; bf16 weights rounded stochastically)."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError as error:
        raise ImportError(
            "optim.optimizer = 'adamw8bit' needs torchao, which is not installed: "
            "pip install torchao (or set optim.optimizer = 'adamw')"
        ) from error
    return AdamW8bit(groups, **settings, bf16_stochastic_round=bf16)


class LRSchedule:
    """lr(step) for step = 1..total: linear warmup, then constant, linear or cosine decay."""

    def __init__(
        self,
        base_lr: float,
        total_steps: int,
        *,
        kind: str = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        warmup_start_ratio: float = 0.0,
        hold_ratio: float = 0.0,
        weight_decay_ramp: tuple[float, float] | None = None,
    ):
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown lr schedule {kind!r}; choose constant, linear or cosine")
        self.base_lr, self.total_steps, self.kind = base_lr, max(total_steps, 1), kind
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.warmup_start_ratio, self.hold_ratio = warmup_start_ratio, hold_ratio
        self.weight_decay_ramp = weight_decay_ramp

    def __call__(self, step: int) -> float:
        """Learning rate used by optimizer step ``step`` (1-based).

        Warmup rises linearly from ``warmup_start_ratio`` x lr towards lr (reached at the last
        warmup step); a decay holds lr for the first ``hold_ratio`` of the steps after warmup,
        then falls to ``min_lr_ratio`` x lr at the last step (VAR's "lin0": hold 0.05).
        """
        if step <= self.warmup_steps:
            done = step / self.warmup_steps  # from start x lr towards lr, exactly lr at the end
            return self.base_lr * (self.warmup_start_ratio * (1.0 - done) + done)
        if self.kind == "constant":
            return self.base_lr
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        progress = max(progress - self.hold_ratio, 0.0) / (1.0 - self.hold_ratio)
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.base_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape)

    def weight_decay(self, step: int) -> float:
        """The decayed group's weight decay at ``step``: with a ramp (start, end), a half cosine
        from start at step 1 to end at the last step (VAR's twd -> twde)."""
        start, end = self.weight_decay_ramp
        done = (step - 1) / max(self.total_steps - 1, 1)
        return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * done))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for ``step`` (and the decayed group's weight decay when it
        ramps: group 0 of :func:`param_groups`) and return the lr."""
        lr = self(step)
        if self.weight_decay_ramp is not None:
            optimizer.param_groups[0]["weight_decay"] = self.weight_decay(step)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # torchao keeps lr as a tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr


def make_schedule(optim, total_steps: int) -> LRSchedule:
    """The schedule an ``OptimSection`` describes (warmup_ratio used when warmup_steps is 0)."""
    warmup = optim.warmup_steps or int(round(optim.warmup_ratio * total_steps))
    final = optim.final_weight_decay
    ramp = None if final is None else (optim.weight_decay, final)
    return LRSchedule(
        optim.lr,
        total_steps,
        kind=optim.schedule,
        warmup_steps=warmup,
        min_lr_ratio=optim.min_lr_ratio,
        warmup_start_ratio=optim.warmup_start_ratio,
        hold_ratio=optim.hold_ratio,
        weight_decay_ramp=ramp,
    )


class EMA:
    """Exponential moving average of a model's floating-point state, in float32 (float64 for a
    float64 model's).

    Under FSDP the averages are sharded like the parameters; ``state_dict`` gathers them
    (a collective: every rank calls it) and ``load_state_dict`` takes whole tensors.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            k: v.detach().to(_precise(v.dtype)).clone()
            for k, v in model.state_dict().items()
            if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow = decay * shadow + (1 - decay) * current."""
        current = model.state_dict()
        for key, avg in self.shadow.items():
            avg.lerp_(current[key].detach().to(avg.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict:
        """Decay and whole (gathered) averages on the CPU."""
        shadow = {k: full_tensor(v).cpu() for k, v in self.shadow.items()}
        return {"decay": self.decay, "shadow": shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for key, value in state["shadow"].items():
            copy_full_into(self.shadow[key], value)


def _precise(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)
