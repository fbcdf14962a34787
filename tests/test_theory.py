"""ccalign.theory: the exact small-problem CCA theory, and sampled training landing on it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ccalign import theory
from ccalign.align import cca_loss, dpo_loss, make_pairs
from ccalign.cli import main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: torch's thread pool only costs here (and restored afterwards)."""
    with theory.single_threaded():
        yield


@pytest.fixture(scope="module")
def problem() -> theory.DiscreteProblem:
    return theory.random_problem(num_classes=3, vocab_size=3, seq_len=3, seed=0)


def test_random_problem_is_a_seeded_distribution(problem):
    again = theory.random_problem(num_classes=3, vocab_size=3, seq_len=3, seed=0)
    assert torch.equal(problem.cond_probs, again.cond_probs)
    assert problem.num_sequences == 27 and problem.null_class == 3
    assert problem.class_probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(problem.cond_probs.sum(1), torch.ones(3, dtype=torch.float64))
    assert (problem.cond_probs > 0).all()
    marginal = sum(problem.class_probs[c] * problem.cond_probs[c] for c in range(3))
    torch.testing.assert_close(problem.marginal(), marginal, rtol=0, atol=1e-15)
    # the sequence at column j spells j in base V, most significant token first
    assert problem.sequences()[14].tolist() == [1, 1, 2]


def test_cfg_target_is_the_guided_distribution(problem):
    s = 1.7
    p_c, p = problem.cond_probs.numpy(), problem.marginal().numpy()
    unnormalised = p_c * (p_c / p) ** s
    want = unnormalised / unnormalised.sum(1, keepdims=True)
    np.testing.assert_allclose(problem.cfg_target(s).numpy(), want, rtol=1e-12)
    torch.testing.assert_close(problem.cfg_target(0.0), problem.cond_probs)


def test_tabular_model_matches_chain_rule_by_brute_force(problem):
    model = theory.TabularAR.from_distribution(problem.reference(), 3, 3, dtype=torch.float64)
    torch.testing.assert_close(model.distributions(), problem.reference(), rtol=1e-12, atol=0)
    with torch.no_grad():
        model.logits.normal_(generator=torch.Generator().manual_seed(1))
    table = model.logits.detach().log_softmax(-1)
    for k, tokens in [(0, (2, 0, 1)), (3, (1, 1, 1)), (2, (0, 2, 2))]:
        prefix_rows = [0, 1 + tokens[0], 4 + 3 * tokens[0] + tokens[1]]
        want = sum(table[k, row, tok].item() for row, tok in zip(prefix_rows, tokens, strict=True))
        got = model(torch.tensor([k]), torch.tensor([tokens])).item()
        assert got == pytest.approx(want, abs=1e-12)
    assert model.distributions().sum(1).tolist() == pytest.approx([1.0] * 4, abs=1e-12)
    with pytest.raises(ValueError, match="tokens must have shape"):
        model(torch.tensor([0]), torch.tensor([[0, 1]]))


def test_pair_weights_are_the_expectation_of_the_sampled_loss(problem):
    """Monte Carlo mean of make_pairs + cca_loss on i.i.d. batches = the exact expected loss."""
    beta, lam, uncond = 0.7, 4.0, 0.2
    reference = theory.TabularAR.from_distribution(problem.reference(), 3, 3, torch.float64)
    policy = theory.TabularAR.from_distribution(problem.reference(), 3, 3, torch.float64)
    with torch.no_grad():
        policy.logits.add_(
            torch.randn(
                policy.logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
            )
        )
    gains = policy.distributions().log() - problem.reference().log()
    g = torch.Generator().manual_seed(3)
    sequences, joint = problem.sequences(), problem.joint().reshape(-1)
    batch_means = []
    with torch.no_grad():
        for _ in range(40):
            index = torch.multinomial(joint, 8192, replacement=True, generator=g)
            labels, tokens = index // 27, sequences[index % 27]
            pairs = make_pairs(labels, null_class=3, uncond_ratio=uncond, generator=g)
            lp = [
                m(torch.cat([pairs.pos_labels, pairs.neg_labels]), torch.cat([tokens, tokens]))
                for m in (policy, reference)
            ]
            out = cca_loss(
                lp[0][:8192],
                lp[0][8192:],
                lp[1][:8192],
                lp[1][8192:],
                pairs.neg_is_positive,
                beta=beta,
                lam=lam,
            )
            batch_means.append(out.loss.item())
    sampled = float(np.mean(batch_means))
    stderr = float(np.std(batch_means) / math.sqrt(len(batch_means)))

    def exact(coincident: bool) -> float:
        weights = theory.pair_weights(
            problem, lam, uncond_ratio=uncond, coincident_as_positive=coincident
        )
        per_condition = theory.expected_cca_loss_per_condition(gains, weights, beta=beta, lam=lam)
        return per_condition.sum().item()

    assert abs(sampled - exact(True)) < 4 * stderr
    assert abs(sampled - exact(False)) > 20 * stderr  # the coincident rule matters here


