"""MetaDistil around the methods published since 2021: the teacher's meta-gradient with
DIST, KD with logit standardisation and CRD as the inner loss, against an unrolled
reference whose inner loss is written out here (float64, a tiny CNN with BatchNorm) and
against central finite differences of the quiz loss along random teacher directions."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.func import functional_call

from kdbench.api import LOGITS, Batch, Problem
from kdbench.registry import Registry, get_registry, make_plugin_manager, set_registry
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from support.helpers_models import image_batch, make_ctx, tiny_cnn

PLUGINS = ["kdbench_plugins.methods.kd", "kdbench_plugins.methods.dist", "kdbench_plugins.methods.crd", "kdbench_plugins.methods.mlkd",
           "kdbench_plugins.methods.ctkd", "kdbench_plugins.methods.reviewkd", "kdbench_plugins.methods.metadistil"]
#: four classes: with two, z-scored logits are +-1/sqrt(2) whatever the teacher says, so
#: KD+LS would give the teacher no gradient at all
PROBLEM = Problem("classification", 4)


@pytest.fixture(autouse=True, scope="module")
def registry():
    previous = get_registry()
    pm, broken = make_plugin_manager()
    for name in PLUGINS:
        module = importlib.import_module(name)
        if not pm.is_registered(module):
            pm.register(module)
    set_registry(Registry(pm, broken))
    yield
    set_registry(previous)


def zscore(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(1, keepdim=True)) / (1e-7 + z.std(1, keepdim=True))


def ref_kd_ls(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KD+LS at alpha 0.6, T 2, written out: 0.6 * T^2 * KL(z(t)/T || z(s)/T) + 0.4 * CE."""
    log_ps, log_pt = torch.log_softmax(zscore(s) / 2, 1), torch.log_softmax(zscore(t) / 2, 1)
    soft = (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * 4
    return 0.6 * soft + 0.4 * torch.nn.functional.cross_entropy(s, y)


def ref_dist(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DIST at T 3, beta 1.5, gamma 0.5, CE 1, written out with Pearson correlations."""
    def corr(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    ys, yt = torch.softmax(s / 3, 1), torch.softmax(t / 3, 1)
    return torch.nn.functional.cross_entropy(s, y) + 9 * (1.5 * (1 - corr(ys, yt).mean()) + 0.5 * (1 - corr(ys.t(), yt.t()).mean()))


CASES = {
    "kd+ls": ({"inner": "kd", "alpha": 0.6, "temperature": 2.0, "logit_standardization": True}, ref_kd_ls),
    "dist": ({"inner": "dist", "beta": 1.5, "gamma": 0.5, "temperature": 3.0}, ref_dist),
}


def make(inner_params: dict):
    student, teacher = tiny_cnn((3,), PROBLEM, seed=1), tiny_cnn((4,), PROBLEM, seed=2)
    batch, quiz = image_batch(n=6, seed=3, num_labels=4), image_batch(n=6, seed=4, num_labels=4)
    teacher.eval().requires_grad_(True)
    params = {"virtual_lr": 0.5, "teacher_lr": 0.1, "teacher_optimizer": "sgd", "teacher_momentum": 0.0, "teacher_grad_clip": None, **inner_params}
    method = MetaDistil(MetaDistilParams(**params), PROBLEM)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.01), quiz=quiz, problem=PROBLEM)
    method.check_models(student, teacher)
    method.setup(ctx)
    return method, ctx, batch, quiz


def quiz_loss(student, teacher, t_params: dict, batch: Batch, quiz: Batch, inner, create_graph: bool = True) -> torch.Tensor:
    """S' = S - 0.5 * grad_S inner(S, T), then the quiz CE of S' in eval mode; on clones."""
    s_params = {n: p.detach().clone().requires_grad_() for n, p in student.named_parameters()}
    s_buffers = {n: b.clone() for n, b in student.named_buffers()}
    t_buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    t_logits = functional_call(teacher.eval(), {**t_params, **t_buffers}, (batch.inputs,), {"need": frozenset({LOGITS})}).logits
    s_logits = functional_call(student.train(), {**s_params, **s_buffers}, (batch.inputs,), {"need": frozenset({LOGITS})}).logits
    grads = torch.autograd.grad(inner(s_logits, t_logits, batch.labels), list(s_params.values()), create_graph=create_graph)
    fast = {n: w - 0.5 * g for (n, w), g in zip(s_params.items(), grads)}
    student.eval()
    try:
        logits = functional_call(student, {**fast, **s_buffers}, (quiz.inputs,), {"need": frozenset({LOGITS})}).logits
    finally:
        student.train()
    return torch.nn.functional.cross_entropy(logits, quiz.labels)


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("case", list(CASES))
def test_meta_gradient_around_the_new_inner_losses_is_exact(case: str) -> None:
    params, inner = CASES[case]
    method, ctx, batch, quiz = make(params)
    student, teacher = ctx.student, ctx.teacher
    t_params = {n: p.detach().clone().requires_grad_() for n, p in teacher.named_parameters()}
    ref = flat(torch.autograd.grad(quiz_loss(student, teacher, t_params, batch, quiz, inner), list(t_params.values())))
    directions = [{n: torch.randn(p.shape, generator=torch.Generator().manual_seed(30 + i), dtype=p.dtype) for n, p in teacher.named_parameters()}
                  for i in range(2)]
    fds = []
    for d in directions:
        f = [quiz_loss(student, teacher, {n: (p.detach() + sign * 1e-5 * d[n]) for n, p in teacher.named_parameters()}, batch, quiz, inner,
                       create_graph=False).item() for sign in (1.0, -1.0)]
        fds.append((f[0] - f[1]) / 2e-5)

    grads, _, _ = method.meta_gradient(ctx, batch)
    g = flat(grads)
    assert g.abs().max() > 1e-5  # the teacher does receive a meta-gradient through this inner loss
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    for d, fd in zip(directions, fds):
        assert float(g @ flat([d[n] for n, _ in teacher.named_parameters()])) == pytest.approx(fd, rel=1e-4, abs=1e-10)


def test_the_reference_inner_losses_are_the_plugins() -> None:
    # the written-out references above are the wrapped plugins' losses (so the check above is about them)
    for case, (params, inner) in CASES.items():
        method, ctx, batch, _ = make(params)
        s, t = ctx.student(batch.inputs).logits, ctx.teacher(batch.inputs).logits
        got, _ = method.inner.loss(ctx.student(batch.inputs), ctx.teacher(batch.inputs), batch, ctx)
        assert got.item() == pytest.approx(inner(s, t, batch.labels).item(), rel=1e-9), case


def test_metadistil_wraps_crd_with_the_exact_meta_gradient() -> None:
    # CRD inside MetaDistil has its own reference (banks, negatives): tests/test_metadistil_options.py
    from test_metadistil_options import test_metadistil_wrapping_crd_has_the_exact_meta_gradient

    test_metadistil_wrapping_crd_has_the_exact_meta_gradient()


# ------------------------------------------------- MLKD, CTKD and ReviewKD as the inner loss

def ref_mlkd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MLKD at temperatures 4 and 2, CE 0.1, KD 0.9, written out: instance KL, batch and class
    correlations, weighted by the teacher's low-confidence fractions (constants)."""
    with torch.no_grad():
        p1 = torch.softmax(t, 1)
        conf, mass = p1.max(1).values, p1.sum(0)
        f = (conf <= torch.quantile(conf, 0.5)).double().mean()
        f_c = (mass <= torch.quantile(mass, 0.5)).double().mean()
    total = 0.1 * torch.nn.functional.cross_entropy(s, y)
    for temp in (4.0, 2.0):
        ps, pt = torch.softmax(s / temp, 1), torch.softmax(t / temp, 1)
        kl = (pt * (pt.log() - ps.log())).sum(1).mean() * temp**2
        bc = ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / s.shape[0]
        cc = ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / s.shape[1]
        total = total + 0.9 * (f * kl + f * bc + f_c * cc)
    return total


def ref_ctkd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CTKD with gamma 0.3, alpha 0.7, T = 1 + 4 sigmoid(w) at the initial w = 1 (the
    reversal only changes w's gradient, and the pilot step moves the student alone)."""
    temp = 1 + 4 * torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
    log_ps, log_pt = torch.log_softmax(s / temp, 1), torch.log_softmax(t / temp, 1)
    return 0.3 * torch.nn.functional.cross_entropy(s, y) + 0.7 * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * temp**2


#: name -> (MetaDistil params, reference inner loss on the logits or None: the plugin's own
#: loss, whose formula tests/test_reviewkd.py checks by hand, (student, teacher) stage widths)
WRAPPED = {
    "mlkd": ({"inner": "mlkd", "temperatures": [4.0, 2.0]}, ref_mlkd, ((3,), (4,))),
    "ctkd": ({"inner": "ctkd", "gamma": 0.3, "alpha": 0.7, "t_start": 1.0, "t_range": 4.0}, ref_ctkd, ((3,), (4,))),
    "reviewkd": ({"inner": "reviewkd", "reviewkd_weight": 2.0, "warmup_fraction": 0.0}, None, ((3, 4), (4, 6))),
}


def make_wrapped(case: str):
    from kdbench.api import SetupInfo

    params, _, (s_ch, t_ch) = WRAPPED[case]
    student, teacher = tiny_cnn(s_ch, PROBLEM, seed=1), tiny_cnn(t_ch, PROBLEM, seed=2)
    batch, quiz = image_batch(n=6, seed=3, num_labels=4), image_batch(n=6, seed=4, num_labels=4)
    teacher.eval().requires_grad_(True)
    all_params = {"virtual_lr": 0.5, "teacher_lr": 0.1, "teacher_optimizer": "sgd", "teacher_momentum": 0.0, "teacher_grad_clip": None, **params}
    method = MetaDistil(MetaDistilParams(**all_params), PROBLEM)
    method.check_models(student, teacher)
    torch.manual_seed(5)
    extra = method.extra_modules(student, teacher, SetupInfo(sample=batch, train_size=6, device=torch.device("cpu")))
    extra = extra.double() if extra is not None else None
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.01), quiz=quiz, problem=PROBLEM, extra=extra)
    method.setup(ctx)
    return method, ctx, batch, quiz


def wrapped_quiz_loss(method, ctx, t_params: dict, batch: Batch, quiz: Batch, create_graph: bool = True) -> torch.Tensor:
    """Unrolled: S' = S - 0.5 * grad_S inner(S, T) (the student's outputs the inner loss reads,
    the extra modules fixed), then the quiz CE of S' in eval mode; on clones."""
    student, teacher, inner = ctx.student, ctx.teacher, method.inner
    _, ref, _ = WRAPPED[inner.name]
    s_params = {n: p.detach().clone().requires_grad_() for n, p in student.named_parameters()}
    s_buffers = {n: b.clone() for n, b in student.named_buffers()}
    t_buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    for name, b in list(ctx.extra.named_buffers()) if ctx.extra is not None else []:
        # the fusion modules' BatchNorm statistics: fresh copies for this call to update (a train-mode
        # forward reads batch statistics; the graph keeps the tensors it saw)
        owner, _, leaf = name.rpartition(".")
        ctx.extra.get_submodule(owner)._buffers[leaf] = b.clone()
    t_out = functional_call(teacher.eval(), {**t_params, **t_buffers}, (batch.inputs,), {"need": inner.teacher_needs})
    s_out = functional_call(student.train(), {**s_params, **s_buffers}, (batch.inputs,), {"need": inner.student_needs})
    loss = ref(s_out.logits, t_out.logits, batch.labels) if ref is not None else inner.loss(s_out, t_out, batch, ctx)[0]
    grads = torch.autograd.grad(loss, list(s_params.values()), create_graph=create_graph)
    fast = {n: w - 0.5 * g for (n, w), g in zip(s_params.items(), grads)}
    student.eval()
    try:
        logits = functional_call(student, {**fast, **s_buffers}, (quiz.inputs,), {"need": frozenset({LOGITS})}).logits
    finally:
        student.train()
    return torch.nn.functional.cross_entropy(logits, quiz.labels)


@pytest.mark.parametrize("case", list(WRAPPED))
def test_meta_gradient_around_mlkd_ctkd_and_reviewkd_is_exact(case: str) -> None:
    method, ctx, batch, quiz = make_wrapped(case)
    teacher = ctx.teacher
    t_params = {n: p.detach().clone().requires_grad_() for n, p in teacher.named_parameters()}
    # reviewkd reads the teacher's maps and embedding, not its logits: its head gets no meta-gradient (zeros)
    found = torch.autograd.grad(wrapped_quiz_loss(method, ctx, t_params, batch, quiz), list(t_params.values()), allow_unused=True)
    ref = flat([torch.zeros_like(p) if g is None else g for p, g in zip(t_params.values(), found)])
    directions = [{n: torch.randn(p.shape, generator=torch.Generator().manual_seed(40 + i), dtype=p.dtype) for n, p in teacher.named_parameters()}
                  for i in range(2)]
    fds = []
    for d in directions:
        f = [wrapped_quiz_loss(method, ctx, {n: (p.detach() + sign * 1e-5 * d[n]) for n, p in teacher.named_parameters()}, batch, quiz,
                               create_graph=False).item() for sign in (1.0, -1.0)]
        fds.append((f[0] - f[1]) / 2e-5)

    grads, _, _ = method.meta_gradient(ctx, batch)
    g = flat(grads)
    assert g.abs().max() > 1e-5  # the teacher does receive a meta-gradient through this inner loss
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    for d, fd in zip(directions, fds):
        assert float(g @ flat([d[n] for n, _ in teacher.named_parameters()])) == pytest.approx(fd, rel=1e-4, abs=1e-10)


@pytest.mark.parametrize("case", ["mlkd", "ctkd"])
def test_the_written_out_mlkd_and_ctkd_are_the_plugins(case: str) -> None:
    method, ctx, batch, _ = make_wrapped(case)
    s, t = ctx.student(batch.inputs), ctx.teacher(batch.inputs)
    got, _ = method.inner.loss(s, t, batch, ctx)
    assert got.item() == pytest.approx(WRAPPED[case][1](s.logits, t.logits, batch.labels).item(), rel=1e-6)
