"""The teacher optimisers of MetaDistil and ProKT, step by step against hand-written updates.

Every option is set away from its default (momentum, weight decay, clipping, schedules,
train/eval mode), and the rate a step used is read from the parameter change, not from a
field afterwards, so a dropped momentum, a dropped weight decay, a schedule applied one
step late or an ignored option fails here (tests/README.md lists the mutations tried).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from kdbench.api import LOGITS, Batch, KDModel, ModelOutput, Problem, RunStreams
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from kdbench_plugins.methods.prokt import ProKT, ProKTParams
from support.helpers_models import CLASSIFICATION, LinearNet, make_ctx
from test_metadistil import ref_meta_gradient, registry  # noqa: F401 (registry: the module fixture)

CLS3 = Problem("classification", 3)


class DropBNNet(KDModel):
    """x -> Linear -> BatchNorm -> ReLU -> Dropout(0.5) -> Linear: a teacher whose train and
    eval modes differ in both ways a real network's do."""

    capabilities = frozenset({LOGITS})
    family = "generic"

    def __init__(self, d_in: int = 4, width: int = 6, d_out: int = 3):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(d_in, width), nn.BatchNorm1d(width), nn.Dropout(0.5), nn.Linear(width, d_out)

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        return ModelOutput(logits=self.fc2(self.drop(torch.relu(self.bn(self.fc1(inputs["x"]))))))


def batch_of(seed: int, n: int = 8, classes: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(inputs={"x": torch.randn(n, 4, generator=g, dtype=torch.float64)}, labels=torch.randint(0, classes, (n,), generator=g),
                 index=torch.arange(n))


def clipped(grads: list[Tensor], clip: float | None) -> list[Tensor]:
    if clip is None:
        return grads
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    return [g * min(1.0, clip / (norm.item() + 1e-6)) for g in grads]


def hand_sgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], lr: float, momentum: float, wd: float) -> None:
    """torch.optim.SGD's rule written out: d = g + wd p; buf = d, then momentum buf + d; p -= lr buf."""
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g + wd * p
        bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
        p.sub_(lr * bufs[i])


def hand_adamw(params: list[Tensor], grads: list[Tensor], state: dict, lr: float, wd: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
    """AdamW (decoupled decay, bias-corrected) written out."""
    state["t"] = t = state.get("t", 0) + 1
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state.get(("m", i), torch.zeros_like(p)), state.get(("v", i), torch.zeros_like(p))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        state[("m", i)], state[("v", i)] = m, v
        p.mul_(1 - lr * wd)
        p.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))


# ------------------------------------------------------------------ MetaDistil


def metadistil_setup(**params):
    torch.manual_seed(0)
    student, teacher = LinearNet(4, 2).double(), LinearNet(4, 2).double().eval().requires_grad_(True)
    quiz = batch_of(99)
    full = {"inner": "kd", "alpha": 0.5, "temperature": 2.0, "virtual_lr": 0.5, **params}
    method = MetaDistil(MetaDistilParams(**full), CLASSIFICATION)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), quiz=quiz, total_steps=5, step=0)
    method.setup(ctx)
    return method, ctx, quiz


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_metadistil_teacher_update_is_the_hand_update_step_by_step(optimizer: str, schedule: str) -> None:
    lr, wd, mom, clip = 0.2, 0.3, 0.7, 0.05
    method, ctx, quiz = metadistil_setup(teacher_optimizer=optimizer, teacher_lr=lr, teacher_weight_decay=wd, teacher_momentum=mom,
                                         teacher_grad_clip=clip, teacher_schedule=schedule)
    teacher = ctx.teacher
    hand = [p.detach().clone() for p in teacher.parameters()]
    bufs: list[Tensor | None] = [None, None]
    adam: dict = {}
    for step in (1, 2, 3, 4):  # step 0 is a plain step: the teacher starts at step 1
        ctx.step = step
        batch = batch_of(step)
        g = clipped(ref_meta_gradient(ctx.student, teacher, batch, quiz, 0.5), clip)
        rate = lr * ((5 - step) / 5 if schedule == "linear" else 1.0)  # the rate of THIS step, not the last one's
        if optimizer == "sgd":
            hand_sgd(hand, g, bufs, rate, mom, wd)
        else:
            hand_adamw(hand, g, adam, rate, wd)
        values = method.train_step(ctx, batch)
        torch.testing.assert_close([p.detach() for p in teacher.parameters()], hand, rtol=1e-9, atol=1e-12)
        assert values["teacher_lr"].item() == pytest.approx(rate)


