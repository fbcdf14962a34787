"""What the samplers' finite-logits check costs: guidance-free and CFG sampling with the check
(``FiniteCheck.add`` per token) and without it, interleaved in one run, per batch size.

    python benchmarks/finite_check.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from ccalign.models import generation
from ccalign.sample import Sampler
from sample import build_model  # benchmarks/sample.py: the demo-sized random model


def best_cpu_seconds(sampler: Sampler, batch: int, cfg: float, repeats: int) -> float:
    """The best process CPU time of ``repeats`` calls (a shared machine's fairest figure)."""
    labels = torch.arange(batch) % sampler.model.num_classes
    times = []
    for _ in range(repeats):
        start = time.process_time()
        sampler.generate(labels, cfg_scale=cfg, generator=torch.Generator().manual_seed(0))
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="16,64,256")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model("custom", 7, torch.device("cpu"))
    checked = generation.FiniteCheck.add
    print("batch | cfg | CPU-s with check | without | ratio")
    for batch in map(int, args.batch_sizes.split(",")):
        sampler = Sampler(model, device="cpu")
        for cfg in (1.0, 2.0):
            best = {"with": float("inf"), "without": float("inf")}
            for _ in range(args.rounds):  # interleaved: both see the same load
                for name in best:
                    generation.FiniteCheck.add = checked if name == "with" else lambda self, x: self
                    best[name] = min(best[name], best_cpu_seconds(sampler, batch, cfg, 2))
            generation.FiniteCheck.add = checked
            ratio = best["with"] / best["without"]
            print(f"{batch} | {cfg:g} | {best['with']:.3f} | {best['without']:.3f} | {ratio:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
