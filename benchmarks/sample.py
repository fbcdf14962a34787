"""Sampling speed: images/s guidance-free vs CFG, per batch size and decode mode, plus setup cost.

CPU (default): the demo-sized model (~1.9M parameters, 7x7 = 49 tokens, vocab 256).
GPU: ``--device cuda --model GPT-L --grid 24`` (576 tokens, bf16) at batch 8 and 256; modes
``eager`` (no graph: the official sampler's way of running), ``graph`` (CUDA graph) and
``compile`` (torch.compile + CUDA graph; on CPU torch.compile alone). Random weights: speed does
not depend on them. ``--t2i``: LlamaGen's text-to-image GPT instead, conditioned on random
left-padded captions of 120 tokens (2048 features for a preset, as FLAN-T5-XL's; 64 for the small
model), at CFG 7.5 (sample_t2i.py's) unless --cfg-scale says.

    python benchmarks/sample.py                       # CPU
    python benchmarks/sample.py --device cuda --model GPT-L --grid 24 --batch-sizes 8,256
    python benchmarks/sample.py --t2i --batch-sizes 8,64                        # CPU, small T2I
    python benchmarks/sample.py --t2i --device cuda --model GPT-XL --grid 16 --batch-sizes 8,64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ccalign.conditions import CaptionBatch
from ccalign.models import llamagen
from ccalign.models.llamagen import t2i
from ccalign.sample import Sampler

SMALL = dict(dim=192, n_layer=4, n_head=6, vocab_size=256, num_classes=10)
SMALL_T2I = dict(dim=192, n_layer=4, n_head=6, vocab_size=256, caption_dim=64)


def build_model(name: str, grid: int, device: torch.device, text: bool = False):
    """Random-weight model (output head random too, so the logits are not all equal)."""
    torch.manual_seed(0)
    if text:
        model = t2i.build(name, grid=grid, **(SMALL_T2I if name == "custom" else {}))
    else:
        model = llamagen.build(name, grid=grid, **(SMALL if name == "custom" else {}))
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model.to(device).eval()


def conditions(model, batch: int, device: torch.device):
    """Class labels, or random captions with 1..L real tokens (left-padded) for a T2I model."""
    if not isinstance(model, t2i.LlamaGenT2I):
        return torch.arange(batch) % model.num_classes
    g = torch.Generator().manual_seed(0)
    length, dim = model.config.caption_len, model.config.caption_dim
    counts = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] >= (length - counts)[:, None]
    features = torch.randn(batch, length, dim, generator=g) * mask[..., None]
    return CaptionBatch.of(features.to(device), mask.to(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(
    sampler: Sampler, batch: int, cfg: float, repeats: int
) -> tuple[float, float, float]:
    """(first-call seconds, best wall seconds, best process CPU seconds of the later calls).

    CPU seconds tell the cost on a shared machine, where wall time depends on the neighbours.
    """
    labels = conditions(sampler.model, batch, sampler.device)
    generator = torch.Generator(sampler.device).manual_seed(0)
    walls, cpus = [], []
    for _ in range(repeats + 1):
        synchronize(sampler.device)
        wall, cpu = time.perf_counter(), time.process_time()
        sampler.generate(labels, cfg_scale=cfg, generator=generator)
        synchronize(sampler.device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls[0], min(walls[1:]), min(cpus[1:])


def bench_mode(
    model, device, mode: str, batches: list[int], cfg: float, repeats: int
) -> list[dict]:
    graph = mode == "graph" or (mode == "compile" and device.type == "cuda")
    rows = []
    for batch in batches:
        sampler = Sampler(model, device=device, cuda_graph=graph, compile=mode == "compile")
        row = {"mode": mode, "batch": batch}
        for name, scale in (("free", 1.0), ("cfg", cfg)):
            before = sampler.setup_seconds
            first, best, cpu = time_generate(sampler, batch, scale, repeats)
            row[f"{name}_img_s"] = batch / best
            row[f"{name}_img_per_cpu_s"] = batch / cpu
            row[f"{name}_latency_s"] = best
            row[f"{name}_setup_s"] = sampler.setup_seconds - before
            row[f"{name}_first_call_s"] = first
        row["cfg_cost"] = row["free_img_s"] / row["cfg_img_s"]
        sampler.release()
        rows.append(row)
        print_row(row, flush=True)
    return rows


HEADER = (
    f"{'mode':>8} {'batch':>6} | {'free img/s':>10} {'latency s':>9} | {'CFG img/s':>9} "
    f"{'latency s':>9} | {'CFG cost':>8} | {'setup s (free/cfg)':>18} | "
    f"{'img per CPU-s (free/cfg)':>24}"
)


def print_row(row: dict, flush: bool = False) -> None:
    setup = f"{row['free_setup_s']:.1f}/{row['cfg_setup_s']:.1f}"
    per_cpu = f"{row['free_img_per_cpu_s']:.1f}/{row['cfg_img_per_cpu_s']:.1f}"
    print(
        f"{row['mode']:>8} {row['batch']:>6} | {row['free_img_s']:>10.1f} "
        f"{row['free_latency_s']:>9.3f} | {row['cfg_img_s']:>9.1f} {row['cfg_latency_s']:>9.3f} | "
        f"{row['cfg_cost']:>7.2f}x | {setup:>18} | {per_cpu:>24}",
        flush=flush,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="custom", help="'custom' (small) or a preset: GPT-L")
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--batch-sizes", default=None, help="default 16,64,256 (CPU) / 8,256")
    parser.add_argument("--modes", default=None, help="default eager (CPU) / eager,graph,compile")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default 2 (7.5 with --t2i)")
    parser.add_argument("--t2i", action="store_true", help="LlamaGen's text-to-image GPT")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    default_batches = "8,256" if on_cuda else "16,64,256"
    batches = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    modes = (args.modes or ("eager,graph,compile" if on_cuda else "eager")).split(",")
    model = build_model(args.model, args.grid, device, args.t2i)
    args.cfg_scale = args.cfg_scale or (7.5 if args.t2i else 2.0)
    kind = "T2I, 120 caption tokens + " if args.t2i else ""
    print(
        f"{args.model} grid {args.grid} ({kind}{model.seq_len} tokens), "
        f"{model.num_parameters() / 1e6:.1f}M parameters, {device}"
        f"{'' if on_cuda else f', {torch.get_num_threads()} threads'}, CFG scale {args.cfg_scale}; "
        "setup = graph capture / compile time paid on the first batch"
    )
    print(HEADER)
    rows = []
    for mode in modes:
        rows += bench_mode(model, device, mode, batches, args.cfg_scale, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"model": args.model, "grid": args.grid, "t2i": args.t2i, **r}
                       for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