def test_metadistil_teacher_update_matches_torch_sgd_fed_the_same_gradients() -> None:
    method, ctx, quiz = metadistil_setup(teacher_optimizer="sgd", teacher_lr=0.3, teacher_weight_decay=0.2, teacher_momentum=0.8,
                                         teacher_grad_clip=None, teacher_schedule="linear")
    shadow = copy.deepcopy(ctx.teacher)
    reference = torch.optim.SGD(shadow.parameters(), lr=0.3, momentum=0.8, weight_decay=0.2)
    for step in (1, 2, 3):
        ctx.step = step
        batch = batch_of(10 + step)
        for q, g in zip(shadow.parameters(), ref_meta_gradient(ctx.student, ctx.teacher, batch, quiz, 0.5)):
            q.grad = g
        reference.param_groups[0]["lr"] = 0.3 * (5 - step) / 5
        reference.step()
        method.train_step(ctx, batch)
        torch.testing.assert_close(list(ctx.teacher.parameters()), list(shadow.parameters()), rtol=1e-9, atol=1e-12)


def test_metadistil_clip_value_is_the_one_given() -> None:
    # one SGD step without momentum or decay: the change is lr * clip exactly when the gradient is longer than clip
    for clip in (0.01, 0.02):
        method, ctx, quiz = metadistil_setup(teacher_optimizer="sgd", teacher_lr=1.0, teacher_momentum=0.0, teacher_grad_clip=clip)
        before = torch.cat([p.detach().reshape(-1).clone() for p in ctx.teacher.parameters()])
        ctx.step = 1
        values = method.train_step(ctx, batch_of(1))
        moved = torch.cat([p.detach().reshape(-1) for p in ctx.teacher.parameters()]) - before
        assert values["teacher_grad_norm"].item() > 0.05
        assert moved.norm().item() == pytest.approx(clip, rel=1e-3)  # clip_grad_norm_ divides by norm + 1e-6


# ------------------------------------------------------------------ ProKT


def prokt_setup(**params):
    torch.manual_seed(0)
    teacher, student = DropBNNet().double().eval().requires_grad_(True), LinearNet(4, 3).double()
    full = {"lam": 0.3, "temperature": 2.0, "alpha": 0.6, "teacher_lr": 0.2, "teacher_optimizer": "sgd", "teacher_momentum": 0.7,
            "teacher_weight_decay": 0.1, "teacher_init": "finetuned", **params}
    method = ProKT(ProKTParams(**full), CLS3)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), problem=CLS3)
    method.setup(ctx)
    return method, ctx, ProKTParams(**full)


