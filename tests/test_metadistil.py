"""MetaDistil: the teacher's meta-gradient against an unrolled reference and finite
differences (float64, tiny BERT and a tiny CNN with BatchNorm), the real step against the
updated teacher, a student untouched by the pilot step, inner methods and params."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.func import functional_call

from kdbench.api import HIDDEN_STATES, LOGITS, Batch, KDModel, Problem
from kdbench.registry import Registry, get_registry, make_plugin_manager, set_registry
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from support.helpers_models import CLASSIFICATION, image_batch, make_ctx, text_batch, tiny_bert, tiny_cnn

PLUGINS = ["kdbench_plugins.methods.kd", "kdbench_plugins.methods.none", "kdbench_plugins.methods.pkd",
           "kdbench_plugins.methods.tinybert", "kdbench_plugins.methods.prokt", "kdbench_plugins.methods.metadistil"]


@pytest.fixture(autouse=True, scope="module")
def registry():
    """The process registry with this suite's methods, whether or not their entry points exist yet."""
    previous = get_registry()
    pm, broken = make_plugin_manager()
    for name in PLUGINS:
        module = importlib.import_module(name)
        if not pm.is_registered(module):
            pm.register(module)
    set_registry(Registry(pm, broken))
    yield
    set_registry(previous)


# --------------------------------------------------------------------- the reference