@pytest.mark.parametrize("lam", [0.5, 10.0, 1000.0])
def test_pointwise_optimum_closed_forms(problem, lam):
    p_xc, p_x, p_c = problem.cond_probs, problem.marginal(), problem.class_probs[:, None]
    plain = theory.pointwise_optimum(problem, lam, coincident_as_positive=False)
    torch.testing.assert_close(plain, (p_xc / p_x).log() - math.log(lam), rtol=0, atol=1e-12)
    ruled = theory.pointwise_optimum(problem, lam)
    want = (p_xc * (1 + p_c) / (lam * (p_x - p_c * p_xc))).log()
    torch.testing.assert_close(ruled, want, rtol=0, atol=1e-12)
    for coincident, closed in [(False, plain), (True, ruled)]:
        weights = theory.pair_weights(problem, lam, coincident_as_positive=coincident)
        numeric = theory.fit_free_margins(weights)
        torch.testing.assert_close(numeric, closed, rtol=0, atol=1e-5)


def exact_loss_gradient(problem, probs, *, beta, lam, uncond_ratio=0.0):
    """Autograd gradient of the exact expected loss w.r.t. softmax logits at ``probs``."""
    logits = probs.log().clone().requires_grad_(True)
    weights = theory.pair_weights(problem, lam, uncond_ratio=uncond_ratio)
    gains = logits.log_softmax(1) - problem.reference().log()
    theory.expected_cca_loss_per_condition(gains, weights, beta=beta, lam=lam).sum().backward()
    return logits.grad


def exact_loss(problem, probs, *, beta, lam, uncond_ratio=0.0):
    weights = theory.pair_weights(problem, lam, uncond_ratio=uncond_ratio)
    gains = probs.log() - problem.reference()[: probs.shape[0]].log()
    cut = theory.PairWeights(weights.positive[: probs.shape[0]], weights.negative[: probs.shape[0]])
    return theory.expected_cca_loss_per_condition(gains, cut, beta=beta, lam=lam)


@pytest.mark.parametrize("beta,lam,uncond", [(1.0, 3.0, 0.1), (0.5, 10.0, 0.0), (0.25, 100.0, 0.0)])
def test_normalised_optimum_is_a_minimum(problem, beta, lam, uncond):
    optimum = theory.normalised_optimum(problem, beta=beta, lam=lam, uncond_ratio=uncond)
    torch.testing.assert_close(optimum.sum(1), torch.ones(4, dtype=torch.float64))
    grad = exact_loss_gradient(problem, optimum, beta=beta, lam=lam, uncond_ratio=uncond)
    assert grad.abs().max().item() < 1e-8  # stationary (autograd, independent of the solver)
    loss = exact_loss(problem, optimum, beta=beta, lam=lam, uncond_ratio=uncond)
    trained = slice(0, 4 if uncond else 3)  # the null row carries loss only when uncond > 0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # no nearby normalised model does better
        noise = 0.05 * torch.randn(optimum.shape, generator=g, dtype=torch.float64)
        nearby = (optimum.log() + noise).softmax(1)
        worse = exact_loss(problem, nearby, beta=beta, lam=lam, uncond_ratio=uncond) > loss
        assert worse[trained].all()
    cfg = torch.cat([problem.cfg_target(1 / beta), problem.marginal()[None]])
    for other in (problem.reference(), cfg):
        assert (exact_loss(problem, other, beta=beta, lam=lam, uncond_ratio=uncond) > loss)[
            :3
        ].all()
    # the null row: at p(x) when it is trained (uncond > 0) or untouched (uncond = 0)
    assert theory.total_variation(optimum[3], problem.marginal()).item() < 1e-6


