"""The runner: determinism, seeds, quiz split, teacher cache, shared teacher outputs,
divergence and failure handling, validation-based selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.data import QUIZ, TRAIN, load_task_data, quiz_split
from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.registry import Registry
from kdbench.spec import build_suite
from kdbench.train import Runner, predict, select_metrics
from kdbench.train import teachers as teachers_mod
from kdbench.train.inputs import encoded_splits
from kdbench.train.teachers import provide_teacher
from support.suites import smoke_data


@pytest.fixture(scope="module")
def registry(fault_registry) -> Registry:
    return fault_registry


def suite_data(**changes) -> dict:
    return smoke_data(budget={"steps": 12, "batch_size": 16, "eval_every": 6, "log_every": 3}, **changes)


def runner_and_teacher(tmp_path, registry, spec):
    """A runner and the teacher checkpoint of ``spec``'s suite (the teachers-first phase)."""
    runner = Runner(tmp_path, registry, device="cpu", progress=False)
    return runner, provide_teacher(spec, tmp_path, open_store(tmp_path), registry, runner.device)


def test_quiz_split_is_fixed_disjoint_and_sized():
    train, quiz = quiz_split(1000, 0.1, data_seed=0)
    assert len(quiz) == 100 and len(train) == 900
    assert not set(train) & set(quiz) and set(train) | set(quiz) == set(range(1000))
    again, quiz_again = quiz_split(1000, 0.1, data_seed=0)
    assert np.array_equal(quiz, quiz_again)
    assert not np.array_equal(quiz, quiz_split(1000, 0.1, data_seed=1)[1])
    assert len(quiz_split(1000, 0.0, 0)[1]) == 0


def test_same_spec_same_metrics_other_seed_other_metrics(tmp_path, registry):
    suite = build_suite(suite_data(methods=[{"name": "kd"}], seeds=[0, 1]), registry=registry)
    a, b = suite.runs
    runner, teacher = runner_and_teacher(tmp_path, registry, a)
    first, again, other = runner.run(a, teacher), runner.run(a, teacher), runner.run(b, teacher)
    assert first.status == again.status == other.status == "done", first.error
    assert first.history == again.history
    assert first.metrics == again.metrics
    assert first.history != other.history
    # evaluations at the fixed points and the end; budget counted in optimizer steps
    assert [h["step"] for h in first.history] == [6, 12]
    assert first.cost["steps"] == 12
    assert set(first.history[0]) == {"step", "validation", "test"}


def test_teacher_trained_once_and_reused(tmp_path, registry, monkeypatch):
    suite = build_suite(suite_data(seeds=[0, 1]), registry=registry)
    outcome = run_local(suite, tmp_path, registry=registry, progress=False)
    assert sorted(outcome.statuses.values()) == ["done"] * 4
    store = open_store(tmp_path)
    (teacher,) = store.teachers()
    # stored relative to the results folder, so the folder can be moved
    assert teacher["path"] == f"teachers/{teacher['hash']}/model.safetensors" and (tmp_path / teacher["path"]).is_file()
    assert teacher["metrics"]["test"]["accuracy"] > 0
    monkeypatch.setattr(teachers_mod, "fine_tune_teacher", lambda *a: pytest.fail("teacher trained twice"))
    again = build_suite(suite_data(seeds=[2], methods=[{"name": "kd"}]), registry=registry)
    assert list(run_local(again, tmp_path, registry=registry, progress=False).statuses.values()) == ["done"]
    # running the same suite again trains nothing
    outcome = run_local(suite, tmp_path, registry=registry, progress=False)
    assert outcome.trained == [] and len(outcome.skipped) == 4


def test_shared_teacher_outputs_equal_live_teacher(tmp_path, registry):
    data = suite_data(methods=[{"name": "kd"}, {"name": "kd-live"}], seeds=[3])
    suite = build_suite(data, registry=registry)
    shared_spec, live_spec = suite.runs
    runner, checkpoint = runner_and_teacher(tmp_path, registry, shared_spec)
    shared, live = runner.run(shared_spec, checkpoint), runner.run(live_spec, checkpoint)
    assert shared.cost["shared_teacher_outputs"] and not live.cost["shared_teacher_outputs"]
    for h_shared, h_live in zip(shared.history, live.history):
        for split in ("validation", "test"):
            assert h_shared[split]["accuracy"] == pytest.approx(h_live[split]["accuracy"], abs=1e-9)
    # and the cached logits are the teacher's live logits
    tdata = load_task_data(registry, shared_spec.task, shared_spec.quiz_fraction, shared_spec.data_seed)
    teacher = teachers_mod.load_teacher(checkpoint, shared_spec, registry, tdata, runner.device)
    key = teachers_mod.logits_inputs(checkpoint, shared_spec, registry, tdata)
    cached = teachers_mod.shared_train_logits(checkpoint, lambda: pytest.fail("logits computed twice"), key)
    factory, encoded = encoded_splits(registry, shared_spec, tdata, shared_spec.teacher, [TRAIN])
    live_logits = predict(teacher, factory, encoded[TRAIN], 7, torch.device("cpu"))  # other batching
    torch.testing.assert_close(cached, live_logits, atol=1e-5, rtol=1e-5)