def ref_inner_loss(kind: str, s, t, labels: torch.Tensor, alpha: float, temp: float, beta: float = 0.0) -> torch.Tensor:
    """KD (and PKD-skip) written out in float64, independently of the plugins."""
    log_ps = torch.log_softmax(s.logits / temp, -1)
    log_pt = torch.log_softmax(t.logits / temp, -1)
    soft = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temp**2
    hard = -torch.log_softmax(s.logits, -1).gather(1, labels[:, None]).mean()
    loss = alpha * soft + (1 - alpha) * hard
    if kind == "pkd":
        m, n = len(s.hidden_states) - 1, len(t.hidden_states) - 1
        terms = []
        for i in range(1, m):
            u = s.hidden_states[i][:, 0]
            v = t.hidden_states[i * n // m][:, 0]
            terms.append(((u / u.norm(dim=-1, keepdim=True) - v / v.norm(dim=-1, keepdim=True)) ** 2).mean())
        loss = loss + beta * sum(terms) / len(terms)
    return loss


def ref_quiz_loss(student: KDModel, teacher: KDModel, t_params: dict, batch: Batch, quiz: Batch, eta: float,
                  kind: str, alpha: float, temp: float, beta: float = 0.0, create_graph: bool = True, quiz_mode: str = "eval") -> torch.Tensor:
    """Unrolled: S' = S - eta * grad_S L_inner(S, T), then CE of S' (eval mode) on the quiz batch.
    Works on clones: the models' own tensors are never read after cloning or written."""
    need = frozenset({LOGITS, HIDDEN_STATES}) if kind == "pkd" else frozenset({LOGITS})
    s_params = {n: p.detach().clone().requires_grad_() for n, p in student.named_parameters()}
    s_buffers = {n: b.clone() for n, b in student.named_buffers()}
    t_buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    teacher.eval()
    student.train()
    t_out = functional_call(teacher, {**t_params, **t_buffers}, (batch.inputs,), {"need": need})
    s_out = functional_call(student, {**s_params, **s_buffers}, (batch.inputs,), {"need": need})  # BN updates the cloned stats
    inner = ref_inner_loss(kind, s_out, t_out, batch.labels, alpha, temp, beta)
    names = list(s_params)
    grads = torch.autograd.grad(inner, [s_params[n] for n in names], create_graph=create_graph, allow_unused=True)
    fast = {n: s_params[n] - eta * g if g is not None else s_params[n] for n, g in zip(names, grads)}
    student.train(quiz_mode == "train")  # train: BatchNorm normalises with the quiz batch's statistics
    try:
        q_logits = functional_call(student, {**fast, **s_buffers}, (quiz.inputs,), {"need": frozenset({LOGITS})}).logits
    finally:
        student.train()
    return -torch.log_softmax(q_logits, -1).gather(1, quiz.labels[:, None]).mean()


def ref_meta_gradient(student, teacher, batch, quiz, eta, kind="kd", alpha=0.5, temp=2.0, beta=0.0, quiz_mode="eval") -> list[torch.Tensor]:
    t_params = {n: p.detach().clone().requires_grad_() for n, p in teacher.named_parameters()}
    loss = ref_quiz_loss(student, teacher, t_params, batch, quiz, eta, kind, alpha, temp, beta, quiz_mode=quiz_mode)
    return list(torch.autograd.grad(loss, list(t_params.values()), allow_unused=True))


def finite_difference(student, teacher, batch, quiz, eta, direction: dict, kind="kd", alpha=0.5, temp=2.0, beta=0.0, eps=1e-5) -> float:
    """Central difference of the quiz loss along ``direction`` in teacher-parameter space."""
    base = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    f = []
    for sign in (1.0, -1.0):
        moved = {n: (base[n] + sign * eps * direction[n]).requires_grad_() for n in base}
        with torch.enable_grad():
            f.append(ref_quiz_loss(student, teacher, moved, batch, quiz, eta, kind, alpha, temp, beta, create_graph=False).item())
    return (f[0] - f[1]) / (2 * eps)


# --------------------------------------------------------------------- set-ups


def make(kind: str, inner: str = "kd", **extra):
    if kind == "bert":
        layers = (2, 4) if inner == "pkd" else (1, 2)
        student, teacher = tiny_bert(layers=layers[0], seed=1), tiny_bert(layers=layers[1], seed=2)
        batch, quiz = text_batch(seed=3), text_batch(seed=4)
    else:
        student, teacher = tiny_cnn((3,), seed=1), tiny_cnn((4,), seed=2)
        batch, quiz = image_batch(seed=3), image_batch(seed=4)
    teacher.eval().requires_grad_(True)
    params = {"inner": inner, "virtual_lr": 0.5, "teacher_lr": 0.1, "teacher_optimizer": "sgd", "teacher_momentum": 0.0,
              "teacher_grad_clip": None, "alpha": 0.5, "temperature": 2.0, **extra}
    method = MetaDistil(MetaDistilParams(**params), CLASSIFICATION)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ctx = make_ctx(student, teacher, optimizer, quiz=quiz)
    method.check_models(student, teacher)
    method.setup(ctx)
    return method, ctx, batch, quiz


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("kind", ["bert", "cnn"])
def test_meta_gradient_matches_unrolled_reference_and_finite_differences(kind: str) -> None:
    method, ctx, batch, quiz = make(kind)
    student, teacher = ctx.student, ctx.teacher
    ref = ref_meta_gradient(student, teacher, batch, quiz, eta=0.5)  # before the method touches the BN statistics
    fd_dirs = [{n: torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i), dtype=p.dtype)
                for n, p in teacher.named_parameters()} for i in range(3)]
    fds = [finite_difference(student, teacher, batch, quiz, 0.5, d) for d in fd_dirs]

    grads, _, quiz_loss = method.meta_gradient(ctx, batch)
    g, r = flat(grads), flat([x if x is not None else torch.zeros(1) for x in ref])
    assert g.abs().max() > 1e-4  # the meta-gradient is not trivially zero
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * r.abs().max().item())
    for d, fd in zip(fd_dirs, fds):
        analytic = float(g @ flat([d[n] for n, _ in teacher.named_parameters()]))
        assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-9)
    assert quiz_loss.item() > 0


