"""The CCA theorem, executed exactly on a problem small enough to enumerate.

A class-conditional distribution p(x, c) over every token sequence x of a tiny vocabulary is
fixed; the reference model p_phi is the perfectly pretrained one (p_phi(x|c) = p(x|c), and the
null condition gives p(x)). Everything CCA's theory talks about is then a finite table:

* the CFG target p_s(x|c) ∝ p(x|c)^(1+s) / p(x)^s, with s = 1/beta for CCA;
* the expected CCA loss of any model, as a weighted sum over (condition, sequence) pairs
  (``pair_weights``), including the details of the sampled loss: negatives are the next
  sample's label (independent of x, so they follow p(x) p(c')), rows whose negative label equals
  the true one count as positives, and null-masked rows are positives on the null condition;
* its pointwise optimum over an unconstrained margin r = beta log(p_theta / p_phi)
  (``pointwise_optimum``, the NCE result), and its optimum over normalised models
  (``normalised_optimum``), which is what a real model can reach.

``TabularAR`` is an autoregressive model with one logit table per (condition, prefix), so it
can represent every conditional distribution; ``finetune_sampled`` trains it with the project's
own losses and ``make_pairs`` on sampled batches, which must land on ``normalised_optimum``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import Tensor, nn

from ccalign.align import AlignOutput, cca_loss, make_pairs

MAX_SEQUENCES = 4096  # vocab_size ** seq_len above this is no longer "small enough to enumerate"
MAX_CFG_SCALE = 50.0  # upper end of the search for the CFG scale closest to an optimum
PEAK_LOGIT = 8.0  # extra logit of the favoured sequence in a "collapsed" starting point


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread, then restore: these tensors are tiny, and on a busy machine the
    intra-op thread pool made the theory computations 5-15 times slower, not faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class DiscreteProblem:
    """p(x, c) over all ``vocab_size ** seq_len`` sequences (lexicographic order), float64."""

    vocab_size: int
    seq_len: int
    class_probs: Tensor  # (C,) p(c)
    cond_probs: Tensor  # (C, N) p(x|c)

    @property
    def num_classes(self) -> int:
        return self.class_probs.shape[0]

    @property
    def null_class(self) -> int:
        """The unconditional condition's id, after the real classes (as in LlamaGen)."""
        return self.num_classes

    @property
    def num_sequences(self) -> int:
        return self.cond_probs.shape[1]

    def joint(self) -> Tensor:
        """p(x, c), shape (C, N)."""
        return self.class_probs[:, None] * self.cond_probs

    def marginal(self) -> Tensor:
        """p(x), shape (N,)."""
        return self.joint().sum(0)

    def reference(self) -> Tensor:
        """The perfectly pretrained p_phi: rows p(x|c) for each class, then p(x) for null."""
        return torch.cat([self.cond_probs, self.marginal()[None]])

    def sequences(self) -> Tensor:
        """All sequences as tokens, shape (N, L), in the order of the probability columns."""
        return _all_sequences(self.vocab_size, self.seq_len, "cpu")

    def cfg_target(self, scale: float) -> Tensor:
        """CFG at guidance ``scale``: p(x|c)^(1 + s) / p(x)^s, normalised per class, (C, N)."""
        log_target = (1 + scale) * self.cond_probs.log() - scale * self.marginal().log()
        return torch.softmax(log_target, dim=1)