def test_quiz_data_never_trains_any_method(tmp_path, registry):
    suite = build_suite(suite_data(), registry=registry)
    spec = suite.runs[0]
    data = load_task_data(registry, spec.task, spec.quiz_fraction, spec.data_seed)
    train_texts, quiz_texts = set(data.splits[TRAIN]["text"]), set(data.splits[QUIZ]["text"])
    assert len(data.splits[QUIZ]["label"]) == round(0.1 * 400)
    assert len(data.splits[TRAIN]["label"]) == 400 - 40
    assert len(quiz_texts - train_texts) > 0.9 * len(quiz_texts)  # only duplicate snippets overlap


def test_diverged_and_failed_runs_are_recorded_and_the_suite_goes_on(tmp_path, registry):
    data = suite_data(methods=[{"name": "nan-at-3"}, {"name": "raises"}, {"name": "none"}], seeds=[0])
    outcome = run_local(build_suite(data, registry=registry), tmp_path, registry=registry, progress=False)
    rows = {r["method"]: r for r in open_store(tmp_path).runs()}
    assert rows["nan-at-3"]["status"] == "diverged" and rows["nan-at-3"]["diverged_step"] == 3
    assert "nan" in rows["nan-at-3"]["error"]
    assert rows["raises"]["status"] == "failed"
    assert "ValueError: deliberate failure in a method" in rows["raises"]["error"]
    assert "Traceback" in rows["raises"]["error"]
    assert rows["none"]["status"] == "done"
    assert len(outcome.trained) == 3


def test_selection_uses_validation_never_test():
    history = [
        {"step": 5, "validation": {"accuracy": 0.7}, "test": {"accuracy": 0.9}},
        {"step": 10, "validation": {"accuracy": 0.8}, "test": {"accuracy": 0.6}},
        {"step": 15, "validation": {"accuracy": 0.8}, "test": {"accuracy": 0.5}},
    ]
    final = select_metrics(history, "final", "accuracy")
    assert final["step"] == 15 and final["test"]["accuracy"] == 0.5
    chosen = select_metrics(history, "validation", "accuracy")
    assert chosen["step"] == 10 and chosen["test"]["accuracy"] == 0.6  # earliest best validation


def test_cost_records_the_runs_own_memory_and_the_new_fields(tmp_path, registry):
    """Issue 11 item 3: two identical runs in a row report memory within 25% (the run's own
    peak over its own baseline, not the process's high-water mark), plus preparation time,
    the step-time spread, deployed vs training parameters and the data fingerprints."""
    # a student large enough that its optimizer state and activations, not one-off
    # allocations of the process, make up its memory
    student = {"model": "bert", "options": {"tiny": {"layers": 2, "hidden": 256, "heads": 4, "intermediate": 1024}}, "label": "wide"}
    # one evaluation, at the end: the peak (optimizer state, activations, evaluation batches)
    # comes with the first steps and the evaluation, not with more of either
    budget = {"steps": 6, "batch_size": 16, "eval_every": 6, "log_every": 3}
    suite = build_suite(smoke_data(budget=budget, methods=[{"name": "kd"}], seeds=[0], students=[student]), registry=registry)
    (spec,) = suite.runs
    # The first run of a process also pays the process's one-off allocations (thread pools,
    # kernel caches: about 15 MB seen here), which later runs reuse; the README says so.
    # Two identical runs after it must agree, measured in a process of their own (this
    # test process's heap, fragmented by earlier tests, adds its own noise). The new cost
    # fields are checked on that process's first run (one run and one teacher fewer to
    # train than checking them on a run in this process: each run evaluates 2,000 snippets
    # with the wide student, most of its time).
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        first, costs = pool.apply(_costs_of_runs, (str(tmp_path), spec.model_dump(mode="json"), 3))
    a = costs[0]
    assert a["mem_kind"] == "cpu_rss_increase" and a["mem_mb"] > 0
    mems = [c["mem_mb"] for c in costs]
    second, third = mems[1:]
    # glibc's allocator keeps a varying share of freed blocks in its heap (its mmap threshold
    # moves with the sizes freed), so identical runs of this size measure 207-273 MB (12 runs
    # in 3 processes; 117 MB +- 1% with the threshold pinned, at +45% step time). Since a step
    # frees its gradients right after the optimizer step (issue 33) they measure 163-244 MB
    # (15 runs in 3 processes at 6149aee), two runs of one process up to 30% apart (236 vs
    # 165 in one full test run): within 40% of each other. The process's high-water mark
    # instead (the bug this guards) gives a later run of the same size an increase near 0,
    # which the second assertion catches.
    assert abs(second - third) <= 0.40 * max(second, third), mems
    assert min(second, third) >= 0.5 * max(mems), mems
    assert a["prep_s"] > 0 and a["step_s_q25"] <= a["step_s_median"] <= a["step_s_q75"]
    assert a["params_deployed"] == sum(p.numel() for p in _student(registry, spec).parameters())
    assert a["params_training"] == a["student_params"] >= a["params_deployed"]
    assert first["env"]["data"] == getattr(load_task_data(registry, spec.task, spec.quiz_fraction, spec.data_seed), "fingerprints", None)


