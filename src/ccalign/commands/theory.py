"""`ccalign theory`: the CCA theorem computed exactly on a small enumerable problem."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

HELP = "exact CCA optimum vs the CFG target on a tiny enumerable problem, over beta and lambda"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    from ccalign.io import output_file
    from ccalign.settings import MAX_SEED, number

    parser.add_argument(
        "--betas",
        type=number(float, gt=0, le=1e4),
        nargs="+",
        default=[1.0, 0.5, 0.25],
        help="CCA beta values; the CFG scale they aim at is s = 1/beta",
    )
    parser.add_argument(
        "--lambdas",
        type=number(float, gt=0, le=1e9),
        nargs="+",
        default=[1.0, 3.0, 10.0, 100.0, 1000.0],
        help="CCA negative weights lambda",
    )
    parser.add_argument(
        "--num-classes", type=number(int, ge=2, le=1000), default=3, help="classes of the problem"
    )
    parser.add_argument(
        "--vocab-size", type=number(int, ge=2, le=1000), default=3, help="tokens in the vocabulary"
    )
    parser.add_argument(
        "--seq-len", type=number(int, ge=1, le=64), default=3, help="tokens per sequence"
    )
    parser.add_argument(
        "--concentration",
        type=number(float, gt=0, le=1e6),
        default=1.0,
        help="Dirichlet concentration of the random p(x|c) (small = peaky)",
    )
    parser.add_argument(
        "--seed", type=number(int, ge=0, le=MAX_SEED), default=0, help="seed of the random problem"
    )
    parser.add_argument(
        "--no-coincident-rule",
        action="store_true",
        help="count a rolled label equal to the true one as a negative (the plain "
        "NCE setting) instead of a positive (what the sampled loss does)",
    )
    parser.add_argument(
        "--out", type=output_file, default=None, help="also write the table as JSON"
    )


def run(args: argparse.Namespace) -> int:
    """Build the problem, verify the pointwise optimum, print the optimum-vs-CFG table."""
    from ccalign import theory
    from ccalign.io import atomic_write

    started = time.perf_counter()
    with theory.single_threaded():
        rows = _report(args)
    print(f"\n({time.perf_counter() - started:.1f} s)")
    if args.out is not None:
        table = json.dumps([asdict(row) for row in rows], indent=2)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(table))
        print(f"wrote {args.out}")
    return 0


def _report(args: argparse.Namespace) -> list:
    """Print every section of the report; return the table rows (``CfgComparison``)."""
    from ccalign import theory

    problem = theory.random_problem(
        args.num_classes,
        args.vocab_size,
        args.seq_len,
        concentration=args.concentration,
        seed=args.seed,
    )
    coincident = not args.no_coincident_rule
    _print_problem(problem, args.seed, coincident)
    _print_pointwise_check(problem, max(args.lambdas))
    rows = [
        theory.compare_with_cfg(problem, beta=beta, lam=lam, coincident_as_positive=coincident)
        for beta in args.betas
        for lam in args.lambdas
    ]
    _print_table(rows)
    _print_normalising_lambdas(problem, args.betas)
    return rows


def _print_problem(problem, seed: int, coincident: bool) -> None:
    """One header paragraph describing the problem and the loss being analysed."""
    probs = " ".join(f"{p:.3f}" for p in problem.class_probs.tolist())
    rule = (
        "coincident labels count as positives (as the sampled loss does)"
        if coincident
        else "coincident labels count as negatives (plain NCE)"
    )
    print(
        f"Exact CCA theory: {problem.num_classes} classes, vocab {problem.vocab_size}, "
        f"length {problem.seq_len} ({problem.num_sequences} sequences), seed {seed}"
    )
    print(f"p(c) = {probs}; reference p_phi = the exact p(x|c); {rule}")


def _print_pointwise_check(problem, lam: float) -> None:
    """Numerical minimiser of the loss over a free margin table vs the closed forms."""
    from ccalign import theory

    print(
        f"\nPointwise optimum over an unnormalised margin r = beta log(p_theta/p_phi), "
        f"lambda = {lam:g}:"
    )
    forms = {
        False: "r* = log p(x|c)/p(x) - log lambda",
        True: "r* = log[p(x|c) (1 + p(c)) / (lambda (p(x) - p(x,c)))]",
    }
    for coincident, form in forms.items():
        weights = theory.pair_weights(problem, lam, coincident_as_positive=coincident)
        numeric = theory.fit_free_margins(weights)
        closed = theory.pointwise_optimum(problem, lam, coincident_as_positive=coincident)
        label = "coincident as positive" if coincident else "plain NCE             "
        print(
            f"  {label}  {form:58s} max |numeric - closed form| = "
            f"{(numeric - closed).abs().max().item():.1e}"
        )
    plain = theory.pointwise_optimum(problem, lam, coincident_as_positive=False)
    paper = (problem.cond_probs / problem.marginal()).log() - math.log(lam)
    print(
        f"  plain NCE vs method.md's log(p(x|c)/p(x)) - log lambda: max difference "
        f"{(plain - paper).abs().max().item():.1e}"
    )


def _print_table(rows) -> None:
    """The normalised optimum against the CFG target, one row per (beta, lambda)."""
    from ccalign.theory import MAX_CFG_SCALE

    print("\nNormalised optimum (what a real model can reach) vs CFG, p(c)-averaged over classes:")
    header = (
        f"{'beta':>6} {'s=1/b':>6} {'lambda':>7} {'mass r*':>9} {'TV(opt,CFG s)':>14} "
        f"{'KL(opt||CFG s)':>15} {'TV(ref,CFG s)':>14} {'best s':>7} {'TV(opt,best)':>13} "
        f"{'max p':>6}"
    )
    print(header)
    for row in rows:
        best = f"{row.best_scale:.2f}" if row.best_scale < MAX_CFG_SCALE else f">={MAX_CFG_SCALE:g}"
        print(
            f"{row.beta:6g} {1 / row.beta:6g} {row.lam:7g} {row.pointwise_mass:9.3g} "
            f"{row.tv_to_cfg:14.4f} {row.kl_to_cfg:15.4f} {row.tv_reference_to_cfg:14.4f} "
            f"{best:>7} {row.tv_to_best_cfg:13.4f} {row.max_prob:6.3f}"
        )
    print(
        "mass r*: total probability of the unnormalised pointwise optimum p_phi exp(r*/beta) "
        "(1 = already normalised); max p: largest sequence probability of the optimum."
    )


def _print_normalising_lambdas(problem, betas: list[float]) -> None:
    """Per beta, the lambda at which each class's plain-NCE optimum is exactly the CFG target."""
    from ccalign import theory

    print(
        "\nlambda at which the plain-NCE pointwise optimum is normalised, so that class's "
        "normalised optimum IS the CFG target (per class):"
    )
    for beta in betas:
        lams = " ".join(f"{lam:.3g}" for lam in theory.normalising_lambda(problem, beta).tolist())
        print(f"  beta {beta:g}: {lams}")