def random_problem(
    num_classes: int = 3,
    vocab_size: int = 3,
    seq_len: int = 3,
    *,
    concentration: float = 1.0,
    seed: int = 0,
) -> DiscreteProblem:
    """A random but fixed p(x, c): Dirichlet(``concentration``) draws for p(c) and each p(x|c)."""
    if num_classes < 2 or vocab_size < 2 or seq_len < 1:
        raise ValueError(
            "need num_classes >= 2, vocab_size >= 2 and seq_len >= 1, got "
            f"{num_classes}, {vocab_size}, {seq_len}"
        )
    num_sequences = vocab_size**seq_len
    if num_sequences > MAX_SEQUENCES:
        raise ValueError(
            f"vocab_size ** seq_len = {num_sequences} sequences is too many to enumerate "
            f"(at most {MAX_SEQUENCES}); use a smaller vocabulary or shorter sequences"
        )
    if not concentration > 0:
        raise ValueError(f"concentration must be positive, got {concentration}")
    rng = np.random.default_rng(seed)
    class_probs = rng.dirichlet(np.full(num_classes, 4.0 * concentration))
    cond_probs = rng.dirichlet(np.full(num_sequences, concentration), size=num_classes)
    cond_probs = np.maximum(cond_probs, 1e-12)  # full support: every log-ratio stays finite
    cond_probs /= cond_probs.sum(1, keepdims=True)
    return DiscreteProblem(
        vocab_size, seq_len, torch.from_numpy(class_probs), torch.from_numpy(cond_probs)
    )


class TabularAR(nn.Module):
    """Autoregressive model with a free logit vector per (condition, prefix): fully expressive.

    ``model(labels, tokens)`` returns the sequence log-likelihood (B,), the same convention as
    the LlamaGen model, so it plugs into the alignment losses unchanged.
    """

    def __init__(
        self, num_conditions: int, vocab_size: int, seq_len: int, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        num_prefixes = sum(vocab_size**t for t in range(seq_len))
        self.logits = nn.Parameter(
            torch.zeros(num_conditions, num_prefixes, vocab_size, dtype=dtype)
        )

    @classmethod
    def from_distribution(
        cls, probs: Tensor, vocab_size: int, seq_len: int, dtype: torch.dtype = torch.float32
    ) -> TabularAR:
        """The model whose condition k samples sequences with probabilities ``probs[k]``."""
        model = cls(probs.shape[0], vocab_size, seq_len, dtype)
        with torch.no_grad():
            for t in range(seq_len):
                prefix = probs.reshape(probs.shape[0], vocab_size**t, -1).sum(-1)
                extended = probs.reshape(probs.shape[0], vocab_size ** (t + 1), -1).sum(-1)
                next_token = extended.reshape(probs.shape[0], -1, vocab_size) / prefix[..., None]
                offset = _prefix_offset(vocab_size, t)
                rows = slice(offset, offset + vocab_size**t)
                model.logits[:, rows] = next_token.clamp_min(1e-300).log().to(dtype)
        return model

    def prefix_ids(self, tokens: Tensor) -> Tensor:
        """Row of the logit table used to predict each position: (B, L)."""
        ids, code = [], torch.zeros_like(tokens[:, 0])
        for t in range(self.seq_len):
            ids.append(_prefix_offset(self.vocab_size, t) + code)
            code = code * self.vocab_size + tokens[:, t]
        return torch.stack(ids, dim=1)

    def forward(self, labels: Tensor, tokens: Tensor) -> Tensor:
        """Sequence log-likelihood log p(tokens | labels), shape (B,)."""
        if tokens.shape != (labels.shape[0], self.seq_len):
            raise ValueError(
                f"tokens must have shape (B, {self.seq_len}) matching labels (B,), "
                f"got {tuple(tokens.shape)} and {tuple(labels.shape)}"
            )
        logits = self.logits[labels[:, None], self.prefix_ids(tokens)]
        return logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1).sum(-1)

    def distributions(self) -> Tensor:
        """p_theta(x | k) for every condition k and sequence x, shape (K, N)."""
        sequences = _all_sequences(self.vocab_size, self.seq_len, self.logits.device)
        rows = [
            self(torch.full((len(sequences),), k, device=sequences.device), sequences).exp()
            for k in range(self.logits.shape[0])
        ]
        return torch.stack(rows)


@dataclass(frozen=True)
class PairWeights:
    """Expected weight of each (condition, sequence) term of the CCA loss, shape (C+1, N) each.

    The expected loss of a model with gains D(x, k) = log p_theta(x|k) - log p_phi(x|k) is
    ``sum(positive * -log s(beta D) + negative * -log s(-beta D)) / max(lam, 1)``.
    """

    positive: Tensor
    negative: Tensor