def test_optimum_is_the_cfg_target_exactly_when_the_pointwise_optimum_is_normalised(problem):
    """The theorem: at lam_c the plain-NCE optimum of class c is p(x|c)^(1+s) / p(x)^s."""
    beta = 0.5
    lams = theory.normalising_lambda(problem, beta)
    target = problem.cfg_target(1 / beta)
    for c in range(3):
        optimum = theory.normalised_optimum(
            problem, beta=beta, lam=lams[c].item(), coincident_as_positive=False
        )
        assert theory.total_variation(optimum[c], target[c]).item() < 1e-6
        others = [theory.total_variation(optimum[k], target[k]).item() for k in range(3) if k != c]
        assert min(others) > 1e-3  # a single lambda cannot do it for every class here


def test_closest_cfg_scale_recovers_a_guided_distribution(problem):
    scale, tv = theory.closest_cfg_scale(problem, problem.cfg_target(2.7))
    assert scale == pytest.approx(2.7, abs=1e-3) and tv < 1e-4


def test_distances():
    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    assert theory.total_variation(p, q).item() == pytest.approx(0.5)
    assert theory.kl_divergence(p, q).item() == pytest.approx(math.log(2))


# ---- sampled fine-tuning with the project's own loss reaches the exact optimum ------------

BETA, LAM, UNCOND = 1.0, 3.0, 0.1
TOLERANCE = 0.025  # largest per-condition TV allowed; the sampling noise floor is ~0.01


@pytest.fixture(scope="module")
def exact_optimum(problem):
    return theory.normalised_optimum(problem, beta=BETA, lam=LAM, uncond_ratio=UNCOND)


def sampled(problem, objective):
    model = theory.finetune_sampled(
        problem,
        objective,
        beta=BETA,
        lam=LAM,
        uncond_ratio=UNCOND,
        steps=400,
        batch_size=2048,
        lr=0.05,
        seed=0,
    )
    with torch.no_grad():
        return model.distributions().double()


@pytest.mark.slow
def test_sampled_cca_training_reaches_the_exact_optimum(problem, exact_optimum):
    reached = sampled(problem, cca_loss)
    assert theory.total_variation(reached, exact_optimum).max().item() < TOLERANCE
    # ... and not the optimum of the loss without the coincident-label rule, nor the start
    plain = theory.normalised_optimum(
        problem, beta=BETA, lam=LAM, uncond_ratio=UNCOND, coincident_as_positive=False
    )
    assert theory.total_variation(reached[:3], plain[:3]).max().item() > 4 * TOLERANCE
    assert theory.total_variation(reached[:3], problem.cond_probs).min().item() > 4 * TOLERANCE


def flipped_sign_cca(policy_pos, policy_neg, ref_pos, ref_neg, neg_is_positive, **kwargs):
    """A CCA with the sign/weight rule inverted: what the test must catch."""
    return cca_loss(policy_pos, policy_neg, ref_pos, ref_neg, ~neg_is_positive, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("objective", [dpo_loss, flipped_sign_cca], ids=["dpo", "flipped"])
def test_a_wrong_loss_misses_the_optimum(problem, exact_optimum, objective):
    reached = sampled(problem, objective)
    assert theory.total_variation(reached, exact_optimum).max().item() > 2.5 * TOLERANCE


def test_theory_command_prints_the_table(capsys, tmp_path):
    out = tmp_path / "table.json"
    assert main(["theory", "--betas", "1", "0.5", "--lambdas", "1", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max |numeric - closed form|" in text and "TV(opt,CFG s)" in text
    rows = __import__("json").loads(out.read_text())
    assert [(r["beta"], r["lam"]) for r in rows] == list(itertools.product([1.0, 0.5], [1.0, 10.0]))
    assert main(["theory", "--betas", "0"]) == 2
    assert "argument --betas: must be in (0, 10000], got 0" in capsys.readouterr().err
    assert main(["theory", "--lambdas", "nan"]) == 2
    assert "argument --lambdas: must be a finite number, got nan" in capsys.readouterr().err
