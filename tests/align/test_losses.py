"""ccalign.align: the losses against float64 per-row transcriptions, and the negative pairs."""

from __future__ import annotations

import math

import pytest
import torch

from ccalign.align import (
    OBJECTIVES,
    ContrastPairs,
    alignment_loss,
    cca_loss,
    dpo_loss,
    make_pairs,
    roll_labels,
    unlearning_loss,
)


def log_sigmoid(z: float) -> float:
    """Stable float64 log(1 / (1 + exp(-z)))."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return math.exp(log_sigmoid(z))


def reference_cca(pp, pn, rp, rn, nip, beta, lam):
    """Loss and d loss / d policy_pos, d policy_neg, row by row in float64."""
    B, scale = len(pp), max(lam, 1.0)
    loss, g_pos, g_neg = 0.0, [], []
    for i in range(B):
        dp, dn = pp[i] - rp[i], pn[i] - rn[i]
        sign, w = (1.0, 1.0) if nip[i] else (-1.0, lam)
        loss += -log_sigmoid(beta * dp) - w * log_sigmoid(sign * beta * dn)
        g_pos.append(-beta * sigmoid(-beta * dp) / (B * scale))
        g_neg.append(-w * sign * beta * sigmoid(-sign * beta * dn) / (B * scale))
    return loss / (B * scale), g_pos, g_neg


def reference_dpo(pp, pn, rp, rn, nip, beta, lam):
    B = len(pp)
    loss, g_pos, g_neg = 0.0, [], []
    for i in range(B):
        z = beta * ((pp[i] - rp[i]) - (pn[i] - rn[i]))
        loss += -log_sigmoid(z)
        g_pos.append(-beta * sigmoid(-z) / B)
        g_neg.append(beta * sigmoid(-z) / B)
    return loss / B, g_pos, g_neg


def reference_unlearning(pp, pn, rp, rn, nip, beta, lam):
    B, scale = len(pp), max(lam, 1.0)
    loss, g_pos, g_neg = 0.0, [], []
    for i in range(B):
        signed_w = 1.0 if nip[i] else -lam
        loss += -(pp[i] - rp[i]) - signed_w * (pn[i] - rn[i])
        g_pos.append(-1.0 / (B * scale))
        g_neg.append(-signed_w / (B * scale))
    return loss / (B * scale), g_pos, g_neg


REFERENCES = {"cca": reference_cca, "dpo": reference_dpo, "unlearning": reference_unlearning}


def random_batch(B=64, seed=0, dtype=torch.float32, spread=30.0):
    """Sequence log-probs around -100 nats with policy/ref gaps of many nats, some rows flagged."""
    g = torch.Generator().manual_seed(seed)
    ref_pos = -100 + 10 * torch.randn(B, generator=g, dtype=torch.float64)
    ref_neg = -100 + 10 * torch.randn(B, generator=g, dtype=torch.float64)
    pol_pos = ref_pos + spread * torch.randn(B, generator=g, dtype=torch.float64)
    pol_neg = ref_neg + spread * torch.randn(B, generator=g, dtype=torch.float64)
    nip = torch.rand(B, generator=g) < 0.3
    nip[:2] = torch.tensor([True, False])
    return [t.to(dtype) for t in (pol_pos, pol_neg, ref_pos, ref_neg)] + [nip]


@pytest.mark.parametrize("name", ["cca", "dpo", "unlearning"])
@pytest.mark.parametrize("beta,lam", [(0.02, 1000.0), (0.5, 10.0), (1.0, 0.5), (0.1, 1.0)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_loss_and_gradients_match_float64_transcription(name, beta, lam, dtype, rtol):
    pol_pos, pol_neg, ref_pos, ref_neg, nip = random_batch(seed=int(beta * 100 + lam), dtype=dtype)
    pol_pos.requires_grad_(True)
    pol_neg.requires_grad_(True)
    out = OBJECTIVES[name](pol_pos, pol_neg, ref_pos, ref_neg, nip, beta=beta, lam=lam)
    out.loss.backward()
    rows = [t.detach().double().tolist() for t in (pol_pos, pol_neg, ref_pos, ref_neg)]
    want_loss, want_gpos, want_gneg = REFERENCES[name](*rows, nip.tolist(), beta, lam)
    assert out.loss.dtype == dtype and out.loss.dim() == 0
    assert out.loss.item() == pytest.approx(want_loss, rel=rtol, abs=1e-30)
    atol = rtol * max(abs(x) for x in want_gpos + want_gneg)
    torch.testing.assert_close(
        pol_pos.grad.double(), torch.tensor(want_gpos, dtype=torch.float64), rtol=rtol, atol=atol
    )
    torch.testing.assert_close(
        pol_neg.grad.double(), torch.tensor(want_gneg, dtype=torch.float64), rtol=rtol, atol=atol
    )


def test_cca_rows_flagged_positive_are_pulled_up_and_real_negatives_pushed_down():
    pol_pos, pol_neg, ref_pos, ref_neg, nip = random_batch(seed=3)
    pol_neg.requires_grad_(True)
    cca_loss(pol_pos, pol_neg, ref_pos, ref_neg, nip, beta=0.1, lam=5.0).loss.backward()
    assert (pol_neg.grad[nip] < 0).all()  # descent raises their likelihood
    assert (pol_neg.grad[~nip] > 0).all()  # descent lowers it


def test_cca_without_flags_is_the_sigmoid_loss_not_the_linear_one():
    """uncond_ratio 0 and no coincident labels: still -log s(bD+) - lam log s(-bD-)."""
    pp, pn, rp, rn = (torch.tensor([x]) for x in (-10.0, -12.0, -11.0, -9.0))
    out = cca_loss(pp, pn, rp, rn, torch.tensor([False]), beta=2.0, lam=3.0)
    want = (-log_sigmoid(2.0 * 1.0) - 3.0 * log_sigmoid(-2.0 * -3.0)) / 3.0
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    linear = (-(1.0) + 3.0 * -3.0) / 3.0
    assert abs(out.loss.item() - linear) > 1.0


def test_losses_are_stable_at_extreme_gains():
    pol_pos, pol_neg, ref_pos, ref_neg, nip = random_batch(seed=5, spread=1e4)
    for name in OBJECTIVES:
        pp = pol_pos.clone().requires_grad_(True)
        out = OBJECTIVES[name](pp, pol_neg, ref_pos, ref_neg, nip, beta=1.0, lam=100.0)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(pp.grad).all(), name


def test_bf16_inputs_stay_bf16():
    pol_pos, pol_neg, ref_pos, ref_neg, nip = random_batch(dtype=torch.bfloat16)
    for name in OBJECTIVES:
        out = OBJECTIVES[name](pol_pos, pol_neg, ref_pos, ref_neg, nip, beta=0.1, lam=10.0)
        assert out.loss.dtype == torch.bfloat16
        assert all(v.dtype == torch.bfloat16 for v in out.metrics.values())


@pytest.mark.parametrize("name", ["cca", "dpo", "unlearning"])
def test_metrics(name):
    pol_pos, pol_neg, ref_pos, ref_neg, nip = random_batch(seed=11, dtype=torch.float64)
    pol_pos.requires_grad_(True)
    beta = 0.3
    out = alignment_loss(name, pol_pos, pol_neg, ref_pos, ref_neg, nip, beta=beta, lam=7.0)
    d_pos = [a - b for a, b in zip(pol_pos.tolist(), ref_pos.tolist(), strict=True)]
    d_neg = [a - b for a, b in zip(pol_neg.tolist(), ref_neg.tolist(), strict=True)]
    B = len(d_pos)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert all(not v.requires_grad for v in out.metrics.values())
    assert m["loss"] == out.loss.item()
    assert m["d_pos"] == pytest.approx(sum(d_pos) / B, rel=1e-12)
    assert m["d_neg"] == pytest.approx(sum(d_neg) / B, rel=1e-12)
    margin = sum(beta * (a - b) for a, b in zip(d_pos, d_neg, strict=True)) / B
    assert m["reward_margin"] == pytest.approx(margin, rel=1e-12)
    assert m["reward_accuracy"] == sum(a > b for a, b in zip(d_pos, d_neg, strict=True)) / B
    assert m["neg_is_positive_fraction"] == sum(nip.tolist()) / B


def test_dpo_ignores_lam_and_unlearning_ignores_beta():
    batch = random_batch(seed=2)
    a = dpo_loss(*batch, beta=0.2, lam=1.0).loss
    b = dpo_loss(*batch, beta=0.2, lam=500.0).loss
    assert a.item() == b.item()
    c = unlearning_loss(*batch, beta=0.2, lam=5.0).loss
    d = unlearning_loss(*batch, beta=0.9, lam=5.0).loss
    assert c.item() == d.item()


def test_bad_inputs_raise_clear_errors():
    pol_pos, pol_neg, ref_pos, ref_neg, nip = random_batch(B=8)
    with pytest.raises(ValueError, match="unknown alignment objective 'ppo'.*cca, dpo, unlearning"):
        alignment_loss("ppo", pol_pos, pol_neg, ref_pos, ref_neg, nip, beta=0.1, lam=1.0)
    with pytest.raises(ValueError, match="ref_neg must be a 1-D"):
        cca_loss(pol_pos, pol_neg, ref_pos, ref_neg[:4], nip, beta=0.1, lam=1.0)
    with pytest.raises(ValueError, match="neg_is_positive must be a bool"):
        cca_loss(pol_pos, pol_neg, ref_pos, ref_neg, nip.float(), beta=0.1, lam=1.0)
    with pytest.raises(ValueError, match="beta must be positive"):
        cca_loss(pol_pos, pol_neg, ref_pos, ref_neg, nip, beta=0.0, lam=1.0)
    with pytest.raises(ValueError, match="lam"):
        cca_loss(pol_pos, pol_neg, ref_pos, ref_neg, nip, beta=0.1, lam=-1.0)


def test_roll_labels_takes_the_next_samples_label():
    labels = torch.tensor([4, 7, 1, 9])
    assert roll_labels(labels).tolist() == [7, 1, 9, 4]


def test_make_pairs_without_masking_flags_coincident_labels():
    labels = torch.tensor([3, 3, 5, 2, 3])
    pairs = make_pairs(labels, null_class=10, uncond_ratio=0.0)
    assert isinstance(pairs, ContrastPairs)
    assert pairs.pos_labels.tolist() == [3, 3, 5, 2, 3]
    assert pairs.neg_labels.tolist() == [3, 5, 2, 3, 3]
    assert pairs.neg_is_positive.tolist() == [True, False, False, False, True]
    assert pairs.pos_labels.dtype == pairs.neg_labels.dtype == torch.int64


def test_make_pairs_honours_an_explicit_mask():
    labels = torch.tensor([0, 1, 2, 3])
    mask = torch.tensor([False, True, False, True])
    pairs = make_pairs(labels, null_class=10, uncond_ratio=0.0, mask=mask)
    assert pairs.pos_labels.tolist() == [0, 10, 2, 10]
    assert pairs.neg_labels.tolist() == [1, 10, 3, 10]  # row 0 keeps row 1's original label
    assert pairs.neg_is_positive.tolist() == [False, True, False, True]
    assert labels.tolist() == [0, 1, 2, 3]  # input untouched


def test_make_pairs_masks_about_uncond_ratio_with_both_labels_null_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(20000) % 8  # consecutive labels differ, also across the wrap
    pairs = make_pairs(labels, null_class=8, uncond_ratio=0.1, generator=g)
    masked = pairs.pos_labels == 8
    assert torch.equal(masked, pairs.neg_labels == 8)
    assert abs(masked.float().mean().item() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20000)
    assert torch.equal(pairs.neg_is_positive, masked)
    again = make_pairs(labels, null_class=8, uncond_ratio=0.1, generator=g.manual_seed(0))
    assert torch.equal(again.pos_labels, pairs.pos_labels)


def test_make_pairs_rejects_bad_input():
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="null class"):
        make_pairs(torch.tensor([0, 5]), null_class=5)
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        make_pairs(labels, null_class=5, mask=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="uncond_ratio"):
        make_pairs(labels, null_class=5, uncond_ratio=1.5)
    with pytest.raises(ValueError, match="integer tensor"):
        make_pairs(labels.float(), null_class=5)
    with pytest.raises(ValueError, match="1-D"):
        roll_labels(labels[None])
