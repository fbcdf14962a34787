"""Janus sampling, side by side with transformers' own ``generate(..., generation_mode="image")``.

transformers runs 2B rows at every step whatever the guidance (at guidance 1 it even needs a
logits processor that keeps the conditional half, or it crashes); ccalign's sampler runs B rows
guidance-free and 2B with CFG. Timed interleaved, same random weights and prompts, sampling on
(transformers: ``do_sample=True, top_k=None``, the original Janus' sampler; ccalign: no top-k),
medians and ranges over ``--repeats`` rounds. Images/s of the token sampling alone (the VQ decode
is the same work for both).

CPU (default): a tiny Janus (Llama text model of width 128, 2 layers; 8 x 8 = 64 image tokens
of a 1,024-code VQ), or ``--size small`` (width 512, 6 layers). GPU: ``--device cuda --preset
Janus-Pro-1B`` (576 image tokens, bf16 weights, random: speed does not depend on them; the
decode step captured in a CUDA graph, outside the timing).

    python benchmarks/janus_sampling.py                                   # CPU, tiny
    python benchmarks/janus_sampling.py --size small --batch-sizes 1,16,64
    python benchmarks/janus_sampling.py --device cuda --preset Janus-Pro-1B --batch-sizes 1,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ccalign.conditions import CaptionBatch
from ccalign.models.janus import JanusImageModel
from ccalign.models.janus.family import FAMILY, preset_config

PROMPT_TOKENS = 24
SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=344),
    "small": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  intermediate_size=1376),
}


def build(preset: str | None, size: str, device: torch.device,
          dtype: torch.dtype) -> JanusImageModel:
    """Random weights (generation head included, so the logits are not all equal)."""
    from transformers import JanusConfig

    torch.manual_seed(0)
    if preset is not None:
        config = preset_config(FAMILY.presets[preset], {})
    else:
        config = preset_config(SIZES[size], {"vocab_size": 1000})
        raw = JanusConfig(**config.janus).to_dict()
        raw["vision_config"].update(image_size=128, patch_size=16, num_image_tokens=64,
                                    hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=128)
        raw["vq_config"].update(num_embeddings=1024)
        config = type(config)(raw, bos_id=1, boi_id=2, pad_id=0)
    model = JanusImageModel(config)
    return model.to(device, dtype).eval()


def prompts(model: JanusImageModel, batch: int, device: torch.device):
    """Left-padded random prompts [pad..., BOS, words..., BOI] of 8..PROMPT_TOKENS tokens."""
    g = torch.Generator().manual_seed(batch)
    cfg = model.config
    vocab = model.janus.config.text_config.vocab_size
    ids = torch.full((batch, PROMPT_TOKENS), cfg.pad_id)
    mask = torch.zeros(batch, PROMPT_TOKENS, dtype=torch.bool)
    for row in range(batch):
        n = int(torch.randint(8, PROMPT_TOKENS + 1, (1,), generator=g))
        words = torch.randint(10, vocab, (n - 2,), generator=g)
        ids[row, PROMPT_TOKENS - n :] = torch.cat([torch.tensor([cfg.bos_id]), words,
                                                   torch.tensor([cfg.boi_id])])
        mask[row, PROMPT_TOKENS - n :] = True
    return ids.to(device), mask.to(device)


class CondOnly:
    """transformers at guidance 1: keep the conditional half (else generate crashes)."""

    def __call__(self, input_ids, scores):
        return scores[: scores.shape[0] // 2]


def runners(model: JanusImageModel, ids: torch.Tensor, mask: torch.Tensor):
    from transformers import LogitsProcessorList

    sampler = FAMILY.sampler(model)
    conds = CaptionBatch.of(ids, mask)
    inputs = {"input_ids": ids, "attention_mask": mask.long(), "generation_mode": "image",
              "do_sample": True, "top_k": None}
    return {
        "ccalign free": lambda: sampler.generate(conds, cfg_scale=1.0),
        "transformers g=1": lambda: model.janus.generate(
            **inputs, guidance_scale=1.0, logits_processor=LogitsProcessorList([CondOnly()])),
        "ccalign cfg 5": lambda: sampler.generate(conds, cfg_scale=5.0),
        "transformers g=5": lambda: model.janus.generate(**inputs, guidance_scale=5.0),
    }


def timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=sorted(FAMILY.presets))
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="the CPU model (without --preset)")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.preset, args.size, device, dtype)
    results = []
    for batch in map(int, args.batch_sizes.split(",")):
        ids, mask = prompts(model, batch, device)
        runs = runners(model, ids, mask)
        for run in runs.values():  # warm-up: kernels, allocator
            timed(run, device)
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                seconds[name].append(timed(run, device))
        row = {"batch": batch, "tokens": model.seq_len}
        for name, values in seconds.items():
            row[name] = {"median_s": statistics.median(values), "min_s": min(values),
                         "max_s": max(values)}
        med = {name: row[name]["median_s"] for name in runs}
        row["free vs transformers g=1"] = med["transformers g=1"] / med["ccalign free"]
        row["free vs transformers g=5"] = med["transformers g=5"] / med["ccalign free"]
        row["cfg 5 vs transformers g=5"] = med["transformers g=5"] / med["ccalign cfg 5"]
        results.append(row)
        print(f"batch {batch:3d} ({model.seq_len} tokens): " + ", ".join(
            f"{name} {batch / med[name]:.2f} img/s" for name in runs))
        print(f"  ratios (speed-up, medians of {args.repeats}): guidance-free vs transformers "
              f"g=1 {row['free vs transformers g=1']:.2f}x, vs g=5 "
              f"{row['free vs transformers g=5']:.2f}x; ccalign cfg 5 vs transformers g=5 "
              f"{row['cfg 5 vs transformers g=5']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "preset": args.preset or args.size,
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
