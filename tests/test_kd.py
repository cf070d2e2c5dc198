"""KD loss against hand computations (classification and regression)."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.api import Batch, ModelOutput, Problem
from kdbench.losses import soft_loss
from kdbench_plugins.methods.kd import KD, KDParams

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
Y = [1, 2]


def softmax(row: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def hand_kd(alpha: float, temp: float) -> tuple[float, float]:
    kl = 0.0
    for s, t in zip(S, T):
        ps, pt = softmax(s, temp), softmax(t, temp)
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    soft = kl / len(S) * temp**2
    ce = -sum(math.log(softmax(s, 1.0)[y]) for s, y in zip(S, Y)) / len(S)
    return alpha * soft + (1 - alpha) * ce, soft


@pytest.mark.parametrize("alpha,temp", [(0.5, 4.0), (0.9, 1.0), (0.0, 2.0)])
def test_kd_classification_matches_hand_computation(alpha: float, temp: float) -> None:
    method = KD(KDParams(alpha=alpha, temperature=temp), Problem("classification", 3))
    loss, parts = method.loss(_out(S), _out(T), labels(Y), None)  # type: ignore[arg-type]
    expected, soft = hand_kd(alpha, temp)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-6)


def test_kd_regression_uses_mse_to_teacher_and_labels() -> None:
    s, t, y = [0.5, -1.0, 2.0], [1.0, 0.0, 2.5], [0.0, 0.5, 3.0]
    method = KD(KDParams(alpha=0.3, temperature=7.0), Problem("regression", 1))
    loss, parts = method.loss(_out([[v] for v in s]), _out([[v] for v in t]), labels(y), None)  # type: ignore[arg-type]
    mse_t = sum((a - b) ** 2 for a, b in zip(s, t)) / 3  # 0.25 + 1 + 0.25 = 1.5 / 3
    mse_y = sum((a - b) ** 2 for a, b in zip(s, y)) / 3
    assert mse_t == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.3 * mse_t + 0.7 * mse_y, rel=1e-6)  # the temperature plays no part
    assert parts["hard"].item() == pytest.approx(mse_y, rel=1e-6)


def test_soft_loss_is_zero_for_equal_logits_and_scales_with_t_squared() -> None:
    x = torch.tensor(S)
    problem = Problem("classification", 3)
    assert soft_loss(x, x + 5.0, 3.0, problem).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    # KL(p_t || p_s) at T=1 for the first row, by hand
    ps, pt = softmax(S[0], 1.0), softmax(T[0], 1.0)
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt))
    assert soft_loss(torch.tensor(S[:1]), torch.tensor(T[:1]), 1.0, problem).item() == pytest.approx(kl, rel=1e-6)


def _out(rows: list[list[float]]) -> ModelOutput:
    return ModelOutput(logits=torch.tensor(rows))


def labels(values: list) -> Batch:
    """A batch that carries only what a loss reads: its labels (and indices)."""
    return Batch(inputs={}, labels=torch.tensor(values), index=torch.arange(len(values)))


def test_soft_loss_mse_is_the_softened_probability_mse_times_t_squared() -> None:
    method = KD(KDParams(alpha=1.0, temperature=2.0, soft_loss="mse"), Problem("classification", 3))
    loss, _ = method.loss(_out(S), _out(T), labels(Y), None)  # type: ignore[arg-type]
    hand = sum((a - b) ** 2 for s, t in zip(S, T) for a, b in zip(softmax(s, 2.0), softmax(t, 2.0))) / 6 * 4.0
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    kl, _ = KD(KDParams(alpha=1.0, temperature=2.0), Problem("classification", 3)).loss(_out(S), _out(T), labels(Y), None)  # type: ignore[arg-type]
    assert kl.item() != pytest.approx(hand, rel=1e-3)  # the old (only) soft term differs


def test_an_added_option_at_its_default_keeps_stored_kd_hashes() -> None:
    stored = {"alpha": 0.9, "temperature": 4.0}  # a kd row's params in results/mnist-cpu/store.sqlite
    assert KDParams.model_validate(stored).model_dump(mode="json") == stored
    assert KDParams(soft_loss="kl").model_dump(mode="json") == {"alpha": 0.5, "temperature": 4.0}
    assert KDParams(soft_loss="mse").model_dump(mode="json")["soft_loss"] == "mse"
    assert KDParams(**KDParams(soft_loss="mse").model_dump(mode="json")).soft_loss == "mse"


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_options_refuse_infinite_and_nan_values(value: float) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="finite number"):
        KDParams(temperature=value)