def pair_weights(
    problem: DiscreteProblem,
    lam: float,
    *,
    uncond_ratio: float = 0.0,
    coincident_as_positive: bool = True,
) -> PairWeights:
    """The expectation of the sampled CCA loss (``make_pairs`` + ``cca_loss``) over i.i.d. batches.

    Row i holds (x, c) ~ p(x, c); its negative label c' is row i+1's label, independent of x, so
    (x, c, c') ~ p(x, c) p(c'). Unmasked rows (probability 1 - u) contribute -log s(beta D(x,c))
    and, if c' != c, -lam log s(-beta D(x,c')); if c' = c (probability p(c)) the sampled loss
    counts that negative as a positive, -log s(beta D(x,c)). Null-masked rows (probability u)
    contribute -2 log s(beta D(x, null)). Hence positive(c, x) = (1-u) p(x,c) (1 + p(c)),
    negative(c, x) = (1-u) lam p(c) (p(x) - p(x,c)), positive(null, x) = 2 u p(x).
    With ``coincident_as_positive=False`` every rolled label is a negative (the plain NCE setting
    of the paper's theorem): positive = (1-u) p(x,c), negative = (1-u) lam p(c) p(x).
    Exact for every batch size B >= 2 (at B = 1 the roll pairs a row with itself).
    """
    joint, marginal, p_c = problem.joint(), problem.marginal(), problem.class_probs[:, None]
    if coincident_as_positive:
        positive = joint * (1 + p_c)
        negative = lam * p_c * (marginal - joint)
    else:
        positive = joint
        negative = lam * p_c * marginal.expand_as(joint)
    null_positive = 2 * uncond_ratio * marginal[None]
    return PairWeights(
        positive=torch.cat([(1 - uncond_ratio) * positive, null_positive]),
        negative=torch.cat([(1 - uncond_ratio) * negative, torch.zeros_like(null_positive)]),
    )


def expected_cca_loss_per_condition(
    gains: Tensor, weights: PairWeights, *, beta: float, lam: float
) -> Tensor:
    """Exact expected CCA loss, split by condition row: (K,) for gains D of shape (K, N)."""
    terms = -weights.positive * F.logsigmoid(beta * gains) - weights.negative * F.logsigmoid(
        -beta * gains
    )
    return terms.sum(1) / max(lam, 1.0)


def pointwise_optimum(
    problem: DiscreteProblem, lam: float, *, coincident_as_positive: bool = True
) -> Tensor:
    """Minimiser r* = beta log(p_theta / p_phi) over an unconstrained table r(x, c): (C, N).

    Each term a (-log s(r)) + b (-log s(-r)) is minimised at r = log(a / b). Without the
    coincident-label rule this is the paper's log(p(x|c) / p(x)) - log lam; with it,
    log[p(x|c) (1 + p(c)) / (lam (p(x) - p(x, c)))]. The null row has no negatives, so no
    finite pointwise optimum, and is left out.
    """
    weights = pair_weights(problem, lam, coincident_as_positive=coincident_as_positive)
    classes = slice(0, problem.num_classes)
    return weights.positive[classes].log() - weights.negative[classes].log()


def fit_free_margins(weights: PairWeights) -> Tensor:
    """Numerically minimise the expected loss over a free margin table r = beta D (classes only).

    An independent check of ``pointwise_optimum``'s closed form (float64 L-BFGS, rows apart).
    """
    rows = []
    for positive, negative in zip(weights.positive[:-1], weights.negative[:-1], strict=True):
        a, b = positive.numpy(), negative.numpy()

        def loss_and_grad(r: np.ndarray, a=a, b=b) -> tuple[float, np.ndarray]:
            loss = -(a * _log_sigmoid(r) + b * _log_sigmoid(-r)).sum()
            return loss, -a * _sigmoid(-r) + b * _sigmoid(r)

        rows.append(_lbfgs(loss_and_grad, np.zeros_like(a)))
    return torch.from_numpy(np.stack(rows))


