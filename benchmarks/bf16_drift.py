"""bf16 weights: how far N CCA steps drift from the float32-weight run, per rounding of the update.

    python benchmarks/bf16_drift.py                       # lr 1e-5 (the LlamaGen recipe), 100 steps
    python benchmarks/bf16_drift.py --lr 1e-4 --steps 100

The reference run keeps float32 weights and runs the forward under bf16 autocast (ccalign's
default mixed precision); the others keep bf16 weights and float32 Adam moments and differ only
in how the updated weight is rounded back to bf16 (``ccalign.train.precision``), or keep a
float32 master copy (6 bytes per weight: the ideal that the bf16 forward allows). Same model
(initial weights that bf16 holds exactly, so every run starts at the same point), data,
CCA loss (dropout off, so every run is deterministic), AdamW (0.9, 0.95), weight decay 0.05.
Columns: ``moved`` = |w - w0| / |w_ref - w0| (1.0: the update survives whole), ``error`` =
|w - w_ref| / |w_ref - w0| (0: the float32 run exactly), loss after the last step. w is the
weight the optimizer tracks: the master copy, bf16 weight + remainder, or the bf16 weight.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from ccalign.conditions import ClassLabels
from ccalign.models import llamagen
from ccalign.train import methods
from ccalign.train.precision import CompensatedAdamW, cast_parameters

RUNS = (
    "fp32 weights (reference)",
    "bf16, fp32 master copy",
    "bf16 nearest",
    "bf16 stochastic",
    "bf16 compensated",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args(argv)


def make_model(args) -> llamagen.LlamaGen:
    torch.manual_seed(0)
    model = llamagen.build(
        "custom",
        grid=8,
        dim=args.dim,
        n_layer=args.layers,
        n_head=4,
        vocab_size=256,
        num_classes=10,
        token_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
    )
    torch.nn.init.normal_(model.output.weight, std=0.02)
    # start every run from the same point: weights that bf16 holds exactly (else the bf16 runs
    # start off by the rounding of the initial weights, which no update rule can undo)
    cast_parameters(model, torch.bfloat16)
    return cast_parameters(model, torch.float32)


def train(model, args, rounding: str | None) -> tuple[list[torch.Tensor], float]:
    """Run ``args.steps`` CCA steps; rounding None = float32 weights under bf16 autocast,
    "master" = bf16 weights updated through a float32 master copy (the ideal bf16 run)."""
    policy = copy.deepcopy(model)
    reference = copy.deepcopy(model).requires_grad_(False)
    master = [p.detach().clone() for p in policy.parameters()] if rounding == "master" else None
    if rounding is not None:
        cast_parameters(policy, torch.bfloat16)
        cast_parameters(reference, torch.bfloat16)
    optimizer = CompensatedAdamW(
        master or policy.parameters(),
        lr=args.lr,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        rounding="nearest" if rounding in (None, "master") else rounding,
    )
    objective = methods.get("cca").objective(
        argparse.Namespace(beta=0.02, lam=300.0, uncond_ratio=0.0), ClassLabels(10)
    )
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randint(0, 256, (args.batch, 64), generator=g), torch.arange(args.batch) % 10)
        for _ in range(8)
    ]
    no_mask = torch.zeros(args.batch, dtype=torch.bool)
    loss = None
    for step in range(args.steps):
        tokens, labels = data[step % len(data)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = objective(policy, reference, labels, tokens, no_mask).loss
        loss.backward()
        if master is not None:
            for m, p in zip(master, policy.parameters(), strict=True):
                m.grad = p.grad.float()
        optimizer.step()
        if master is not None:
            with torch.no_grad():
                for m, p in zip(master, policy.parameters(), strict=True):
                    p.copy_(m)
        optimizer.zero_grad(set_to_none=True)
        policy.zero_grad(set_to_none=True)
    weights = [p.detach().float().clone() for p in master or policy.parameters()]
    if rounding == "compensated":  # the weight the optimizer tracks: bf16 value + remainder
        remainders = [optimizer.state[p].get("remainder", 0) for p in policy.parameters()]
        weights = [w + r for w, r in zip(weights, remainders, strict=True)]
    return weights, float(loss.detach())


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(
        sum((x.double() - y.double()).pow(2).sum() for x, y in zip(a, b, strict=True)) ** 0.5
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = make_model(args)
    start = [p.detach().float().clone() for p in model.parameters()]
    ref, ref_loss = train(model, args, None)
    scale = distance(ref, start)
    floor = distance([w.to(torch.bfloat16).float() for w in ref], ref) / scale
    rows = [{"run": RUNS[0], "moved": 1.0, "error": 0.0, "loss": ref_loss}]
    for name, rounding in zip(
        RUNS[1:], ("master", "nearest", "stochastic", "compensated"), strict=True
    ):
        torch.manual_seed(2)  # the stochastic rounding's draws
        weights, loss = train(model, args, rounding)
        rows.append(
            {
                "run": name,
                "moved": distance(weights, start) / scale,
                "error": distance(weights, ref) / scale,
                "loss": loss,
            }
        )
    print(
        f"{args.steps} CCA steps, lr {args.lr:g}, {model.num_parameters():,} parameters, "
        f"|w_ref - w0| = {scale:.3g}"
    )
    print(f"storing the reference run's final weights in bf16 alone is an error of {floor:.3f}")
    print(f"{'run':<26} {'moved':>8} {'error':>8} {'loss':>10}")
    for r in rows:
        print(
            f"{r['run']:<26} {r['moved']:>8.3f} {r['error']:>8.3f} {r['loss']:>10.5f}", flush=True
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "bf16_floor": floor, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
