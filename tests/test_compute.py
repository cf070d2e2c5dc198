"""Compute counted per run (kdbench.compute): FLOPs of one pass against a hand count, the
passes a step makes for kd, mlkd and MetaDistil (counted by the runner, equal to what
each method plans and documents), the stored figures in the cost table, and a budget
given in FLOPs buying each method the steps its passes afford."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from kdbench.api import LOGITS, KDModel, ModelOutput, Problem
from kdbench.compute import PassCounter, pass_flops, steps_for_flops, total_flops
from kdbench.executors.phases import open_store
from kdbench.registry import get_registry
from kdbench.report.cost import cost_table
from kdbench.report.frame import runs_frame
from kdbench.report.sections import cost_display
from kdbench.spec import build_suite
from kdbench.train import Runner
from kdbench.train.teachers import provide_teacher
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from support.suites import image_data

B, D0, D1, D2 = 4, 3, 5, 2


class MLP(KDModel):
    """logits = W2 relu(W1 x + b1) + b2."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D0, D1), nn.Linear(D1, D2)

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        return ModelOutput(logits=self.b(torch.relu(self.a(inputs["x"]))))


def mlp_inputs() -> dict[str, Tensor]:
    return {"x": torch.randn(B, D0, generator=torch.Generator().manual_seed(0))}