def normalised_optimum(
    problem: DiscreteProblem,
    *,
    beta: float,
    lam: float,
    uncond_ratio: float = 0.0,
    coincident_as_positive: bool = True,
    restarts: int = 1,
    seed: int = 0,
) -> Tensor:
    """The minimiser of the exact expected CCA loss over normalised models: (C+1, N) probs.

    Optimises a free softmax per condition (float64 L-BFGS with the analytic gradient),
    starting from the reference, the CFG target, the normalised pointwise optimum, three
    "collapsed" points (mass piled on one of the pointwise optimum's top sequences) and
    ``restarts`` random points, and keeps per condition the start with the lowest loss: the
    loss is not convex in the probabilities, and for large lambda it has several local minima
    (each piling the mass on a different sequence), so there the global optimum is the best
    found, not certified. With ``uncond_ratio = 0`` the null row
    carries no loss and stays at the reference p(x).
    """
    weights = pair_weights(
        problem, lam, uncond_ratio=uncond_ratio, coincident_as_positive=coincident_as_positive
    )
    log_ref = problem.reference().log().numpy()
    starts = _starting_logits(problem, beta, lam, coincident_as_positive, restarts, seed)
    best = []
    for k in range(log_ref.shape[0]):
        objective = _softmax_objective(
            weights.positive[k].numpy(), weights.negative[k].numpy(), log_ref[k], beta
        )
        candidates = [_lbfgs(objective, start[k].numpy()) for start in starts]
        losses = [objective(z)[0] for z in candidates]
        best.append(_log_softmax(candidates[int(np.argmin(losses))]))
    return torch.from_numpy(np.exp(np.stack(best)))


def _softmax_objective(
    positive: np.ndarray, negative: np.ndarray, log_ref: np.ndarray, beta: float
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """One condition's expected loss (up to the 1/max(lam, 1) factor) of softmax(z), and its
    gradient in z: dL/dD = beta (b s(beta D) - a s(-beta D)), then the softmax Jacobian."""

    def loss_and_grad(z: np.ndarray) -> tuple[float, np.ndarray]:
        log_q = _log_softmax(z)
        margin = beta * (log_q - log_ref)
        loss = -(positive * _log_sigmoid(margin) + negative * _log_sigmoid(-margin)).sum()
        grad_gain = beta * (negative * _sigmoid(margin) - positive * _sigmoid(-margin))
        return loss, grad_gain - np.exp(log_q) * grad_gain.sum()

    return loss_and_grad


def _lbfgs(
    loss_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]],
    start: np.ndarray,
    *,
    history: int = 20,
    max_iter: int = 5000,
    gtol: float = 1e-14,
) -> np.ndarray:
    """Minimise with L-BFGS (two-loop recursion, Armijo backtracking) to rounding level.

    Written with element-wise numpy only: scipy's L-BFGS-B calls a threaded BLAS, which on a
    busy machine made these tiny problems (27 variables) some 40 times slower.
    """
    x = start.astype(np.float64)
    loss, grad = loss_and_grad(x)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / <s, y>)
    for _ in range(max_iter):
        if np.abs(grad).max() < gtol:
            break
        direction = -_inverse_hessian_times(grad, steps)
        slope = float((direction * grad).sum())
        if slope >= 0:  # not a descent direction: restart from steepest descent
            steps.clear()
            direction, slope = -grad, -float((grad * grad).sum())
        step = 1.0
        while True:
            new_x = x + step * direction
            new_loss, new_grad = loss_and_grad(new_x)
            if new_loss <= loss + 1e-4 * step * slope:
                break
            step *= 0.5
            if step < 1e-20:
                return x  # no decrease left at machine precision
        s, y = new_x - x, new_grad - grad
        curvature = float((s * y).sum())
        if curvature > 1e-300:
            steps.append((s, y, 1.0 / curvature))
            del steps[:-history]
        stalled = loss - new_loss <= 1e-15 * abs(loss)
        x, loss, grad = new_x, new_loss, new_grad
        if stalled:  # converged to rounding level
            break
    return x


