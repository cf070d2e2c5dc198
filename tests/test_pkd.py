"""PKD: layer maps for any depth and the patient loss against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.api import Batch, IncompatibleModelError, ModelOutput, Problem
from kdbench_plugins.methods.pkd import PKD, PKDParams, layer_map
from support.helpers_models import text_batch, tiny_bert, tiny_cnn


def test_layer_maps_of_the_paper_and_other_depths() -> None:
    assert layer_map(6, 12, "skip") == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert layer_map(6, 12, "last") == [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]
    assert layer_map(3, 12, "skip") == [(1, 4), (2, 8)]
    assert layer_map(4, 12, "last") == [(1, 9), (2, 10), (3, 11)]
    assert layer_map(4, 6, "skip") == [(1, 1), (2, 3), (3, 4)]  # floor(i * 6 / 4)
    assert layer_map(3, 3, "skip") == layer_map(3, 3, "last") == [(1, 1), (2, 2)]
    assert layer_map(1, 12, "skip") == []
    with pytest.raises(IncompatibleModelError, match="student has 4 layers and the teacher only 2"):
        layer_map(4, 2, "skip")


def _states(rng: np.random.Generator, layers: int, width: int) -> list[np.ndarray]:
    return [rng.normal(size=(2, 3, width)) for _ in range(layers + 1)]


def _hand_patience(s: list[np.ndarray], t: list[np.ndarray], pairs: list[tuple[int, int]]) -> list[float]:
    out = []
    for i, j in pairs:
        u = s[i][:, 0] / np.linalg.norm(s[i][:, 0], axis=1, keepdims=True)
        v = t[j][:, 0] / np.linalg.norm(t[j][:, 0], axis=1, keepdims=True)
        out.append(float(((u - v) ** 2).mean()))
    return out


@pytest.mark.parametrize("kind,pairs", [("skip", [(1, 2), (2, 4)]), ("last", [(1, 4), (2, 5)])])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pkd_loss_six_to_three_layers_matches_hand_computation(kind: str, pairs: list, reduction: str) -> None:
    rng = np.random.default_rng(0)
    s_h, t_h = _states(rng, 3, 4), _states(rng, 6, 4)
    s_logits, t_logits = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    labels = np.array([0, 2])
    p = PKDParams(alpha=0.7, beta=500.0, temperature=10.0, layer_map=kind, layer_reduction=reduction)
    method = PKD(p, Problem("classification", 3))
    tensors = lambda xs: tuple(torch.tensor(x) for x in xs)  # noqa: E731
    loss, parts = method.loss(ModelOutput(logits=torch.tensor(s_logits), hidden_states=tensors(s_h)),
                              ModelOutput(logits=torch.tensor(t_logits), hidden_states=tensors(t_h)), as_batch(torch.tensor(labels)), None)  # type: ignore[arg-type]

    terms = _hand_patience(s_h, t_h, pairs)
    pt = np.mean(terms) if reduction == "mean" else np.sum(terms)
    T = 10.0
    log_ps = s_logits / T - np.log(np.exp(s_logits / T).sum(1, keepdims=True))
    log_pt = t_logits / T - np.log(np.exp(t_logits / T).sum(1, keepdims=True))
    soft = (np.exp(log_pt) * (log_pt - log_ps)).sum(1).mean() * T**2 / 3  # soft_reduction mean: / (batch x classes)
    log_p1 = s_logits - np.log(np.exp(s_logits).sum(1, keepdims=True))
    ce = -log_p1[np.arange(2), labels].mean()
    assert parts["patience"].item() == pytest.approx(pt, rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * soft + 0.3 * ce + 500.0 * pt, rel=1e-5)


@pytest.mark.filterwarnings("ignore:reduction")  # torch's note that KLDivLoss "mean" is not the KL: that is the point
@pytest.mark.parametrize("classes", [2, 3])
def test_pkd_soft_term_is_the_official_kldivloss_mean_by_default(classes: int) -> None:
    g = torch.Generator().manual_seed(classes)
    s, t = torch.randn(5, classes, generator=g, dtype=torch.float64), torch.randn(5, classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (5,), generator=g)
    T = 10.0
    official = torch.nn.KLDivLoss(reduction="mean")(torch.log_softmax(s / T, 1), torch.softmax(t / T, 1)) * T * T
    problem = Problem("classification", classes)
    h = (torch.randn(5, 2, 4, generator=g, dtype=torch.float64),) * 3  # two layers; identical states: no patience term
    s_out, t_out = ModelOutput(logits=s, hidden_states=h), ModelOutput(logits=t, hidden_states=h)
    _, parts = PKD(PKDParams(), problem).loss(s_out, t_out, as_batch(y), None)  # type: ignore[arg-type]
    assert parts["soft"].item() == pytest.approx(official.item(), rel=1e-5)
    _, old = PKD(PKDParams(soft_reduction="batchmean"), problem).loss(s_out, t_out, as_batch(y), None)  # type: ignore[arg-type]
    assert old["soft"].item() == pytest.approx(classes * official.item(), rel=1e-5)  # version 1: C times larger
    assert PKD.version == 2


def test_pkd_regression_and_identical_states_give_zero_patience() -> None:
    rng = np.random.default_rng(1)
    h = tuple(torch.tensor(x) for x in _states(rng, 2, 4))
    scaled = tuple(3.0 * x for x in h)  # normalisation removes the scale
    method = PKD(PKDParams(alpha=0.5, beta=10.0), Problem("regression", 1))
    s, t, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [2.0]]), torch.tensor([1.0, 4.0])
    loss, parts = method.loss(ModelOutput(logits=s, hidden_states=h), ModelOutput(logits=t, hidden_states=scaled), as_batch(y), None)  # type: ignore[arg-type]
    assert parts["patience"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(0.5 * 0.5 + 0.5 * 2.0, rel=1e-6)  # MSE(s,t) = 0.5, MSE(s,y) = 2


def test_pkd_refuses_cnns_and_a_deeper_student() -> None:
    method = PKD(PKDParams(), Problem("classification", 2))
    with pytest.raises(IncompatibleModelError, match="hidden_states"):
        method.check_models(tiny_cnn(), tiny_bert())
    with pytest.raises(IncompatibleModelError, match="student has 2 layers"):
        method.check_models(tiny_bert(layers=2), tiny_bert(layers=1))
    method.check_models(tiny_bert(layers=2), tiny_bert(layers=4))


def test_pkd_on_real_bert_outputs_uses_cls_of_mapped_layers() -> None:
    student, teacher = tiny_bert(layers=2, seed=1), tiny_bert(layers=4, seed=2)
    batch = text_batch()
    need = PKD.student_needs
    s, t = student(batch.inputs, need=need), teacher(batch.inputs, need=need)
    method = PKD(PKDParams(layer_map="skip"), Problem("classification", 2))
    _, parts = method.loss(s, t, batch, None)  # type: ignore[arg-type]
    expected = _hand_patience([x.detach().numpy() for x in s.hidden_states], [x.detach().numpy() for x in t.hidden_states], [(1, 2)])
    assert parts["patience"].item() == pytest.approx(expected[0], rel=1e-5)


def test_pkd_refuses_different_widths_unless_beta_is_zero() -> None:
    student, teacher = tiny_bert(layers=2, hidden=8), tiny_bert(layers=4, hidden=16)
    with pytest.raises(IncompatibleModelError, match="student is 8 wide and the teacher 16"):
        PKD(PKDParams(), Problem("classification", 2)).check_models(student, teacher)
    PKD(PKDParams(beta=0.0), Problem("classification", 2)).check_models(student, teacher)


def as_batch(labels: torch.Tensor) -> Batch:
    """The batch a loss receives, reduced to what these losses read: labels (and indices)."""
    return Batch(inputs={}, labels=labels, index=torch.arange(labels.shape[0]))


def test_pkd_refuses_a_one_layer_student_whose_patient_term_would_be_zero() -> None:
    """nlp-cpu's second design (results at e8410e9) ran pkd with a 1-layer student: no layer to map, so its runs were kd's to the
    last digit on regression. With a patient term asked for (beta > 0) that is refused, by name."""
    with pytest.raises(IncompatibleModelError, match="1-layer student has none"):
        PKD(PKDParams(beta=500.0), Problem("classification", 2)).check_models(tiny_bert(layers=1), tiny_bert(layers=4))
    PKD(PKDParams(beta=0.0), Problem("classification", 2)).check_models(tiny_bert(layers=1), tiny_bert(layers=4))  # asked for no term
    from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams

    with pytest.raises(IncompatibleModelError, match="1-layer student has none"):  # and so is MetaDistil wrapping pkd
        MetaDistil(MetaDistilParams(inner="pkd", beta=100.0), Problem("classification", 2)).check_models(tiny_bert(layers=1), tiny_bert(layers=4))