def test_flops_of_one_pass_are_the_hand_count() -> None:
    # a (B x n) @ (n x m) product is 2*B*n*m FLOPs; the counter counts products only (bias, relu: none)
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = pass_flops(model, mlp_inputs(), frozenset({LOGITS}), train=True)
    assert f["fwd"] == 2 * B * (D0 * D1 + D1 * D2)
    # backward: layer 2's weight gradient and its input's gradient, layer 1's weight gradient only
    # (the inputs need no gradient, so PyTorch skips that product)
    assert f["bwd"] == 2 * B * D1 * D2 * 2 + 2 * B * D0 * D1
    # forward mode: the primal products plus both products of addmm's tangent formula per layer
    # (mat1_t @ mat2 + mat1 @ mat2_t; the inputs' tangent is zeros and still multiplied): 3 forwards
    assert f["jvp"] == 3 * f["fwd"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and all(p.grad is None for p in model.parameters())


def test_the_counter_counts_forwards_backwards_and_silenced_calls() -> None:
    model, counter = MLP(), PassCounter()
    counter.attach("student", model)
    x = mlp_inputs()
    model(x)  # not counting: nothing
    with counter.counting():
        out = model(x).logits
        torch.autograd.grad(out.sum(), list(model.parameters()), retain_graph=True)
        out.square().sum().backward()  # a second backward through the same forward
        with torch.no_grad():
            model(x)  # a forward with no graph: no backward can follow
        counter.counted_forward("student", lambda: model(x))()  # one forward, counted once
    assert counter.counts == {"student_fwd": 3, "student_bwd": 2, "student_jvp": 0, "student_decode": 0}


def test_total_flops_multiply_passes_and_say_unknown_as_none() -> None:
    passes = {"student_fwd": 10, "student_bwd": 10, "teacher_fwd": 10, "student_decode": 7}
    per = {"student_fwd": 100, "student_bwd": 180, "teacher_fwd": 400}
    assert total_flops(passes, per) == {"student_flops": 2800.0, "teacher_flops": 4000.0, "train_flops": 6800.0}
    assert total_flops({"teacher_bwd": 1}, per)["train_flops"] is None


# -------------------------------------------------------------------------- runs

STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """kd (teacher outputs shared and live), mlkd and metadistil (two quiz batches) on tiny CNNs, 3 steps."""
    tmp = tmp_path_factory.mktemp("compute")
    registry = get_registry()
    methods = [{"name": "kd"}, {"name": "mlkd"}, {"name": "metadistil", "params": {"teacher_lr": 0.001, "quiz_batches": 2}}]
    suite = build_suite(image_data(tmp / "images", methods=methods, seeds=[0],
                                   budget={"steps": STEPS, "batch_size": 16, "eval_every": STEPS, "log_every": 1}), registry=registry)
    out = {}
    for share in (True, False):
        runner = Runner(tmp, registry, device="cpu", progress=False, share_teacher_outputs=share)
        teacher = provide_teacher(suite.runs[0], tmp, open_store(tmp), registry, runner.device)
        for spec in suite.runs if not share else suite.runs[:1]:
            result = runner.run(spec, teacher)
            assert result.status == "done", result.error
            out[(spec.method, share)] = (spec, result)
    return out, suite, tmp


def per_step(result, key: str) -> float:
    return result.cost["passes"][key] / result.cost["steps"]


def test_kd_and_mlkd_make_one_teacher_forward_and_one_student_forward_and_backward_per_step(runs) -> None:
    out, _, _ = runs
    for key in (("kd", True), ("kd", False), ("mlkd", False)):  # a cached teacher output still counts as the teacher's forward
        passes = out[key][1].cost["passes"]
        assert passes == {"teacher_fwd": STEPS, "teacher_bwd": 0, "teacher_jvp": 0, "teacher_decode": 0,
                          "student_fwd": STEPS, "student_bwd": STEPS, "student_jvp": 0, "student_decode": 0}, key
    spec, result = out[("kd", False)]
    assert result.cost["steps"] == STEPS
    assert passes_equal_plan(spec, result)


def passes_equal_plan(spec, result) -> bool:
    method_cls = get_registry().method(spec.method)
    method = method_cls(method_cls.Params(**spec.params), Problem("classification", 100))
    planned = method.planned_passes(result.cost["steps"], spec.budget.batch_size, quiz_size=24)
    return {k: v for k, v in result.cost["passes"].items() if v} == {k: v for k, v in planned.items() if v}


def test_metadistil_makes_the_passes_it_documents(runs) -> None:
    out, _, _ = runs
    spec, result = out[("metadistil", False)]
    p, n, meta = result.cost["passes"], 2, STEPS - 1  # step 1 is a plain kd step; then meta steps with n quiz batches
    assert p["teacher_fwd"] == 1 + 2 * meta and p["teacher_bwd"] == meta
    assert p["student_fwd"] == 1 + (1 + n) * meta and p["student_bwd"] == 1 + (2 + n) * meta and p["student_jvp"] == meta
    assert passes_equal_plan(spec, result)


def test_stored_flops_are_the_passes_times_the_flops_of_one_pass_on_the_first_batch(runs) -> None:
    out, suite, tmp = runs
    spec, result = out[("metadistil", False)]
    cost = result.cost
    assert set(cost["pass_flops"]) == {"teacher_fwd", "teacher_bwd", "student_fwd", "student_bwd", "student_jvp"}
    assert cost["student_flops"] == sum(cost["passes"][k] * f for k, f in cost["pass_flops"].items() if k.startswith("student"))
    assert cost["train_flops"] == cost["student_flops"] + cost["teacher_flops"] > 0
    # kd's student and teacher passes cost what metadistil's do (same models, same first batch)
    kd = out[("kd", False)][1].cost["pass_flops"]
    assert all(cost["pass_flops"][k] == v for k, v in kd.items())
    # the counting is not preparation: it has its own field
    assert cost["count_s"] >= 0 and "prep_s" in cost


def test_counting_changes_no_result(runs) -> None:
    # the same spec trained again gives the same history (the FLOP counting forks the random state, copies buffers)
    out, suite, tmp = runs
    spec, result = out[("kd", False)]
    again = Runner(tmp, get_registry(), device="cpu", progress=False, share_teacher_outputs=False).run(
        spec, provide_teacher(spec, tmp, open_store(tmp), get_registry(), torch.device("cpu")))
    assert again.history == result.history and again.cost["passes"] == result.cost["passes"]


def test_cost_table_shows_counted_compute_and_a_dash_for_runs_without_it(runs, tmp_path) -> None:
    out, _, _ = runs
    store = open_store(tmp_path)
    rows = []
    for (method, share), (spec, result) in out.items():
        if share:
            continue
        cost = dict(result.cost)
        if method == "mlkd":  # as an older store recorded it: no compute fields
            cost = {k: v for k, v in cost.items() if k not in ("passes", "pass_flops", "train_flops", "teacher_flops", "student_flops")}
        store.claim(spec)
        store.finish(spec, "done", metrics=result.metrics, history=result.history, cost=cost, env=result.env)
        rows.append((method, result.cost))
    df = runs_frame(store.runs())
    table = cost_table(df, "kd")
    shown = cost_display(table, "kd").set_index("method")
    kd, md = dict(rows)["kd"], dict(rows)["metadistil"]
    assert table.set_index("method").loc["metadistil", "train_flops"] == md["train_flops"]
    assert shown.loc["kd", "passes per step"] == "T 1F; S 1F 1B"
    # metadistil over 3 steps: teacher (1 + 2*2)/3 fwd, 2/3 bwd; student (1 + 3*2)/3 fwd, (1 + 4*2)/3 bwd, 2/3 jvp
    assert shown.loc["metadistil", "passes per step"] == "T 1.67F 0.67B; S 2.33F 3B 0.67J"
    assert shown.loc["kd", "FLOPs teacher + student"] == f"{kd['train_flops']:.3g} ({kd['teacher_flops']:.3g} + {kd['student_flops']:.3g})"
    assert shown.loc["metadistil", "FLOPs vs kd"] == f"{md['train_flops'] / kd['train_flops']:.2f}x"
    assert shown.loc["mlkd", "passes per step"] == "-" and shown.loc["mlkd", "FLOPs teacher + student"] == "-"
    assert shown.loc["mlkd", "FLOPs vs kd"] == "n/a"


# -------------------------------------------------------------------------- compute budgets

def test_steps_for_a_flop_budget_follow_the_passes_planned_per_step() -> None:
    per = {"student_fwd": 10, "student_bwd": 20, "student_jvp": 30, "teacher_fwd": 100, "teacher_bwd": 200}
    kd_step = 10 + 20 + 100
    plan = lambda steps: {"student_fwd": steps, "student_bwd": steps, "teacher_fwd": steps}  # noqa: E731
    assert steps_for_flops(kd_step * 7, plan, per, 10**6) == 7 and steps_for_flops(kd_step * 7 - 1, plan, per, 10**6) == 6
    assert steps_for_flops(1, plan, per, 10**6) == 1  # a budget below one step still trains one
    with pytest.raises(ValueError, match="buys more than 100 steps"):
        steps_for_flops(kd_step * 101, plan, per, 100)
    # metadistil, teacher from step 2 (0-based 1), one quiz batch: a plain step costs 130, a meta step
    # teacher 2*100 + 200 and student 2*10 + 3*20 + 30: 510
    md = MetaDistil(MetaDistilParams(quiz_batches=1), Problem("classification", 4))
    plan_md = lambda steps: md.planned_passes(steps, 16, 0)  # noqa: E731
    assert steps_for_flops(130 + 3 * 510, plan_md, per, 10**6) == 4
    assert steps_for_flops(130 + 3 * 510 - 1, plan_md, per, 10**6) == 3


def test_a_flop_budget_trains_the_steps_it_buys(tmp_path, runs) -> None:
    out, _, _ = runs
    kd = out[("kd", False)][1].cost["pass_flops"]
    per_step = kd["student_fwd"] + kd["student_bwd"] + kd["teacher_fwd"]
    registry = get_registry()
    suite = build_suite(image_data(tmp_path / "images", methods=[{"name": "kd"}], seeds=[0],
                                   budget={"flops": per_step * 4.5, "batch_size": 16, "log_every": 1}), registry=registry)
    spec = suite.runs[0]
    runner = Runner(tmp_path, registry, device="cpu", progress=False, share_teacher_outputs=False)
    result = runner.run(spec, provide_teacher(spec, tmp_path, open_store(tmp_path), registry, runner.device))
    assert result.status == "done", result.error
    assert result.cost["steps"] == 4 and result.history[-1]["step"] == 4
    assert result.cost["train_flops"] == 4 * per_step <= spec.budget.flops
    # the budget is in the spec (hashed), the steps it bought are not
    dumped = json.loads(spec.model_dump_json())["budget"]
    assert dumped["flops"] == per_step * 4.5 and dumped["steps"] is None


def test_flops_field_leaves_existing_budgets_and_hashes_alone() -> None:
    from kdbench.spec import Budget

    assert "flops" not in Budget(steps=10).model_dump() and Budget(flops=1e9).model_dump()["flops"] == 1e9


def test_on_policy_generation_counts_its_decode_steps_apart_from_forwards() -> None:
    from kdbench.generation import decode
    from kdbench_plugins.methods.rkl import ReverseKLOnPolicy
    from test_lm_methods import setup

    method, ctx, batch = setup(ReverseKLOnPolicy, max_new_tokens=5)
    g = torch.Generator().manual_seed(0)
    g.set_state(ctx.generator("rkl-samples").get_state())
    expected = decode(ctx.student.lm, batch.inputs["prompt_ids"], batch.inputs["prompt_mask"], 5, 2, 0, greedy=False, generator=g)
    counter = PassCounter()
    counter.attach("student", ctx.student)
    counter.attach("teacher", ctx.teacher)
    ctx.passes, ctx.teacher_forward = counter, counter.counted_forward("teacher", ctx.teacher_forward)
    with counter.counting():
        method.train_step(ctx, batch)
    # one decode step per generated position, then the loss's one student forward and backward on the samples
    assert counter.counts["student_decode"] == expected.tokens.shape[1] >= 1
    assert (counter.counts["student_fwd"], counter.counts["student_bwd"], counter.counts["teacher_fwd"]) == (1, 1, 1)


def counted_step(method, ctx, batch) -> dict[str, int]:
    """The passes of one ``method.train_step`` as the runner counts them."""
    counter = PassCounter()
    counter.attach("student", ctx.student)
    counter.attach("teacher", ctx.teacher)
    ctx.passes, ctx.teacher_forward = counter, counter.counted_forward("teacher", ctx.teacher_forward)
    with counter.counting():
        method.train_step(ctx, batch)
    return {k: v for k, v in counter.counts.items() if v}


def test_prokt_and_seqkd_make_the_passes_they_plan() -> None:
    from kdbench_plugins.methods.prokt import ProKT
    from kdbench_plugins.methods.seqkd import SeqKD
    from support.helpers_models import image_batch, make_ctx, tiny_cnn
    from test_lm_methods import setup

    problem = Problem("classification", 2)
    student, teacher = tiny_cnn((3,), problem, seed=1), tiny_cnn((4,), problem, seed=2)
    teacher.requires_grad_(True)
    method = ProKT(ProKT.Params(teacher_init="finetuned"), problem)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.01), problem=problem)
    method.setup(ctx)
    # the teacher's step backpropagates into the teacher only (the student's logits detached)
    assert counted_step(method, ctx, image_batch()) == method.planned_passes(1, 4, 0) == {
        "student_fwd": 1, "student_bwd": 1, "teacher_fwd": 2, "teacher_bwd": 1}
    seqkd, ctx, batch = setup(SeqKD, max_new_tokens=4)  # the teacher decoded in setup: no teacher pass per step
    assert counted_step(seqkd, ctx, batch) == seqkd.planned_passes(1, 4, 0) == {"student_fwd": 1, "student_bwd": 1}


