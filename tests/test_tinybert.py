"""TinyBERT: attention, hidden, embedding and prediction terms against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.api import Batch, IncompatibleModelError, ModelOutput, Problem, SetupInfo
from kdbench_plugins.methods.tinybert import TinyBERT, TinyBERTParams, uniform_map
from support.helpers_models import make_ctx, text_batch, tiny_bert

RNG = np.random.default_rng(0)
B, L, HEADS = 2, 3, 2
S_ATT = [RNG.normal(size=(B, HEADS, L, L)) for _ in range(2)]
T_ATT = [RNG.normal(size=(B, HEADS, L, L)) for _ in range(4)]
S_HID = [RNG.normal(size=(B, L, 3)) for _ in range(3)]
T_HID = [RNG.normal(size=(B, L, 4)) for _ in range(5)]
S_LOG, T_LOG = RNG.normal(size=(B, 3)), RNG.normal(size=(B, 3))
W, BIAS = RNG.normal(size=(4, 3)), RNG.normal(size=4)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean())


def hand_terms(temp: float) -> dict[str, float]:
    proj = lambda h: h @ W.T + BIAS  # noqa: E731
    z_t, z_s = T_LOG / temp, S_LOG / temp
    p_t = np.exp(z_t) / np.exp(z_t).sum(1, keepdims=True)
    log_ps = z_s - np.log(np.exp(z_s).sum(1, keepdims=True))
    return {
        "att": mse(S_ATT[0], T_ATT[1]) + mse(S_ATT[1], T_ATT[3]),  # g(1) = 2, g(2) = 4
        "embedding": mse(proj(S_HID[0]), T_HID[0]),
        "hidden": mse(proj(S_HID[1]), T_HID[2]) + mse(proj(S_HID[2]), T_HID[4]),
        "pred": float(-(p_t * log_ps).mean()),  # soft_reduction mean: over batch x classes (official)
    }


def outputs() -> tuple[ModelOutput, ModelOutput, nn.Linear]:
    t = lambda xs: tuple(torch.tensor(x) for x in xs)  # noqa: E731
    s = ModelOutput(logits=torch.tensor(S_LOG), hidden_states=t(S_HID), attention_scores=t(S_ATT))
    te = ModelOutput(logits=torch.tensor(T_LOG), hidden_states=t(T_HID), attention_scores=t(T_ATT))
    proj = nn.Linear(3, 4).double()
    with torch.no_grad():
        proj.weight.copy_(torch.tensor(W))
        proj.bias.copy_(torch.tensor(BIAS))
    return s, te, proj


def test_uniform_map() -> None:
    assert uniform_map(4, 12) == [0, 3, 6, 9, 12]
    assert uniform_map(2, 4) == [0, 2, 4]
    assert uniform_map(4, 6) == [0, 1, 3, 4, 6]
    with pytest.raises(IncompatibleModelError):
        uniform_map(3, 2)


def test_joint_loss_matches_hand_computation() -> None:
    s, t, proj = outputs()
    p = TinyBERTParams(temperature=2.0, att_weight=0.5, hidden_weight=2.0, pred_weight=3.0)
    method = TinyBERT(p, Problem("classification", 3))
    loss, parts = method.loss(s, t, as_batch(torch.tensor([0, 1])), make_ctx(None, None, None, extra=proj))  # type: ignore[arg-type]
    hand = hand_terms(2.0)
    for k, v in hand.items():
        assert parts[k].item() == pytest.approx(v, rel=1e-6), k
    assert loss.item() == pytest.approx(0.5 * hand["att"] + 2.0 * (hand["embedding"] + hand["hidden"]) + 3.0 * hand["pred"], rel=1e-6)


def test_two_stage_schedule_switches_terms_inside_the_budget() -> None:
    s, t, proj = outputs()
    method = TinyBERT(TinyBERTParams(two_stage=True, stage1_fraction=0.5), Problem("classification", 3))
    hand = hand_terms(1.0)
    stage1, parts1 = method.loss(s, t, as_batch(torch.tensor([0, 1])), make_ctx(None, None, None, extra=proj, total_steps=10, step=5))  # type: ignore[arg-type]
    stage2, parts2 = method.loss(s, t, as_batch(torch.tensor([0, 1])), make_ctx(None, None, None, extra=proj, total_steps=10, step=6))  # type: ignore[arg-type]
    assert stage1.item() == pytest.approx(hand["att"] + hand["embedding"] + hand["hidden"], rel=1e-6)
    assert parts1["pred"].item() == 0.0
    assert stage2.item() == pytest.approx(hand["pred"], rel=1e-6)
    assert parts2["att"].item() == parts2["hidden"].item() == 0.0


def test_soft_cross_entropy_is_the_official_mean_by_default_and_sum_on_request() -> None:
    s, t, proj = outputs()
    ctx = make_ctx(None, None, None, extra=proj)  # type: ignore[arg-type]
    only_pred = {"att_weight": 0.0, "hidden_weight": 0.0, "temperature": 2.0}
    mean, _ = TinyBERT(TinyBERTParams(**only_pred), Problem("classification", 3)).loss(s, t, as_batch(torch.tensor([0, 1])), ctx)
    summed, _ = TinyBERT(TinyBERTParams(**only_pred, soft_reduction="sum"), Problem("classification", 3)).loss(s, t, as_batch(torch.tensor([0, 1])), ctx)
    # official: (-softmax(t / T) * log_softmax(s / T)).mean() over batch x classes
    official = (-torch.softmax(t.logits / 2.0, -1) * torch.log_softmax(s.logits / 2.0, -1)).mean()
    assert mean.item() == pytest.approx(official.item(), rel=1e-6)
    assert summed.item() == pytest.approx(3 * official.item(), rel=1e-6)  # version 1: C times larger
    assert TinyBERT.version == 2


def test_regression_prediction_term_teacher_or_labels() -> None:
    s_log, t_log, y = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]]), torch.tensor([0.0, 3.0])
    s = ModelOutput(logits=s_log)
    t = ModelOutput(logits=t_log)
    for target, expected in (("teacher", (1 + 4) / 2), ("labels", (1 + 0) / 2)):
        method = TinyBERT(TinyBERTParams(att_weight=0, hidden_weight=0, regression_pred=target), Problem("regression", 1))
        loss, _ = method.loss(s, t, as_batch(y), make_ctx(None, None, None, extra=nn.Identity()))  # type: ignore[arg-type]
        assert loss.item() == pytest.approx(expected)


def test_projection_is_an_extra_module_and_heads_must_match() -> None:
    student, teacher = tiny_bert(layers=1, hidden=8, heads=2), tiny_bert(layers=2, hidden=16, heads=2)
    method = TinyBERT(TinyBERTParams(), Problem("classification", 2))
    method.check_models(student, teacher)
    batch = text_batch()
    proj = method.extra_modules(student, teacher, SetupInfo(sample=batch, train_size=4, device=torch.device("cpu")))
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (8, 16)
    # a real forward: the hidden term goes through the projection and gives it a gradient
    proj = proj.double()
    ctx = make_ctx(student, teacher, None, extra=proj)  # type: ignore[arg-type]
    s = student(batch.inputs, need=method.student_needs)
    t = ctx.teacher_forward(batch, method.teacher_needs)
    loss, parts = method.loss(s, t, batch, ctx)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    expected_emb = torch.nn.functional.mse_loss(proj(s.hidden_states[0]), t.hidden_states[0]).item()
    assert parts["embedding"].item() == pytest.approx(expected_emb, rel=1e-6)
    assert parts["att"].item() == pytest.approx(torch.nn.functional.mse_loss(s.attention_scores[0], t.attention_scores[1]).item(), rel=1e-6)

    other = tiny_bert(layers=2, hidden=16, heads=4)
    with pytest.raises(IncompatibleModelError, match="2 heads and the teacher 4"):
        method.check_models(student, other)
    TinyBERT(TinyBERTParams(att_weight=0), Problem("classification", 2)).check_models(student, other)


def as_batch(labels: torch.Tensor) -> Batch:
    """The batch a loss receives, reduced to what these losses read: labels (and indices)."""
    return Batch(inputs={}, labels=labels, index=torch.arange(labels.shape[0]))