@pytest.mark.parametrize("kind", ["bert", "cnn"])
def test_real_step_uses_updated_teacher_and_pilot_leaves_student_untouched(kind: str) -> None:
    method, ctx, batch, quiz = make(kind, teacher_grad_clip=1e-3)
    student, teacher = ctx.student, ctx.teacher
    # give the student optimizer some state first, so "untouched" means something
    loss = F.cross_entropy(student(batch.inputs).logits, batch.labels)
    loss.backward()
    ctx.student_optimizer.step()
    ctx.student_optimizer.zero_grad()

    ref_student = copy.deepcopy(student)
    ref_opt = torch.optim.AdamW(ref_student.parameters(), lr=1e-2)
    ref_opt.load_state_dict(copy.deepcopy(ctx.student_optimizer.state_dict()))
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ref_g = ref_meta_gradient(student, teacher, batch, quiz, eta=0.5)

    values = method.train_step(ctx, batch)

    # the teacher stepped by SGD on the clipped meta-gradient
    norm = flat(ref_g).norm()
    scale = min(1.0, 1e-3 / (norm.item() + 1e-6))
    torch.testing.assert_close([p.detach() for p in teacher.parameters()], [a - 0.1 * scale * g for a, g in zip(t0, ref_g)], rtol=1e-5, atol=1e-9)
    assert values["teacher_grad_norm"].item() == pytest.approx(norm.item(), rel=1e-4)
    assert list(values)[0] == "loss"

    # the real step = one plain step from the untouched student against the updated teacher
    ref_student.train()
    with torch.no_grad():
        t_out = teacher(batch.inputs, need=frozenset({LOGITS}))
    s_out = ref_student(batch.inputs, need=frozenset({LOGITS}))
    ref_loss = ref_inner_loss("kd", s_out, t_out, batch.labels, 0.5, 2.0)
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_opt.step()
    assert values["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(dict(student.named_parameters()), dict(ref_student.named_parameters()), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dict(student.named_buffers()), dict(ref_student.named_buffers()))  # BN stats: one update
    for a, b in zip(ctx.student_optimizer.state.values(), ref_opt.state.values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)  # the plugin losses run in float32
    # and not the step one would get against the old teacher
    assert not torch.allclose(t_out.logits, functional_call(teacher, dict(zip([n for n, _ in teacher.named_parameters()], t0)), (batch.inputs,)).logits)


def test_pilot_step_changes_no_student_tensor_except_one_bn_update() -> None:
    method, ctx, batch, _ = make("cnn")
    student = ctx.student
    before = {k: v.clone() for k, v in student.state_dict().items()}
    once = copy.deepcopy(student).train()
    once(batch.inputs)  # one train-mode forward: what the real step's shared forward does to BN
    method.meta_gradient(ctx, batch)
    after = student.state_dict()
    for name, value in before.items():
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(after[name], once.state_dict()[name])
            assert not torch.equal(after[name], value) or "num_batches" in name
        else:
            assert torch.equal(after[name], value), name
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert student.training and not ctx.teacher.training


def test_inner_pkd_meta_gradient_matches_finite_differences() -> None:
    method, ctx, batch, quiz = make("bert", inner="pkd", beta=10.0, soft_reduction="batchmean")  # the reference's KL
    assert method.student_needs == frozenset({LOGITS, HIDDEN_STATES})
    student, teacher = ctx.student, ctx.teacher
    d = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype) for n, p in teacher.named_parameters()}
    fd = finite_difference(student, teacher, batch, quiz, 0.5, d, kind="pkd", beta=10.0)
    ref = flat([x if x is not None else torch.zeros_like(p) for x, p in zip(ref_meta_gradient(student, teacher, batch, quiz, 0.5, kind="pkd", beta=10.0), teacher.parameters())])
    grads, _, _ = method.meta_gradient(ctx, batch)
    g = flat(grads)
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert float(g @ flat(list(d.values()))) == pytest.approx(fd, rel=1e-4)
    values = method.train_step(ctx, batch)
    assert values["patience"].item() > 0 and torch.isfinite(values["loss"])


