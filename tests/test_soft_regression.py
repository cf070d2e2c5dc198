"""The regression soft term, both ways: ``regression_soft: logits`` (kdbench's default, the
official MetaDistil ``--logits_mse``) is ``MSE(s, t)``; ``probabilities`` (the official GLUE
default on STS-B) is the probability MSE of a one-output softmax: 0, with zero gradient, so
KD and PKD learn from the labels (and PKD's hidden states) only, and a MetaDistil teacher
gets its meta-gradient through the PKD term only."""

from __future__ import annotations

import pytest
import torch

from kdbench.api import Batch, ModelOutput, Problem
from kdbench.losses import soft_loss
from kdbench_plugins.methods.kd import KD, KDParams
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from kdbench_plugins.methods.pkd import PKD, PKDParams
from support.helpers_models import make_ctx, text_batch, tiny_bert
from test_metadistil import registry  # noqa: F401 (registry: the module fixture)

REG = Problem("regression", 1)
S, T, Y = [[0.5], [2.0], [-1.0]], [[1.5], [0.0], [-1.0]], [1.0, 1.0, 0.0]


def test_regression_soft_terms_by_hand() -> None:
    s, t = torch.tensor(S, requires_grad=True), torch.tensor(T)
    logits = soft_loss(s, t, 5.0, REG, kind="mse")
    assert logits.item() == pytest.approx((1.0 + 4.0 + 0.0) / 3)  # no T^2 on the logit MSE
    probs = soft_loss(s, t, 5.0, REG, kind="mse", regression="probabilities")
    assert probs.item() == 0.0
    (grad,) = torch.autograd.grad(probs, s)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("cls, params", [(KD, KDParams), (PKD, PKDParams)])
def test_kd_and_pkd_read_regression_soft(cls, params) -> None:
    one_layer = (torch.zeros(3, 2, 4), torch.ones(3, 2, 4))  # a 1-layer student: no patience pair, PT = 0
    s, t = ModelOutput(logits=torch.tensor(S), hidden_states=one_layer), ModelOutput(logits=torch.tensor(T), hidden_states=one_layer)
    batch = Batch(inputs={}, labels=torch.tensor(Y), index=torch.arange(3))
    hard = ((0.5 - 1) ** 2 + (2 - 1) ** 2 + 1.0) / 3
    extra = {"beta": 0.0} if cls is PKD else {}
    for mode, soft in (("logits", 5 / 3), ("probabilities", 0.0)):
        method = cls(params(alpha=0.3, temperature=5.0, soft_loss="mse", regression_soft=mode, **extra), REG)
        loss, parts = method.loss(s, t, batch, None)  # type: ignore[arg-type]
        assert loss.item() == pytest.approx(0.3 * soft + 0.7 * hard)
        assert parts["soft"].item() == pytest.approx(soft)
    assert params().model_dump(mode="json") == params(regression_soft="logits").model_dump(mode="json")  # stored hashes kept


def test_metadistil_teacher_learns_only_through_pkd_under_the_official_soft_term() -> None:
    student, teacher = tiny_bert(layers=2, seed=1, problem=REG), tiny_bert(layers=4, seed=2, problem=REG)
    teacher.eval().requires_grad_(True)
    batch, quiz = text_batch(seed=3), text_batch(seed=4)
    batch.labels, quiz.labels = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    norms = {}
    for mode in ("logits", "probabilities"):
        for beta in (0.0, 100.0):
            method = MetaDistil(MetaDistilParams(inner="pkd", alpha=0.5, beta=beta, temperature=5.0, soft_loss="mse", regression_soft=mode,
                                                 virtual_lr=0.5, teacher_lr=0.1), REG)
            ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), quiz=quiz, problem=REG)
            method.setup(ctx)
            grads, _, _ = method.meta_gradient(ctx, batch)
            norms[mode, beta] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    assert norms["probabilities", 0.0] == 0.0  # no term reads the teacher: no meta-gradient at all
    assert norms["probabilities", 100.0] > 0 and norms["logits", 0.0] > 0
    assert norms["logits", 100.0] != pytest.approx(norms["probabilities", 100.0])


def test_regression_meta_gradient_sign_and_scale_against_the_unrolled_quiz_loss() -> None:
    """Issue 28 item 5: the teacher's meta-gradient for regression (MSE quiz loss, as the
    official MD:nlp/functional_forward_bert.py:27-29) is d/dT of MSE(S'(T)(x_q), y_q) with
    S'(T) = S - eta grad_S L_kd(S, T): checked against autograd through the unrolled step, and
    a small teacher step along minus it lowers the unrolled quiz loss (the sign)."""
    from support.helpers_models import LinearNet

    torch.manual_seed(0)
    student, teacher = LinearNet(3, 1).double(), LinearNet(3, 1).double().eval().requires_grad_(True)
    x, xq = torch.randn(6, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    y, yq = torch.randn(6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    batch, quiz = Batch(inputs={"x": x}, labels=y, index=torch.arange(6)), Batch(inputs={"x": xq}, labels=yq, index=torch.arange(5))
    eta, alpha = 0.7, 0.4
    method = MetaDistil(MetaDistilParams(inner="kd", alpha=alpha, virtual_lr=eta, teacher_lr=0.1), REG)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), quiz=quiz, problem=REG)
    method.setup(ctx)
    grads, _, quiz_loss = method.meta_gradient(ctx, batch)

    def unrolled(tw: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        sw, sb = (p.detach().clone().requires_grad_() for p in student.parameters())
        s, t = (x @ sw.T + sb).squeeze(-1), (x @ tw.T + tb).squeeze(-1)
        inner = alpha * ((s - t) ** 2).mean() + (1 - alpha) * ((s - y) ** 2).mean()
        gw, gb = torch.autograd.grad(inner, [sw, sb], create_graph=True)
        return ((((xq @ (sw - eta * gw).T) + (sb - eta * gb)).squeeze(-1) - yq) ** 2).mean()

    tw, tb = (p.detach().clone().requires_grad_() for p in teacher.parameters())
    loss = unrolled(tw, tb)
    ref = torch.autograd.grad(loss, [tw, tb])
    assert quiz_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    step = 1e-3
    moved = unrolled((tw - step * ref[0]).detach(), (tb - step * ref[1]).detach())
    assert moved.item() < loss.item()  # minus the meta-gradient lowers the quiz loss of S'
