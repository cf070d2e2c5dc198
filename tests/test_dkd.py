"""DKD: TCKD/NCKD from explicit probabilities, the KD decomposition, the warm-up, a training step."""

from __future__ import annotations

import pytest
import torch
from support.vision_test_models import LogitsOnly, TinyCNN, fixed_batch, hand_ce, hand_kd, make_ctx

from kdbench.api import Batch, IncompatibleModelError, ModelOutput, Problem
from kdbench.registry import Registry, make_plugin_manager
from kdbench_plugins.methods.dkd import DKD, DKDParams

PROBLEM = Problem("classification", 4)
S = torch.tensor([[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5], [-2.0, 3.0, 0.5, 0.0]], dtype=torch.float64)
T_ = torch.tensor([[0.5, 0.5, 3.0, -1.0], [1.0, -0.3, 0.0, 2.5], [0.0, 2.0, 1.5, -0.5]], dtype=torch.float64)
Y = torch.tensor([2, 0, 1])


def hand_parts(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temp: float) -> tuple[float, float]:
    """TCKD and NCKD per the paper's definitions, from explicit probabilities and loops."""
    tckd = nckd = 0.0
    for i in range(s.shape[0]):
        ps = [v.item() for v in (s[i] / temp).exp() / (s[i] / temp).exp().sum()]
        pt = [v.item() for v in (t[i] / temp).exp() / (t[i] / temp).exp().sum()]
        g = int(y[i])
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        tckd += sum(bt[k] * torch.tensor(bt[k] / bs[k]).log().item() for k in range(2))
        others = [j for j in range(len(ps)) if j != g]
        qs = [ps[j] / sum(ps[k] for k in others) for j in others]
        qt = [pt[j] / sum(pt[k] for k in others) for j in others]
        nckd += sum(qt[k] * torch.tensor(qt[k] / qs[k]).log().item() for k in range(len(others)))
    n = s.shape[0]
    return temp**2 * tckd / n, temp**2 * nckd / n


def test_loss_matches_explicit_probabilities_after_warmup():
    method = DKD(DKDParams(gamma=0.6, alpha=1.5, beta=8.0, temperature=4.0, warmup_fraction=0.1), PROBLEM)
    ctx = make_ctx(TinyCNN(num_classes=4), TinyCNN(num_classes=4), total_steps=100, step=50)
    total, parts = method.loss(ModelOutput(S), ModelOutput(T_), as_batch(Y), ctx)
    tckd, nckd = hand_parts(S, T_, Y, 4.0)
    ce = hand_ce(S, Y).item()
    assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert parts["dkd_weight"].item() == 1.0
    assert total.item() == pytest.approx(0.6 * ce + 1.5 * tckd + 8.0 * nckd, rel=1e-5)


def test_kd_decomposes_into_tckd_plus_weighted_nckd():
    # the paper's Eq. (1): KD = TCKD + (1 - p_t,y) NCKD, per example
    for i in range(3):
        s, t, y = S[i : i + 1], T_[i : i + 1], Y[i : i + 1]
        tckd, nckd = hand_parts(s, t, y, 2.0)
        p_t = ((t / 2.0).softmax(dim=1))[0, y[0]].item()
        method = DKD(DKDParams(gamma=0.0, alpha=1.0, beta=1 - p_t, temperature=2.0, warmup_fraction=0.0), PROBLEM)
        total, _ = method.loss(ModelOutput(s), ModelOutput(t), as_batch(y), make_ctx(TinyCNN(num_classes=4), None))
        assert total.item() == pytest.approx(hand_kd(s, t, 2.0).item(), rel=1e-5)
        assert total.item() == pytest.approx(tckd + (1 - p_t) * nckd, rel=1e-5)


@pytest.mark.parametrize(("step", "weight"), [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (150, 1.0)])
def test_warmup_ramps_the_dkd_weight_linearly(step, weight):
    # 240 steps with warmup 20/240: the ramp lasts 20 steps, like mdistiller's 20 of 240 epochs
    method = DKD(DKDParams(gamma=1.0), PROBLEM)
    ctx = make_ctx(TinyCNN(num_classes=4), None, total_steps=240, step=step)
    total, parts = method.loss(ModelOutput(S), ModelOutput(T_), as_batch(Y), ctx)
    tckd, nckd = hand_parts(S, T_, Y, 4.0)
    assert parts["dkd_weight"].item() == pytest.approx(weight)
    assert total.item() == pytest.approx(hand_ce(S, Y).item() + weight * (1.0 * tckd + 8.0 * nckd), rel=1e-5)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    student, teacher = TinyCNN(4, (4, 8, 8)), TinyCNN(6, (8, 12, 16)).eval()
    batch = fixed_batch()
    method = DKD(DKDParams(), Problem("classification", 5))
    method.check_models(student, teacher)
    ctx = make_ctx(student, teacher, lr=0.02, total_steps=8, step=7)  # past the warm-up: a fixed objective
    losses = [method.train_step(ctx, batch)["loss"].item() for _ in range(8)]
    assert losses[-1] < 0.85 * losses[0]


def test_refuses_regression_and_models_without_logits():
    with pytest.raises(IncompatibleModelError, match="classification task, not regression"):
        DKD(DKDParams(), Problem("regression", 1)).check_models(TinyCNN(), TinyCNN())
    DKD(DKDParams(), PROBLEM).check_models(LogitsOnly(), LogitsOnly())  # logits are all it needs
    assert DKD(DKDParams(), PROBLEM).can_share_teacher_outputs


def test_registered_through_the_hook():
    pm, broken = make_plugin_manager(extra_plugins=["kdbench_plugins.methods.dkd"])
    assert Registry(pm, broken).method("dkd") is DKD
    assert DKDParams() == DKDParams(gamma=1.0, alpha=1.0, beta=8.0, temperature=4.0, warmup_fraction=20 / 240)


def as_batch(labels: torch.Tensor) -> Batch:
    """The batch a loss receives, reduced to what these losses read: labels (and indices)."""
    return Batch(inputs={}, labels=labels, index=torch.arange(labels.shape[0]))