def test_teacher_is_fixed_before_teacher_start() -> None:
    method, ctx, batch, _ = make("cnn", teacher_start=0.5)
    ctx.total_steps, ctx.step = 10, 4  # steps 0..4 of 10 are plain, the teacher moves from step 5
    t0 = [p.detach().clone() for p in ctx.teacher.parameters()]
    s0 = copy.deepcopy(ctx.student)
    values = method.train_step(ctx, batch)
    assert all(torch.equal(a, b) for a, b in zip(t0, ctx.teacher.parameters()))
    assert "quiz_loss" not in values
    s_out = s0(batch.inputs)
    with torch.no_grad():
        t_out = ctx.teacher(batch.inputs)
    assert values["loss"].item() == pytest.approx(ref_inner_loss("kd", s_out, t_out, batch.labels, 0.5, 2.0).item(), rel=1e-6)
    ctx.step = 5
    assert "quiz_loss" in method.train_step(ctx, batch)
    assert not all(torch.equal(a, b) for a, b in zip(t0, ctx.teacher.parameters()))


def test_several_quiz_batches_average_their_losses() -> None:
    quizzes = [image_batch(seed=20 + i) for i in range(3)]
    it = iter(quizzes)
    method, ctx, batch, _ = make("cnn", quiz_batches=3)
    ctx.next_quiz_batch = lambda: next(it)
    refs = [ref_meta_gradient(ctx.student, ctx.teacher, batch, q, 0.5) for q in quizzes]  # before BN sees the batch
    grads, _, quiz_loss = method.meta_gradient(ctx, batch)
    mean = [sum(r[i] for r in refs) / 3 for i in range(len(grads))]
    torch.testing.assert_close(flat(grads), flat(mean), rtol=1e-4, atol=1e-9)


# --------------------------------------------------------------------- params


def test_params_validate_the_inner_methods_fields() -> None:
    p = MetaDistilParams(inner="pkd", alpha="0.3", beta=100, temperature=5)
    assert p.model_extra == {"alpha": 0.3, "beta": 100.0, "temperature": 5.0}
    assert p.model_dump(mode="json")["beta"] == 100.0  # extras are part of the run's spec and hash
    method = MetaDistil(p, CLASSIFICATION)
    assert (method.inner.params.alpha, method.inner.params.beta, method.inner.params.layer_map) == (0.3, 100.0, "skip")
    with pytest.raises(ValidationError, match=r"unknown field 'beta'.*inner method 'kd'.*alpha, temperature"):
        MetaDistilParams(inner="kd", beta=1.0)
    with pytest.raises(ValidationError, match="inner method 'kd' params: alpha"):
        MetaDistilParams(inner="kd", alpha=2.0)
    with pytest.raises(ValidationError, match="Did you mean 'pkd'"):
        MetaDistilParams(inner="pdk")
    with pytest.raises(ValidationError, match="updates the teacher"):
        MetaDistilParams(inner="prokt")
    with pytest.raises(ValidationError, match="does not use a teacher"):
        MetaDistilParams(inner="none")
    with pytest.raises(ValidationError, match="quiz_batches"):
        MetaDistilParams(quiz_batches=0)
    assert MetaDistil(MetaDistilParams(), CLASSIFICATION).inner.params.temperature == 4.0  # kd's defaults
    assert MetaDistil.uses_quiz and MetaDistil.updates_teacher


def test_inner_tinybert_extra_modules_pass_through() -> None:
    from kdbench.api import SetupInfo

    method = MetaDistil(MetaDistilParams(inner="tinybert", temperature=1.0), Problem("classification", 2))
    student, teacher = tiny_bert(layers=1, hidden=8), tiny_bert(layers=2, hidden=16)
    proj = method.extra_modules(student, teacher, SetupInfo(sample=text_batch(), train_size=4, device=torch.device("cpu")))
    assert (proj.in_features, proj.out_features) == (8, 16)