def _costs_of_runs(folder: str, spec_json: dict, n: int) -> tuple[dict, list[dict]]:
    """The first of ``n`` identical runs of one spec in this (fresh) process (its result's
    fields) and the ``cost`` of each."""
    from dataclasses import asdict
    from pathlib import Path

    from kdbench.registry import make_plugin_manager
    from kdbench.spec import RunSpec

    torch.set_num_threads(1)
    registry = Registry(*make_plugin_manager(extra_plugins=["support.fault_methods", "support.fault_models"]))
    spec = RunSpec.model_validate(spec_json)
    runner, teacher = runner_and_teacher(Path(folder), registry, spec)
    results = [runner.run(spec, teacher) for _ in range(n)]
    return asdict(results[0]), [r.cost for r in results]


def test_training_only_modules_count_in_params_training_not_params_deployed(tmp_path, registry):
    """params_training includes the method's extra modules (TinyBERT's projections); params_deployed does not."""
    suite = build_suite(suite_data(methods=[{"name": "tinybert"}], seeds=[0]), registry=registry)
    (spec,) = suite.runs
    runner, teacher = runner_and_teacher(tmp_path, registry, spec)
    cost = runner.run(spec, teacher).cost
    assert cost["params_training"] > cost["params_deployed"]


def _student(registry, spec):
    from kdbench.train.inputs import model_factory

    factory, options = model_factory(registry, spec.student)
    data = load_task_data(registry, spec.task, spec.quiz_fraction, spec.data_seed)
    return factory.build(options, data.task.problem)


def test_grad_clip_scales_the_step_to_the_clipped_norm():
    """optimizer.grad_clip: a plain SGD step (lr 1, no momentum) moves the weights by the
    gradient rescaled to norm ``grad_clip`` (gradient of norm 5 -> step of norm 0.5)."""
    from kdbench.spec import OptimizerSpec
    from kdbench.train.optim import build_optimizer

    w = torch.nn.Parameter(torch.zeros(2))
    opt, _ = build_optimizer([w], OptimizerSpec(name="sgd", lr=1.0, momentum=0.0, schedule="constant", grad_clip=0.5), 1, 1, False)
    w.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([-0.3, -0.4]), atol=1e-6)


