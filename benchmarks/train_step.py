"""CCA training step: the project's trainer step vs the official code's naive step, side by side.

    python benchmarks/train_step.py                                   # small model on the CPU
    python benchmarks/train_step.py --model GPT-L --grid 24 --device cuda --micro-batch 8

Both variants run one optimizer step on the same micro-batch of B images (2B sequences for the
policy and 2B for the reference), with AdamW, clipping at 1.0, and bf16 autocast on CUDA:
- ``ccalign``: ``Trainer.train_step`` (chunked vocabulary projection that never holds the
  (2B, N, V) logits, fused AdamW on CUDA, reference under no_grad in train mode, as the
  official recipe: method.dropout = "both");
- ``naive``: the official code's step: full float32 (2B, N, V) logits, ``log_softmax`` and
  ``gather`` for the policy and the reference, reference in train mode.
Each variant runs in its own subprocess so peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` (everything: weights, optimizer, activations), on the CPU
the growth of the process's peak RSS (``ru_maxrss``) during the steps, above the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("ccalign", "naive")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="custom", help="GPT-B .. GPT-3B, or custom (the sizes below)")
    p.add_argument("--grid", type=int, default=16, help="tokens per side (24 = 384 px)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary (presets use 16384)")
    p.add_argument("--micro-batch", type=int, default=16, help="images per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="ccalign variant: recompute each block in backward (trades ~30%% time for memory)",
    )
    p.add_argument(
        "--weights-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="ccalign variant: bf16 weights and reference, float32 moments (train.weights_dtype)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="which to run, e.g. ccalign")
    p.add_argument("--json", help="also write the results and ccalign's memory plan to this file")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(args):
    """The model, initialised on ``args.device`` (a 3B model initialises in seconds on a GPU)."""
    import torch

    from ccalign.models import llamagen

    with torch.device(args.device):
        if args.model == "custom":
            sizes = dict(dim=args.dim, n_layer=args.layers, n_head=args.heads)
            return llamagen.build("custom", grid=args.grid, vocab_size=args.vocab, **sizes)
        return llamagen.build(args.model, grid=args.grid)


def random_batch(model, batch: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (batch, model.seq_len), generator=g)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g)
    return tokens.to(device), labels.to(device)


class RandomCodes:
    """A data set of one repeated random batch (the trainer needs something to size its plan)."""

    def __init__(self, tokens, labels):
        self.tokens, self.labels = tokens.cpu(), labels.cpu()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.tokens[i], self.labels[i]


def ccalign_step(args, model, tokens, labels):
    """The project's step: ``Trainer.train_step`` on one micro-batch."""
    from ccalign.train import TrainConfig, Trainer

    config = TrainConfig.from_dict(
        {
            "method": {"name": "cca", "beta": 0.02, "lam": 300.0, "uncond_ratio": 0.1},
            "optim": {"lr": 1e-5, "grad_clip": 1.0},
            "train": {
                "global_batch": len(labels),
                "micro_batch": len(labels),
                "steps": 1,
                "device": args.device,
                "precision": "auto",
                "progress": False,
                "activation_checkpointing": args.activation_checkpointing,
                "weights_dtype": args.weights_dtype,
            },
            "checkpoint": {"out": "/tmp/ccalign-bench-unused"},
        }
    )
    trainer = Trainer(config, model, RandomCodes(tokens, labels))
    step = iter(range(1, 10**9))
    return lambda: trainer.train_step([(tokens, labels)], next(step))