def test_metadistil_with_a_late_teacher_and_warm_steps_makes_the_passes_it_plans() -> None:
    # teacher_start 0.5 of 8 steps with 2 warm steps: steps 0-1 plain, 2-7 meta (6 of them); a whole quiz pass of 2 batches
    from support.helpers_models import image_batch, make_ctx, tiny_cnn

    problem = Problem("classification", 2)
    student, teacher = tiny_cnn((3,), problem, seed=1), tiny_cnn((4,), problem, seed=2)
    teacher.requires_grad_(True)
    method = MetaDistil(MetaDistilParams(teacher_start=0.5, teacher_warm_steps=2, quiz_batches="all", teacher_lr=0.01), problem)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.01), quiz=image_batch(seed=9), problem=problem,
                   total_steps=8)
    ctx.quiz_size = 9  # two batches of 4
    method.setup(ctx)
    counter = PassCounter.of(student=student, teacher=teacher)
    ctx.passes, ctx.teacher_forward = counter, counter.counted_forward("teacher", ctx.teacher_forward)
    for step in range(8):
        ctx.step = step
        with counter.counting():
            method.train_step(ctx, image_batch(seed=step))
    counted = {k: v for k, v in counter.counts.items() if v}
    assert counted == method.planned_passes(8, 4, 9) == {"teacher_fwd": 2 + 6 * 2, "teacher_bwd": 6, "student_fwd": 2 + 6 * 3,
                                                         "student_bwd": 2 + 6 * 4, "student_jvp": 6}