def test_teachers_first_trains_the_unclaimed_teacher_while_another_process_trains_the_first(tmp_path, registry, monkeypatch):
    """Two processes on one suite: a teacher another live process holds is passed over,
    the next one is trained here, and only then is the first waited for (here: its owner
    dies, so this process takes it over)."""
    import socket
    import subprocess

    import kdbench.executors.phases as executor_mod
    import kdbench.store as store_mod

    data = suite_data(tasks=[{"name": "movie-sentiment", "options": {"train_size": 200, "max_length": 24}},
                             {"name": "movie-rating", "options": {"train_size": 200, "max_length": 24}}],
                      methods=[{"name": "kd", "params": {"alpha": 0.5, "temperature": 2.0}}], seeds=[0])
    data["teacher"]["train"]["budget"] = {"steps": 4, "batch_size": 16, "eval_every": 4}
    suite = build_suite(data, registry=registry)
    first, second = [s for s in suite.runs if s.task.name == "movie-sentiment"][0], [s for s in suite.runs if s.task.name == "movie-rating"][0]
    assert first.teacher_hash != second.teacher_hash
    store = open_store(tmp_path)
    other = subprocess.Popen(["sleep", "120"])  # a live process that "holds" the first teacher
    try:
        monkeypatch.setattr(store_mod, "owner_id", lambda: f"{socket.gethostname()}:{other.pid}")
        assert store.claim_teacher(first.teacher_hash, first.task.name, first.teacher.model_dump(mode="json"))
        monkeypatch.undo()
        calls = []
        real = executor_mod.provide_teacher

        def spy(spec, *args, wait=True, **kwargs):
            calls.append((spec.teacher_hash, wait, store.teacher(second.teacher_hash)["status"] if store.teacher(second.teacher_hash) else None))
            if spec.teacher_hash == first.teacher_hash and wait:
                other.kill()  # the holder dies: the waiting pass takes the teacher over
                other.wait()
            return real(spec, *args, wait=wait, **kwargs)

        monkeypatch.setattr(executor_mod, "provide_teacher", spy)
        runner = Runner(tmp_path, registry, device="cpu", progress=False)
        ready, failed = executor_mod.teachers_first(runner, store, suite.runs)
    finally:
        other.kill()
    assert failed == {} and set(ready) == {first.teacher_hash, second.teacher_hash}
    # first pass: the held teacher is skipped (not waited for), the free one trained; then the wait
    assert calls == [(first.teacher_hash, False, None), (second.teacher_hash, False, None), (first.teacher_hash, True, "done")]
    assert store.teacher(first.teacher_hash)["status"] == "done"


def test_run_local_trains_the_runs_whose_teacher_is_ready_before_waiting_for_a_held_one(tmp_path, registry, monkeypatch):
    import socket
    import subprocess

    import kdbench.executors.phases as executor_mod
    import kdbench.store as store_mod

    data = suite_data(tasks=[{"name": "movie-sentiment", "options": {"train_size": 200, "max_length": 24}},
                             {"name": "movie-rating", "options": {"train_size": 200, "max_length": 24}}],
                      methods=[{"name": "kd", "params": {"alpha": 0.5, "temperature": 2.0}}], seeds=[0])
    data["teacher"]["train"]["budget"] = {"steps": 4, "batch_size": 16, "eval_every": 4}
    suite = build_suite(data, registry=registry)
    first = next(s for s in suite.runs if s.task.name == "movie-sentiment")
    later = next(s for s in suite.runs if s.task.name == "movie-rating")
    assert suite.runs.index(first) < suite.runs.index(later)  # suite order: the held teacher's run comes first
    store = open_store(tmp_path)
    other = subprocess.Popen(["sleep", "120"])
    try:
        monkeypatch.setattr(store_mod, "owner_id", lambda: f"{socket.gethostname()}:{other.pid}")
        assert store.claim_teacher(first.teacher_hash, first.task.name, first.teacher.model_dump(mode="json"))
        monkeypatch.undo()
        seen = []
        real = executor_mod.provide_teacher

        def spy(spec, *args, wait=True, **kwargs):
            if spec.teacher_hash == first.teacher_hash and wait:
                seen.append({r["task"]: r["status"] for r in store.runs()})
                other.kill()
                other.wait()
            return real(spec, *args, wait=wait, **kwargs)

        monkeypatch.setattr(executor_mod, "provide_teacher", spy)
        outcome = run_local(suite, tmp_path, registry=registry, progress=False)
    finally:
        other.kill()
    assert seen == [{"movie-rating": "done"}]  # the free task's run was trained before the wait
    assert sorted(outcome.trained) == sorted(s.hash for s in suite.runs)
    assert {r["task"]: r["status"] for r in store.runs()} == {"movie-sentiment": "done", "movie-rating": "done"}


def test_provide_teacher_without_wait_returns_none_while_a_live_process_holds_the_teacher(tmp_path, registry, monkeypatch):
    import os
    import socket

    import kdbench.store as store_mod

    spec = next(s for s in build_suite(suite_data(), registry=registry).runs if s.teacher_hash)
    store = open_store(tmp_path)
    monkeypatch.setattr(store_mod, "owner_id", lambda: f"{socket.gethostname()}:{os.getppid()}")  # the parent: alive
    assert store.claim_teacher(spec.teacher_hash, spec.task.name, spec.teacher.model_dump(mode="json"))
    monkeypatch.undo()
    runner = Runner(tmp_path, registry, device="cpu", progress=False)
    assert provide_teacher(spec, tmp_path, store, registry, runner.device, wait=False) is None
    assert store.teacher(spec.teacher_hash)["status"] == "running" and not (tmp_path / "teachers").exists()
