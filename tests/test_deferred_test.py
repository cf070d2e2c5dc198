"""``budget.test_every_eval: false``: the test split is scored only at the evaluation a run
reports; training, validation scores and the reported metrics are those of the default
(every split scored at every evaluation), run for run."""

from __future__ import annotations

import pytest

from kdbench.executors.phases import open_store
from kdbench.registry import Registry
from kdbench.spec import build_suite
from kdbench.train import Runner
from kdbench.train.teachers import provide_teacher
from support.suites import smoke_data


@pytest.fixture(scope="module")
def registry(fault_registry) -> Registry:
    return fault_registry


@pytest.fixture(scope="module")
def trained(tmp_path_factory, registry):
    """A runner and the smoke suite's teacher, fine-tuned once for the module (the
    teacher's hash does not depend on the students' budget or selection)."""
    folder = tmp_path_factory.mktemp("deferred")
    (spec, *_) = build_suite(smoke_data(methods=[{"name": "kd"}], seeds=[0]), registry=registry).runs
    runner = Runner(folder, registry, device="cpu", progress=False)
    return runner, provide_teacher(spec, folder, open_store(folder), registry, runner.device)


def pair(trained, registry, method: dict, selection: str, eval_every: int, seed: int = 1, **changes):
    """The same run with every split scored at every evaluation and with test deferred."""
    runs = []
    for test_every_eval in (True, False):
        budget = {"steps": 12, "batch_size": 16, "eval_every": eval_every, "log_every": 3}
        if not test_every_eval:
            budget["test_every_eval"] = False
        (spec,) = build_suite(smoke_data(budget=budget, methods=[method], seeds=[seed], selection=selection, **changes),
                              registry=registry).runs
        runs.append(spec)
    runner, teacher = trained
    assert teacher.hash == runs[0].teacher_hash
    results = [runner.run(spec, teacher) for spec in runs]
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    return runs, results


def test_the_default_keeps_run_hashes_and_deferring_changes_them(registry):
    """The field is left out of the hashed spec at its default (stored runs keep their
    hashes; tests/test_method_hashes.py checks the committed stores), and hashed otherwise."""
    budget = {"steps": 12, "batch_size": 16, "eval_every": 4, "log_every": 3}
    plain, explicit, deferred = (build_suite(smoke_data(budget=b, methods=[{"name": "kd"}], seeds=[0]), registry=registry).runs[0]
                                 for b in (budget, {**budget, "test_every_eval": True}, {**budget, "test_every_eval": False}))
    assert "test_every_eval" not in plain.identity()["budget"]
    assert plain.hash == explicit.hash != deferred.hash
    assert deferred.identity()["budget"]["test_every_eval"] is False


@pytest.mark.parametrize("method", [{"name": "kd"}, {"name": "metadistil", "params": {"quiz_batches": 1}}], ids=["kd", "metadistil"])
def test_final_selection_scores_test_once_at_the_end_with_the_same_training(trained, registry, method):
    _, (every, deferred) = pair(trained, registry, method, "final", eval_every=4)
    assert [h["step"] for h in deferred.history] == [h["step"] for h in every.history] == [4, 8, 12]
    for a, b in zip(every.history, deferred.history):
        assert b["validation"] == a["validation"]  # the same student at every evaluation
        assert b.get("teacher") == a.get("teacher")  # MetaDistil's live-teacher drift: still at every evaluation
    assert ["test" in h for h in deferred.history] == [False, False, True]
    assert deferred.history[-1]["test"] == every.history[-1]["test"]
    assert deferred.metrics == every.metrics and deferred.metrics["test"] == every.history[-1]["test"]


def test_validation_selection_scores_the_best_validation_weights_on_test(trained, registry):
    """Evaluations every 2 steps at a constant lr of 0.01: the best validation score falls at
    step 6 for seed 0 here, so the kept weights (not the last ones) are scored on test."""
    _, (every, deferred) = pair(trained, registry, {"name": "kd"}, "validation", eval_every=2, seed=0,
                                optimizer={"name": "adamw", "lr": 0.01, "schedule": "constant"})
    chosen = every.metrics["step"]
    assert chosen != 12, "the check needs a best-validation step before the end"
    assert [h["validation"] for h in deferred.history] == [h["validation"] for h in every.history]
    assert [h["step"] for h in deferred.history if "test" in h] == [chosen]
    chosen_every = next(h for h in every.history if h["step"] == chosen)
    assert next(h for h in deferred.history if h["step"] == chosen)["test"] == chosen_every["test"]
    assert deferred.metrics == every.metrics
    # the last weights score differently on test from the chosen ones: restoring them mattered
    assert every.history[-1]["test"] != chosen_every["test"]
