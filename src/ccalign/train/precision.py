"""bf16 weights with float32 optimizer state: the weight cast and a compensated bf16 AdamW.

With bf16 weights, round-to-nearest loses CCA's updates: at lr 1e-5 Adam moves a weight of
size 0.02 by ~1e-5, less than half a bf16 step there (2^-14 = 6.1e-5), so most updates
round back to the old value. ``CompensatedAdamW`` keeps each weight as the pair (bf16 weight,
bf16 remainder): the update is computed in float32 on weight + remainder, the weight gets the
bf16 rounding of the result and the remainder what the rounding lost. That is 16 significant
bits for 2 extra bytes per weight (an fp32 master copy costs 4), and it is deterministic,
unlike stochastic rounding. On norm weights near 1 the pair resolves ~2^-18, coarser than
float32's 2^-24 but fine for 1e-5 steps (tested). ``benchmarks/bf16_drift.py`` measures the
roundings against the float32 run. The moments are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ROUNDINGS = ("compensated", "stochastic", "nearest")
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters (not the buffers: the rotary table stays float32),
    except those whose names start with one of the module's ``float32_parameters`` prefixes
    (VAR's frozen quantiser)."""
    kept = tuple(getattr(module, "float32_parameters", ()))
    for name, param in module.named_parameters():
        if kept and name.startswith(kept):
            continue
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return module


def reference_dtype(train) -> torch.dtype:
    """The frozen reference's dtype: ``train.reference_dtype``, "auto" follows the weights."""
    name = train.weights_dtype if train.reference_dtype == "auto" else train.reference_dtype
    return WEIGHT_DTYPES[name]


def round_stochastic(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """float32 -> bfloat16 rounded up or down with probability given by the distance."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW (torch's update rule, decoupled weight decay) for float32 or bf16 parameters.

    The moments are float32 whatever the parameter dtype. bf16 parameters are rounded as
    ``rounding`` says: "compensated" (a bf16 remainder per weight, see the module doc),
    "stochastic" or "nearest". On float32 parameters it is torch.optim.AdamW.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rounding: str = "compensated",
    ):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding = {rounding!r} is not one of {list(ROUNDINGS)}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rounding = rounding

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but each state tensor keeps its saved dtype (torch casts them all to the
        parameter's: float32 moments would come back bf16)."""
        super().load_state_dict(state_dict)
        keys = [k for group in state_dict["param_groups"] for k in group["params"]]  # ids or names
        params = [p for group in self.param_groups for p in group["params"]]
        for key, param in zip(keys, params, strict=True):
            for name, value in state_dict["state"].get(key, {}).items():
                if isinstance(value, Tensor):
                    self.state[param][name] = value.to(device=param.device, dtype=value.dtype)

    def _update(self, param: Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            if self._compensated(param):
                state["remainder"] = torch.zeros_like(param)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        grad = param.grad.float()
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = group["lr"] / (1 - beta1 ** state["step"])
        denom = state["exp_avg_sq"].sqrt() / (1 - beta2 ** state["step"]) ** 0.5
        denom.add_(group["eps"])
        value = param.float() if param.dtype != torch.float32 else param
        if "remainder" in state:
            value = value + state["remainder"].float()
        value.mul_(1 - group["lr"] * group["weight_decay"])
        value.addcdiv_(state["exp_avg"], denom, value=-step_size)
        self._store(param, value, state)

    def _compensated(self, param: Tensor) -> bool:
        return self.rounding == "compensated" and param.dtype == torch.bfloat16

    def _store(self, param: Tensor, value: Tensor, state: dict) -> None:
        """Write the float32 ``value`` into ``param`` (and its remainder)."""
        if value is param:
            return
        if param.dtype == torch.bfloat16 and self.rounding == "stochastic":
            param.copy_(round_stochastic(value))
            return
        param.copy_(value)
        if "remainder" in state:
            state["remainder"].copy_(value - param.float())
