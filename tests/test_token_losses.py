"""Token-level divergences (kdbench.token_losses) against hand computations on tiny
distributions, and the generalised JSD against TRL's own function where trl installs."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench import token_losses as tl

LN2 = math.log(2)
P_T = [0.8, 0.1, 0.1]
P_S = [0.4, 0.4, 0.2]


def logits(*rows: list[float]) -> torch.Tensor:
    """(1, len(rows), V) logits whose softmax is each row exactly."""
    return torch.tensor([[[math.log(p) for p in row] for row in rows]], dtype=torch.float64)


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def mix(a: list[float], b: list[float], w: float) -> list[float]:
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def test_forward_and_reverse_kl_by_hand():
    s, t = logits(P_S), logits(P_T)
    # KL(p_t || p_s) = .8 ln 2 + .1 ln(1/4) + .1 ln(1/2) = 0.5 ln 2; the reverse 0.6 ln 2
    assert tl.forward_kl(s, t).item() == pytest.approx(0.5 * LN2, abs=1e-12)
    assert tl.reverse_kl(s, t).item() == pytest.approx(0.6 * LN2, abs=1e-12)


def test_mask_averages_over_counted_positions_only():
    s, t = logits(P_S, P_T, P_S), logits(P_T, P_S, P_S)
    mask = torch.tensor([[True, False, True]])
    # positions 0 (0.5 ln 2) and 2 (0): mean 0.25 ln 2; the masked position 1 (0.6 ln 2) left out
    assert tl.forward_kl(s, t, mask).item() == pytest.approx(0.25 * LN2, abs=1e-12)
    per = tl.forward_kl(s, t, mask, reduce=False)
    assert per.shape == (1, 3) and per[0, 1].item() == pytest.approx(0.6 * LN2, abs=1e-12)
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert tl.forward_kl(s, t, none).item() == 0.0


def test_temperature_divides_logits_without_t_squared():
    s, t = logits(P_S), logits(P_T)
    ps = torch.softmax(s / 2, -1)[0, 0].tolist()
    pt = torch.softmax(t / 2, -1)[0, 0].tolist()
    assert tl.forward_kl(s, t, temperature=2.0).item() == pytest.approx(kl(pt, ps), abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_by_hand(beta):
    m = mix(P_T, P_S, beta)
    want = beta * kl(P_T, m) + (1 - beta) * kl(P_S, m)
    assert tl.generalized_jsd(logits(P_S), logits(P_T), beta=beta).item() == pytest.approx(want, abs=1e-12)


def test_generalized_jsd_endpoints_are_the_two_kls():
    s, t = logits(P_S), logits(P_T)
    assert tl.generalized_jsd(s, t, beta=0.0).item() == pytest.approx(0.5 * LN2, abs=1e-12)
    assert tl.generalized_jsd(s, t, beta=1.0).item() == pytest.approx(0.6 * LN2, abs=1e-12)
    # symmetric at 0.5; zero for identical distributions
    assert tl.generalized_jsd(s, t, beta=0.5).item() == pytest.approx(tl.generalized_jsd(t, s, beta=0.5).item(), abs=1e-12)
    assert tl.generalized_jsd(s, s, beta=0.3).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        tl.generalized_jsd(s, t, beta=1.5)


def test_skew_divergences_by_hand():
    s, t = logits(P_S), logits(P_T)
    assert tl.skew_kl(s, t, alpha=0.1).item() == pytest.approx(kl(P_T, mix(P_T, P_S, 0.1)), abs=1e-12)
    assert tl.skew_reverse_kl(s, t, alpha=0.1).item() == pytest.approx(kl(P_S, mix(P_S, P_T, 0.1)), abs=1e-12)
    assert tl.skew_kl(s, t, alpha=0.0).item() == pytest.approx(0.5 * LN2, abs=1e-12)
    assert tl.skew_reverse_kl(s, t, alpha=0.0).item() == pytest.approx(0.6 * LN2, abs=1e-12)


def test_taid_target_and_its_gradient():
    s = logits(P_S).requires_grad_(True)
    t = logits(P_T)
    target = tl.taid_target(s, t, 0.25).exp()[0, 0].tolist()
    mixed = [0.75 * math.log(a) + 0.25 * math.log(b) for a, b in zip(P_S, P_T)]
    z = sum(math.exp(x) for x in mixed)
    assert target == pytest.approx([math.exp(x) / z for x in mixed], abs=1e-12)
    loss = tl.taid_loss(s, t, 0.25)
    assert loss.item() == pytest.approx(kl(target, P_S), abs=1e-12)
    loss.backward()
    # d KL(q || softmax(s)) / ds = softmax(s) - q, the target held fixed (stop-gradient)
    assert s.grad[0, 0].tolist() == pytest.approx([a - b for a, b in zip(P_S, target)], abs=1e-12)
    assert tl.taid_loss(s, t, 1.0).item() == pytest.approx(0.5 * LN2, abs=1e-12)


def test_taid_schedule_by_hand():
    sch = tl.TAIDSchedule(t_start=0.4, alpha=0.1, beta=0.5)
    assert sch.update(2.0, 0, 10) == 0.4  # first step: records the loss only
    # change (2 - 1) / 2 = 0.5; m = 0.5 * 0 + 0.5 * 0.5 = 0.25; step up 0.1 sigmoid(0.25) (1 - 0.4)
    up = 0.1 / (1 + math.exp(-0.25)) * 0.6
    assert sch.update(1.0, 1, 10) == pytest.approx(max(0.4 + 0.6 * 0.1, 0.4 + up), abs=1e-12)
    # the linear floor wins when the loss stops falling
    assert sch.update(1.0, 9, 10) == pytest.approx(0.4 + 0.6 * 0.9, abs=1e-12)
    assert sch.update(0.5, 10, 10) == 1.0
    with pytest.raises(ValueError):
        tl.TAIDSchedule(t_start=1.0)


def test_response_nll_by_hand():
    z = logits(P_S, P_T)
    targets = torch.tensor([[1, -100]])
    assert tl.response_nll(z, targets, targets >= 0).item() == pytest.approx(-math.log(0.4), abs=1e-12)
    assert tl.response_nll(z, torch.tensor([[1, 0]])).item() == pytest.approx(-(math.log(0.4) + math.log(0.8)) / 2, abs=1e-12)


def test_topk_cache_renormalises_and_keeps_forward_kl_finite():
    t = logits([0.5, 0.3, 0.15, 0.05])
    values, idx = tl.topk_log_probs(t, 2)
    assert idx.tolist() == [[[0, 1]]]
    assert values.exp()[0, 0].tolist() == pytest.approx([0.5, 0.3], abs=1e-12)  # full-vocabulary probabilities
    dense = tl.dense_topk_logits(values, idx, 4)
    assert torch.softmax(dense, -1)[0, 0].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=1e-12)
    s = logits([0.25, 0.25, 0.25, 0.25]).requires_grad_(True)
    loss = tl.forward_kl(s, dense)
    assert loss.item() == pytest.approx(kl([0.625, 0.375, 0, 0], [0.25] * 4), abs=1e-12)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert torch.isinf(tl.reverse_kl(s.detach(), dense))


def test_topk_ties_break_to_the_lower_token():
    _, idx = tl.topk_log_probs(torch.zeros(1, 5), 3)
    assert idx.tolist() == [[0, 1, 2]]


def test_mismatched_vocabularies_are_a_named_error():
    with pytest.raises(tl.TokenShapeError, match="same vocabulary"):
        tl.forward_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))
    with pytest.raises(tl.TokenShapeError, match="mask"):
        tl.forward_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 3))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_generalized_jsd_equals_trl(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="trl is not installed (pip install 'kdbench[peers]')")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 11, generator=g) * 3, torch.randn(3, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    ours = tl.generalized_jsd(s, t, labels != -100, beta=beta, temperature=temperature)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
