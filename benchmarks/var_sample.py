"""VAR sampling speed: guidance-free vs CFG vs VAR's own doubled batch, side by side in one run.

Three settings of ``ccalign.sample.var.generate`` on the same model and batch:
``free`` (guidance-free, the B conditional rows only), ``cfg`` (VAR's cfg 1.5 ramp: 2B rows) and
``doubled`` (guidance-free logits but 2B rows, what VAR's sampler runs at cfg 0). The settings are
timed interleaved, round by round, and each is reported as the median over rounds, so a busy
machine slows all three alike. Random weights: speed does not depend on them.

CPU (default): a small VAR (depth 6, width 384, VAR's 10 scales = 680 tokens, vocab 4096).
GPU: ``--device cuda --model VAR-d16 --dtype bf16``.

    python benchmarks/var_sample.py
    python benchmarks/var_sample.py --device cuda --model VAR-d16 --dtype bf16 --batch-sizes 16,64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ccalign.models import var
from ccalign.models.var import sampler as var_sample

SMALL = dict(depth=6, dim=384, n_head=6)
SETTINGS = {
    "free": dict(),
    "cfg": dict(official_cfg=1.5),
    "doubled": dict(official_cfg=0.0, double_batch=True),
}


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> var.VAR:
    torch.manual_seed(0)
    model = var.build(name, **(SMALL if name == "custom" else {}))
    return model.to(device=device, dtype=dtype).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(model: var.VAR, batch: int, setting: dict, device: torch.device) -> float:
    labels = torch.arange(batch, device=device) % model.num_classes
    generator = torch.Generator(device).manual_seed(0)
    synchronize(device)
    start = time.perf_counter()
    var_sample.generate(model, labels, top_k=900, top_p=0.96, generator=generator, **setting)
    synchronize(device)
    return time.perf_counter() - start


def bench_batch(model: var.VAR, batch: int, rounds: int, device: torch.device) -> dict:
    """Median seconds per setting over interleaved rounds (after one warm-up call each)."""
    for setting in SETTINGS.values():
        time_once(model, batch, setting, device)
    times = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, setting in SETTINGS.items():
            times[name].append(time_once(model, batch, setting, device))
    row = {"batch": batch}
    for name, seconds in times.items():
        row[f"{name}_img_s"] = batch / statistics.median(seconds)
    row["free_vs_cfg"] = row["free_img_s"] / row["cfg_img_s"]
    row["free_vs_doubled"] = row["free_img_s"] / row["doubled_img_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="custom", help="'custom' (small) or a preset: VAR-d16")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-sizes", default="4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(args.model, device, dtype)
    print(
        f"{args.model}: {model.num_parameters() / 1e6:.1f}M parameters, {model.seq_len} tokens "
        f"in {len(model.config.patch_nums)} scales, {device} {args.dtype}"
        f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}; "
        f"top_k 900, top_p 0.96; median of {args.rounds} interleaved rounds"
    )
    print(f"{'batch':>6} | {'free img/s':>10} | {'cfg img/s':>9} | {'doubled img/s':>13} | "
          f"{'free/cfg':>8} | {'free/doubled':>12}")
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        row = bench_batch(model, batch, args.rounds, device)
        rows.append(row)
        print(f"{batch:>6} | {row['free_img_s']:>10.2f} | {row['cfg_img_s']:>9.2f} | "
              f"{row['doubled_img_s']:>13.2f} | {row['free_vs_cfg']:>7.2f}x | "
              f"{row['free_vs_doubled']:>11.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