def _inverse_hessian_times(
    grad: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray, float]]
) -> np.ndarray:
    """The L-BFGS two-loop recursion: the inverse-Hessian estimate applied to ``grad``."""
    q, alphas = grad.copy(), []
    for s, y, rho in reversed(steps):
        alpha = rho * float((s * q).sum())
        q -= alpha * y
        alphas.append(alpha)
    if steps:
        s, y, rho = steps[-1]
        q *= 1.0 / (rho * float((y * y).sum()))
    for (s, y, rho), alpha in zip(steps, reversed(alphas), strict=True):
        q += (alpha - rho * float((y * q).sum())) * s
    return q


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(x))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.logaddexp.reduce(z)


def _starting_logits(
    problem: DiscreteProblem,
    beta: float,
    lam: float,
    coincident_as_positive: bool,
    restarts: int,
    seed: int,
    peaks: int = 3,
) -> list[Tensor]:
    """Initial log-probabilities for the multi-start search, each (C+1, N)."""
    log_ref = problem.reference().log()
    r_star = pointwise_optimum(problem, lam, coincident_as_positive=coincident_as_positive)
    null = log_ref[-1:]
    starts = [
        log_ref,
        torch.cat([problem.cfg_target(1.0 / beta).log(), null]),
        torch.cat([log_ref[:-1] + r_star / beta, null]),
    ]
    ranked = (log_ref[:-1] + r_star / beta).argsort(dim=1, descending=True)
    for rank in range(min(peaks, problem.num_sequences)):  # mass piled on one sequence
        bump = PEAK_LOGIT * F.one_hot(ranked[:, rank], problem.num_sequences)
        starts.append(torch.cat([log_ref[:-1] + bump, null]))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(restarts):
        starts.append(torch.randn(log_ref.shape, generator=generator, dtype=log_ref.dtype))
    return starts


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """Total-variation distance between the rows of p and q."""
    return 0.5 * (p - q).abs().sum(-1)


