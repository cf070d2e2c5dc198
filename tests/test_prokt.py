"""ProKT: both objectives by hand, one exact step, and the teacher moving toward the student."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.api import Batch, Problem
from kdbench_plugins.methods.prokt import ProKT, ProKTParams, student_objective, teacher_objective
from support.helpers_models import LinearNet, make_ctx

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
Y = [1, 2]
CLS3 = Problem("classification", 3)


def softmax(row: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_teacher_objective_matches_hand_computation_and_detaches_the_student() -> None:
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T, requires_grad=True)
    loss, task, pull = teacher_objective(t, s, torch.tensor(Y), 0.4, 2.0, CLS3)
    ce = -sum(math.log(softmax(r, 1.0)[y]) for r, y in zip(T, Y)) / 2
    pull_hand = sum(kl(softmax(a, 2.0), softmax(b, 2.0)) for a, b in zip(S, T)) / 2 * 4.0  # KL(p_S || p_T) * T^2
    assert task.item() == pytest.approx(ce, rel=1e-6)
    assert pull.item() == pytest.approx(pull_hand, rel=1e-6)
    assert loss.item() == pytest.approx(0.6 * ce + 0.4 * pull_hand, rel=1e-6)
    loss.backward()
    assert s.grad is None and t.grad is not None


def test_student_objective_matches_hand_computation() -> None:
    loss, soft, hard = student_objective(torch.tensor(S), torch.tensor(T), torch.tensor(Y), 1.0, 1.0, CLS3)
    soft_hand = sum(kl(softmax(b, 1.0), softmax(a, 1.0)) for a, b in zip(S, T)) / 2  # KL(p_T || p_S)
    assert loss.item() == pytest.approx(soft_hand, rel=1e-6) and soft.item() == pytest.approx(soft_hand, rel=1e-6)
    loss, _, hard = student_objective(torch.tensor(S), torch.tensor(T), torch.tensor(Y), 0.25, 1.0, CLS3)
    ce = -sum(math.log(softmax(r, 1.0)[y]) for r, y in zip(S, Y)) / 2
    assert loss.item() == pytest.approx(0.25 * soft_hand + 0.75 * ce, rel=1e-6)


def test_regression_objectives_are_mse() -> None:
    reg = Problem("regression", 1)
    s, t, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]]), torch.tensor([1.0, 1.0])
    loss, task, pull = teacher_objective(t, s, y, 0.4, 3.0, reg)
    assert (task.item(), pull.item()) == pytest.approx(((1 + 9) / 2, (1 + 4) / 2))
    assert loss.item() == pytest.approx(0.6 * 5 + 0.4 * 2.5)
    loss, _, _ = student_objective(s, t, y, 1.0, 3.0, reg)
    assert loss.item() == pytest.approx(2.5)


def _toy(seed: int = 0) -> tuple[LinearNet, LinearNet, Batch]:
    torch.manual_seed(seed)
    teacher, student = LinearNet(4, 3).double().eval(), LinearNet(4, 3).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    return teacher, student, Batch(inputs={"x": x}, labels=torch.randint(0, 3, (8,)), index=torch.arange(8))


def test_one_step_teacher_first_then_student_against_updated_teacher() -> None:
    teacher, student, batch = _toy()
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s0 = [p.detach().clone() for p in student.parameters()]
    p = ProKTParams(lam=0.4, temperature=2.0, alpha=1.0, teacher_lr=0.5, teacher_optimizer="sgd", teacher_momentum=0.0, teacher_init="finetuned")
    method = ProKT(p, CLS3)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.3), problem=CLS3)
    teacher.requires_grad_(True)
    method.setup(ctx)
    values = method.train_step(ctx, batch)

    # reference by hand on cloned tensors
    x, y = batch.inputs["x"], batch.labels
    tw, tb = (v.clone().requires_grad_() for v in t0)
    sw, sb = s0
    s_logits = x @ sw.T + sb
    t_logits = x @ tw.T + tb
    log_pt = torch.log_softmax(t_logits / 2, -1)
    p_s = torch.softmax(s_logits / 2, -1)
    l_t = 0.6 * torch.nn.functional.cross_entropy(t_logits, y) + 0.4 * 4 * (p_s * (torch.log(p_s) - log_pt)).sum(-1).mean()
    gw, gb = torch.autograd.grad(l_t, [tw, tb])
    tw1, tb1 = t0[0] - 0.5 * gw, t0[1] - 0.5 * gb
    torch.testing.assert_close([q.detach() for q in teacher.parameters()], [tw1, tb1])

    sw_, sb_ = (v.clone().requires_grad_() for v in s0)
    s_logits = x @ sw_.T + sb_
    p_t1 = torch.softmax((x @ tw1.T + tb1) / 2, -1)
    l_s = 4 * (p_t1 * (torch.log(p_t1) - torch.log_softmax(s_logits / 2, -1))).sum(-1).mean()
    gsw, gsb = torch.autograd.grad(l_s, [sw_, sb_])
    torch.testing.assert_close([q.detach() for q in student.parameters()], [s0[0] - 0.3 * gsw, s0[1] - 0.3 * gsb])
    assert list(values)[0] == "loss" and values["loss"].item() == pytest.approx(l_s.item())
    assert values["teacher_loss"].item() == pytest.approx(l_t.item())
    assert not teacher.training  # handed back in eval mode


def test_teacher_moves_toward_the_student() -> None:
    teacher, student, batch = _toy(seed=3)
    method = ProKT(ProKTParams(lam=0.4, teacher_lr=0.05, teacher_optimizer="sgd", teacher_momentum=0.0, teacher_init="finetuned"), CLS3)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), problem=CLS3)
    teacher.requires_grad_(True)
    method.setup(ctx)
    pulls = [method.train_step(ctx, batch)["teacher_pull"].item() for _ in range(40)]
    assert pulls[-1] < 0.5 * pulls[0]
    assert all(b <= a + 1e-12 for a, b in zip(pulls, pulls[1:]))  # monotone on this toy


def test_teacher_starts_from_pretrained_weights_by_default() -> None:
    teacher, student, batch = _toy(seed=4)
    finetuned = [p.detach().clone() for p in teacher.parameters()]
    torch.manual_seed(9)
    pretrained = LinearNet(4, 3).double()  # what ctx.build_teacher gives: pretrained body, new head
    assert ProKTParams().teacher_init == "pretrained" and ProKT.version == 2
    method = ProKT(ProKTParams(teacher_lr=0.05, teacher_optimizer="sgd", teacher_momentum=0.0), CLS3)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), problem=CLS3)
    ctx.build_teacher = lambda: pretrained
    teacher.requires_grad_(True)
    method.setup(ctx)
    assert ctx.teacher is teacher  # loaded in place: the run's teacher forward reads the same object
    torch.testing.assert_close([p.detach() for p in teacher.parameters()], [p.detach() for p in pretrained.parameters()])
    assert not torch.equal(finetuned[0], teacher.fc.weight.detach())  # not the fine-tuned start (version 1)
    before = teacher.fc.weight.detach().clone()
    method.train_step(ctx, batch)
    assert not torch.equal(before, teacher.fc.weight.detach())  # and it trains from there


def test_pretrained_start_without_a_teacher_builder_is_a_named_error() -> None:
    from kdbench.api import KDBenchError

    teacher, student, _ = _toy()
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), problem=CLS3)
    teacher.requires_grad_(True)
    with pytest.raises(KDBenchError, match="teacher_init: finetuned"):
        ProKT(ProKTParams(), CLS3).setup(ctx)