def naive_step(args, model, tokens, labels):
    """The official step: full float32 logits -> log_softmax -> gather, reference in train mode."""
    import copy

    import torch

    from ccalign.align import alignment_loss, make_pairs

    device = torch.device(args.device)
    model = model.to(device).train()
    reference = copy.deepcopy(model).requires_grad_(False).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=1e-5,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        fused=device.type == "cuda",
    )

    def sequence_logprob(net, both_labels, both_tokens):
        logits = net.logits(both_labels, both_tokens).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs.gather(-1, both_tokens[..., None]).squeeze(-1).sum(-1)

    def step():
        pairs = make_pairs(labels, null_class=model.null_class, uncond_ratio=0.1)
        both_labels = torch.cat([pairs.pos_labels, pairs.neg_labels])
        both_tokens = torch.cat([tokens, tokens])
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast:
            policy_pos, policy_neg = sequence_logprob(model, both_labels, both_tokens).chunk(2)
            with torch.no_grad():
                ref_pos, ref_neg = sequence_logprob(reference, both_labels, both_tokens).chunk(2)
        out = alignment_loss(
            "cca",
            policy_pos,
            policy_neg,
            ref_pos,
            ref_neg,
            pairs.neg_is_positive,
            beta=0.02,
            lam=300.0,
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(args) -> dict:
    """Run one variant in this process: warm-up step, timed steps, peak memory."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args).to(device)
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the released init zeroes the head
    tokens, labels = random_batch(model, args.micro_batch, device)
    factory = ccalign_step if args.variant == "ccalign" else naive_step
    step = factory(args, model, tokens, labels)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - started) / args.steps
    result = {
        "variant": args.variant,
        "images_per_s": args.micro_batch / seconds,
        "step_s": seconds,
        "parameters": model.num_parameters(),
    }
    if args.variant == "ccalign":
        result["plan_mib"] = memory_plan(args, model)
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["memory_kind"] = "torch.cuda.max_memory_allocated (total)"
    else:
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["peak_mib"] = (rss_after - rss_before) / 1024  # ru_maxrss is in KiB on Linux
        result["memory_kind"] = "peak RSS growth during the steps (above the weights)"
    return result


def memory_plan(args, model) -> dict:
    """ccalign's memory plan for this step (what --dry-run would print), in MiB."""
    import torch

    from ccalign.train import memory

    bf16 = args.weights_dtype == "bf16"
    on_cuda = args.device.startswith("cuda")
    dtypes = memory.Dtypes(
        weights=torch.bfloat16 if bf16 else torch.float32,
        reference=torch.bfloat16 if bf16 else torch.float32,
        autocast=on_cuda,
        device_type="cuda" if on_cuda else "cpu",
    )
    plan = memory.plan_memory(
        model,
        micro_batch=args.micro_batch,
        dtypes=dtypes,
        activation_checkpointing=args.activation_checkpointing,
    )
    parts = ("weights", "gradients", "optimizer", "reference", "autocast_copies", "activations")
    return {k: plan.to_dict()[k] / 2**20 for k in (*parts, "workspace", "total")}


def run_variant(variant: str, argv: list[str]) -> dict:
    """Measure ``variant`` in a fresh subprocess and return its JSON result."""
    cmd = [sys.executable, __file__, *argv, "--variant", variant]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} variant failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(args) -> str:
    """The device the figures come from, in words."""
    import torch

    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {args.threads} threads, torch {torch.__version__}"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return
    results = [run_variant(v, argv) for v in args.variants.split(",")]
    shape = f"{args.model} grid {args.grid} ({args.grid**2} tokens)" + (
        f" dim {args.dim} x {args.layers} layers vocab {args.vocab}"
        if args.model == "custom"
        else ""
    )
    extra = ", ccalign with activation checkpointing" if args.activation_checkpointing else ""
    print(f"CCA training step, {shape}, micro-batch {args.micro_batch}, {args.device}{extra}")
    print(f"machine: {machine(args)}; {results[0]['parameters']:,} parameters")
    print(f"memory: {results[0]['memory_kind']}")
    print(f"{'variant':<10} {'images/s':>10} {'step (s)':>10} {'peak MiB':>10}")
    for r in results:
        print(
            f"{r['variant']:<10} {r['images_per_s']:>10.2f} {r['step_s']:>10.3f} "
            f"{r['peak_mib']:>10.0f}"
        )
    for r in results:
        if "plan_mib" in r:
            print(f"ccalign memory plan: {r['plan_mib']['total']:.0f} MiB in all (see --json)")
    if len(results) == 2:
        ours, naive = results
        print(
            f"speed-up {ours['images_per_s'] / naive['images_per_s']:.2f}x, "
            f"memory {ours['peak_mib'] / max(naive['peak_mib'], 1e-9):.2f}x of naive"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "machine": machine(args), "results": results}, f, indent=2
            )


if __name__ == "__main__":
    main()