def prokt_teacher_grad(teacher: DropBNNet, student: nn.Module, batch: Batch, p: ProKTParams, train: bool, seed: int) -> list[Tensor]:
    """d L_T / d teacher on a copy, with the dropout mask the step draws (seeded the same)."""
    copy_ = copy.deepcopy(teacher).train(train)
    with torch.no_grad():
        s = student(batch.inputs).logits
    torch.manual_seed(seed)
    t = copy_(batch.inputs).logits
    ce = nn.functional.cross_entropy(t, batch.labels)
    log_pt, log_ps = torch.log_softmax(t / p.temperature, -1), torch.log_softmax(s / p.temperature, -1)
    pull = (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean() * p.temperature**2
    return list(torch.autograd.grad((1 - p.lam) * ce + p.lam * pull, list(copy_.parameters())))


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("follow", [True, False])
def test_prokt_teacher_update_in_its_mode_at_its_rate(train_mode: bool, follow: bool) -> None:
    method, ctx, p = prokt_setup(teacher_train_mode=train_mode, follow_student_schedule=follow)
    teacher, student = ctx.teacher, ctx.student
    hand = [q.detach().clone() for q in teacher.parameters()]
    bufs: list[Tensor | None] = [None] * len(hand)
    for k, ratio in enumerate((1.0, 0.5, 0.1)):  # the student's lr / its initial lr at each step
        ctx.student_optimizer.param_groups[0]["lr"] = 0.1 * ratio
        batch = batch_of(k, classes=3)
        stats = [b.clone() for b in teacher.buffers()]
        g = prokt_teacher_grad(teacher, student, batch, p, train_mode, seed=100 + k)
        hand_sgd(hand, g, bufs, p.teacher_lr * (ratio if follow else 1.0), p.teacher_momentum, p.teacher_weight_decay)
        torch.manual_seed(100 + k)
        method.train_step(ctx, batch)
        torch.testing.assert_close([q.detach() for q in teacher.parameters()], hand, rtol=1e-9, atol=1e-12)
        moved = any(not torch.equal(a, b) for a, b in zip(stats, teacher.buffers()))
        assert moved == train_mode  # BatchNorm's running statistics move only in a train-mode update
        assert not teacher.training


def test_prokt_student_step_uses_alpha_and_the_updated_eval_mode_teacher() -> None:
    method, ctx, p = prokt_setup(teacher_optimizer="adamw", teacher_lr=0.01)
    student = ctx.student
    batch = batch_of(5, classes=3)
    s0 = [q.detach().clone().requires_grad_() for q in student.parameters()]
    torch.manual_seed(7)
    method.train_step(ctx, batch)
    with torch.no_grad():
        t_new = ctx.teacher.eval()(batch.inputs).logits  # eval mode: no dropout, running statistics
    s = batch.inputs["x"] @ s0[0].T + s0[1]
    log_pt, log_ps = torch.log_softmax(t_new / 2, -1), torch.log_softmax(s / 2, -1)
    loss = 0.6 * 4 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() + 0.4 * nn.functional.cross_entropy(s, batch.labels)
    grads = torch.autograd.grad(loss, s0)
    torch.testing.assert_close([q.detach() for q in student.parameters()], [a.detach() - 0.1 * g for a, g in zip(s0, grads)])


def test_metadistil_warm_steps_fill_the_momentum_buffer_without_moving_the_teacher() -> None:
    # teacher_start 0.6 of 5 steps: the teacher's lr is 0 before step 3; two warm steps (1, 2) run the meta step at lr 0
    lr, mom, wd = 0.2, 0.9, 0.1
    for warm in (0, 2):
        method, ctx, quiz = metadistil_setup(teacher_optimizer="sgd", teacher_lr=lr, teacher_momentum=mom, teacher_weight_decay=wd,
                                             teacher_grad_clip=None, teacher_start=0.6, teacher_warm_steps=warm)
        start = [p.detach().clone() for p in ctx.teacher.parameters()]
        hand, bufs = [p.clone() for p in start], [None, None]
        for step in (1, 2, 3):
            ctx.step = step
            batch = batch_of(20 + step)
            g = ref_meta_gradient(ctx.student, ctx.teacher, batch, quiz, 0.5)
            values = method.train_step(ctx, batch)
            if step < 3:
                assert ("quiz_loss" in values) == (warm > 0)  # a warm step is a meta step ...
                assert all(torch.equal(a, b) for a, b in zip(start, ctx.teacher.parameters()))  # ... that does not move the teacher
            if step >= 3 - warm:
                hand_sgd(hand, g, bufs, lr if step == 3 else 0.0, mom, wd)
        torch.testing.assert_close([p.detach() for p in ctx.teacher.parameters()], hand, rtol=1e-9, atol=1e-12)
        if warm:  # the official start: about (1 + mu + mu^2) times the cold first step
            cold = [s - lr * (gi + wd * s) for s, gi in zip(start, g)]
            assert not torch.allclose(hand[0], cold[0])


def test_quiz_augment_reaches_the_runners_quiz_stream() -> None:
    from types import SimpleNamespace

    from kdbench.train import Runner

    class Task:
        has_augmentation = True
        problem = CLASSIFICATION

        def augment(self, inputs: dict, generator: torch.Generator) -> dict:
            return {k: v + 1000 for k, v in inputs.items()}

    data = SimpleNamespace(task=Task(), labels=lambda split: [0, 1, 0, 1], objective=SimpleNamespace(labels=torch.tensor))
    encoded = {"quiz": {"x": torch.zeros(4, 4)}}
    factory = SimpleNamespace(collate=lambda enc, index: {k: v[index] for k, v in enc.items()})
    spec = SimpleNamespace(seed=0, method="metadistil", budget=SimpleNamespace(batch_size=2))
    runner = SimpleNamespace(device=torch.device("cpu"))
    for flag in (False, True):
        method = MetaDistil(MetaDistilParams(quiz_augment=flag), CLASSIFICATION)
        prepared = SimpleNamespace(method=method, data=data, encoded=encoded, factory=factory, teacher_side=lambda split: None)
        quiz = Runner._quiz_batches(runner, spec, prepared, RunStreams(spec.seed))()  # type: ignore[arg-type]
        assert bool((quiz.inputs["x"] >= 1000).all()) == flag
    assert MetaDistilParams(quiz_augment=False).model_dump(mode="json").keys() == MetaDistilParams().model_dump(mode="json").keys()