def kl_divergence(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) per row (0 log 0 = 0)."""
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), 0.0).sum(-1)


def class_average(problem: DiscreteProblem, per_class: Tensor) -> float:
    """Average of a per-class quantity under p(c)."""
    return float((problem.class_probs * per_class).sum())


def closest_cfg_scale(
    problem: DiscreteProblem, probs: Tensor, *, max_scale: float = MAX_CFG_SCALE
) -> tuple[float, float]:
    """The single CFG scale s whose target is closest (p(c)-averaged TV) to ``probs`` (C, N)."""

    def distance(scale: float) -> float:
        return class_average(problem, total_variation(probs, problem.cfg_target(scale)))

    grid = np.linspace(0.0, max_scale, 501)
    best = int(np.argmin([distance(s) for s in grid]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    result = minimize_scalar(
        distance, bounds=(low, high), method="bounded", options={"xatol": 1e-6}
    )
    refined = (float(result.x), float(result.fun))
    on_grid = (float(grid[best]), distance(grid[best]))
    return min(refined, on_grid, key=lambda candidate: candidate[1])


@dataclass(frozen=True)
class CfgComparison:
    """How the exact normalised CCA optimum relates to CFG, p(c)-averaged over classes."""

    beta: float
    lam: float
    pointwise_mass: float  # sum_x of the unnormalised pointwise optimum p_phi exp(r*/beta)
    tv_to_cfg: float  # TV(optimum, CFG target at s = 1/beta)
    kl_to_cfg: float  # KL(optimum || CFG target at s = 1/beta)
    tv_reference_to_cfg: float  # TV(p(x|c), CFG target at s = 1/beta): the starting gap
    best_scale: float  # the single CFG scale closest to the optimum
    tv_to_best_cfg: float
    max_prob: float  # largest sequence probability of the optimum (1 = collapsed on one sequence)


def compare_with_cfg(
    problem: DiscreteProblem, *, beta: float, lam: float, coincident_as_positive: bool = True
) -> CfgComparison:
    """Solve the exact normalised optimum for (beta, lam) and measure it against CFG."""
    optimum = normalised_optimum(
        problem, beta=beta, lam=lam, coincident_as_positive=coincident_as_positive
    )[: problem.num_classes]
    r_star = pointwise_optimum(problem, lam, coincident_as_positive=coincident_as_positive)
    target = problem.cfg_target(1.0 / beta)
    best_scale, tv_best = closest_cfg_scale(problem, optimum)
    return CfgComparison(
        beta=beta,
        lam=lam,
        pointwise_mass=class_average(problem, (problem.cond_probs * (r_star / beta).exp()).sum(1)),
        tv_to_cfg=class_average(problem, total_variation(optimum, target)),
        kl_to_cfg=class_average(problem, kl_divergence(optimum, target)),
        tv_reference_to_cfg=class_average(problem, total_variation(problem.cond_probs, target)),
        best_scale=best_scale,
        tv_to_best_cfg=tv_best,
        max_prob=class_average(problem, optimum.max(1).values),
    )


def normalising_lambda(problem: DiscreteProblem, beta: float) -> Tensor:
    """Per class, the lambda that makes the plain-NCE pointwise optimum normalised, (C,).

    Without the coincident-label rule the pointwise optimum is
    p(x|c)^(1+s) p(x)^(-s) lam^(-s) with s = 1/beta, whose mass is 1 exactly at
    lam_c = (sum_x p(x|c)^(1+s) / p(x)^s)^beta; at that lambda, class c's normalised optimum
    is the CFG target itself.
    """
    s = 1.0 / beta
    log_terms = (1 + s) * problem.cond_probs.log() - s * problem.marginal().log()
    return (beta * torch.logsumexp(log_terms, dim=1)).exp()


def finetune_sampled(
    problem: DiscreteProblem,
    objective: Callable[..., AlignOutput] = cca_loss,
    *,
    beta: float,
    lam: float,
    uncond_ratio: float = 0.0,
    steps: int = 400,
    batch_size: int = 2048,
    lr: float = 0.05,
    seed: int = 0,
) -> TabularAR:
    """Fine-tune a ``TabularAR`` from the exact reference on sampled batches with ``objective``.

    The sampled-training path at toy scale: batches (x, c) ~ p(x, c), ``make_pairs`` for the
    negatives and null-masking, policy and frozen-reference log-likelihoods of both pairs, the
    project's loss, Adam with a linearly decaying learning rate (so the last iterate settles).
    """
    reference = TabularAR.from_distribution(
        problem.reference(), problem.vocab_size, problem.seq_len
    ).requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    optimiser = torch.optim.Adam(policy.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    sequences, joint = problem.sequences(), problem.joint().reshape(-1).float()
    for _ in range(steps):
        index = torch.multinomial(joint, batch_size, replacement=True, generator=generator)
        labels, tokens = index // problem.num_sequences, sequences[index % problem.num_sequences]
        pairs = make_pairs(
            labels, null_class=problem.null_class, uncond_ratio=uncond_ratio, generator=generator
        )
        both_labels = torch.cat([pairs.pos_labels, pairs.neg_labels])
        both_tokens = torch.cat([tokens, tokens])
        policy_lp = policy(both_labels, both_tokens)
        with torch.no_grad():
            ref_lp = reference(both_labels, both_tokens)
        out = objective(
            policy_lp[:batch_size],
            policy_lp[batch_size:],
            ref_lp[:batch_size],
            ref_lp[batch_size:],
            pairs.neg_is_positive,
            beta=beta,
            lam=lam,
        )
        optimiser.zero_grad(set_to_none=True)
        out.loss.backward()
        optimiser.step()
        schedule.step()
    return policy


def _prefix_offset(vocab_size: int, length: int) -> int:
    """Number of prefixes shorter than ``length``: where that length's rows start."""
    return sum(vocab_size**t for t in range(length))


def _all_sequences(vocab_size: int, seq_len: int, device: torch.device | str) -> Tensor:
    """Every sequence in lexicographic order, (V^L, L)."""
    grids = torch.meshgrid(*[torch.arange(vocab_size, device=device)] * seq_len, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)
