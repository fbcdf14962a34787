"""Training-state memory of full CCA fine-tuning vs LoRA, counted on the meta device (no weights).

Full fine-tuning holds the policy (fp32), its gradients, AdamW's two moments and a frozen
reference copy: 20 bytes per parameter. LoRA holds the base weights once (the reference is the
same network with the adapters off) and 16 bytes per adapter parameter (weight, gradient, two
moments). Activations are not counted: they are the same in both (LoRA adds rank-wide ones).

    python benchmarks/lora_memory.py                     # GPT-B .. GPT-3B, rank 16, 384 px
    python benchmarks/lora_memory.py --rank 64 --models GPT-L
"""

from __future__ import annotations

import argparse
import json

import torch

from ccalign.models import llamagen
from ccalign.train import lora
from ccalign.train.config import LoraSection

GIB = 2**30


def measure(name: str, grid: int, rank: int) -> dict:
    """Parameter counts and training-state bytes (fp32 weights) of one preset."""
    with torch.device("meta"):
        model = llamagen.build(name, grid=grid)
        base = model.num_parameters()
        lora.add_adapters(model, LoraSection(enabled=True, rank=rank, alpha=rank), seed=0)
    adapters = sum(p.numel() for n, p in model.named_parameters() if lora.is_adapter_key(n))
    full_bytes = 20 * base
    lora_bytes = 4 * base + 16 * adapters
    return {
        "model": name,
        "rank": rank,
        "parameters": base,
        "adapter_parameters": adapters,
        "adapter_fraction": adapters / base,
        "full_gib": full_bytes / GIB,
        "lora_gib": lora_bytes / GIB,
        "saved_gib": (full_bytes - lora_bytes) / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="GPT-B,GPT-L,GPT-XL,GPT-XXL,GPT-3B")
    parser.add_argument("--grid", type=int, default=24)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    print("| model | parameters | LoRA params (rank) | full FT state GiB | LoRA state GiB |")
    print("|---|---|---|---|---|")
    rows = [measure(name, args.grid, args.rank) for name in args.models.split(",")]
    for r in rows:
        print(
            f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['adapter_parameters'] / 1e6:.2f}M"
            f" ({r['adapter_fraction']:.2%}, r={r['rank']}) | {r['full_gib']:.2f} |"
            f" {r['lora_gib']:.2f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
