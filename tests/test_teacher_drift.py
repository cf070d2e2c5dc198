"""Teacher drift (issue 12 items 10-11): runs of teacher-updating methods record, at every
evaluation, the live teacher's validation metrics and its divergence from the starting
teacher; the report shows them per step and says when validation and test disagree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdbench.executor import open_store, run_local
from kdbench.registry import Registry
from kdbench.spec import build_suite
from kdbench.train.evaluation import LIVE_TEACHER, TEACHER, divergence, select_metrics
from support.suites import smoke_data


@pytest.fixture(scope="module")
def registry(fault_registry) -> Registry:
    return fault_registry


def suite_data(**changes) -> dict:
    return smoke_data(budget={"steps": 12, "batch_size": 16, "eval_every": 6, "log_every": 3}, seeds=[0], **changes)


def run_suite(tmp_path, registry, methods: list[dict], **changes) -> tuple[list[dict], list[dict]]:
    """(run rows, teacher rows) of a tiny suite of ``methods``, trained in ``tmp_path``."""
    suite = build_suite(suite_data(methods=methods, **changes), registry=registry)
    run_local(suite, tmp_path, registry=registry, progress=False)
    store = open_store(tmp_path)
    rows = store.runs([r.hash for r in suite.runs])
    assert [r["status"] for r in rows] == ["done"] * len(suite.runs), [r["error"] for r in rows]
    return rows, store.teachers()


# ------------------------------------------------------------------------ the divergence


def test_kl_divergence_matches_a_hand_computation():
    start = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    now = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    by_hand = []
    for a, b in zip(start.tolist(), now.tolist()):
        p = np.exp(a) / np.exp(a).sum()
        q = np.exp(b) / np.exp(b).sum()
        by_hand.append(float(np.sum(p * np.log(p / q))))
    value, kind = divergence(start, now, regression=False)
    assert kind == "kl" and value == pytest.approx(np.mean(by_hand), rel=1e-12)
    assert divergence(start, start, regression=False) == (0.0, "kl")
    # KL(p_start || p_now), not the reverse
    assert value != pytest.approx(divergence(now, start, regression=False)[0], rel=1e-3)


def test_regression_divergence_is_the_mean_squared_difference():
    start, now = torch.tensor([[1.0], [2.0], [-1.0]]), torch.tensor([[1.5], [0.0], [-1.0]])
    assert divergence(start, now, regression=True) == (pytest.approx((0.25 + 4.0 + 0.0) / 3, rel=1e-12), "mse")


# ------------------------------------------------------------------------ the runner


def test_a_fixed_teacher_does_not_drift_and_scores_like_the_fine_tuned_one(tmp_path, registry):
    (row,), (teacher,) = run_suite(tmp_path, registry, [{"name": "metadistil", "params": {"teacher_lr": 0.0}}])
    assert [h["step"] for h in row["history"]] == [6, 12]
    for h in row["history"]:
        entry = h[TEACHER]
        assert set(entry) == {"validation", "divergence", "divergence_kind", "start_validation"}
        assert entry["divergence"] == 0.0 and entry["divergence_kind"] == "kl"
        assert entry["validation"] == pytest.approx(teacher["metrics"]["validation"], abs=1e-12)
        assert entry["start_validation"] == entry["validation"]
    # the chosen metrics gain no split; the chosen evaluation's teacher entry has its own key
    assert row["metrics"][LIVE_TEACHER] == row["history"][-1][TEACHER]
    assert {k for k, v in row["metrics"].items() if isinstance(v, dict)} == {"validation", "test", LIVE_TEACHER}


def test_a_trained_teacher_drifts(tmp_path, registry):
    (row,), (teacher,) = run_suite(tmp_path, registry, [{"name": "metadistil", "params": {"teacher_lr": 0.01, "virtual_lr": 0.01}}])
    first, last = (h[TEACHER] for h in row["history"])
    assert 0.0 < first["divergence"] and 0.0 < last["divergence"]
    assert first["start_validation"] == pytest.approx(teacher["metrics"]["validation"], abs=1e-12)
    assert row["cost"]["eval_s"] > 0


def test_prokt_drift_is_measured_from_its_re_initialised_start(tmp_path, registry):
    """ProKT replaces the teacher's weights in setup (teacher_init pretrained): the start is
    taken after setup, so a teacher that never steps has not drifted."""
    (row,), (teacher,) = run_suite(tmp_path, registry, [{"name": "prokt", "params": {"teacher_lr": 0.0}}])
    for h in row["history"]:
        assert h[TEACHER]["divergence"] == 0.0
        assert h[TEACHER]["validation"] == h[TEACHER]["start_validation"]
    (moved,), _ = run_suite(tmp_path / "moving", registry, [{"name": "prokt", "params": {"teacher_lr": 0.01}}])
    assert all(h[TEACHER]["divergence"] > 0 for h in moved["history"])


def test_a_regression_teacher_drift_is_an_mse(tmp_path, registry):
    tasks = [{"name": "movie-rating", "options": {"train_size": 300, "max_length": 32}}]
    (row,), _ = run_suite(tmp_path, registry, [{"name": "metadistil", "params": {"teacher_lr": 0.01, "virtual_lr": 0.01}}], tasks=tasks)
    entry = row["history"][-1][TEACHER]
    assert entry["divergence_kind"] == "mse" and entry["divergence"] > 0
    assert set(entry["validation"]) == set(row["metrics"]["validation"])


def test_runs_of_other_methods_record_no_teacher(tmp_path, registry):
    rows, _ = run_suite(tmp_path, registry, [{"name": "none"}, {"name": "kd"}])
    for row in rows:
        assert [set(h) for h in row["history"]] == [{"step", "validation", "test"}] * 2
        assert set(row["metrics"]) == {"step", "selection", "main_metric", "validation", "test"}


def test_selection_never_picks_the_teacher_entry_as_a_split():
    history = [{"step": 5, "validation": {"accuracy": 0.7}, "test": {"accuracy": 0.6},
                TEACHER: {"validation": {"accuracy": 0.9}, "divergence": 0.1, "divergence_kind": "kl"}},
               {"step": 10, "validation": {"accuracy": 0.6}, "test": {"accuracy": 0.65},
                TEACHER: {"validation": {"accuracy": 0.8}, "divergence": 0.2, "divergence_kind": "kl"}}]
    chosen = select_metrics(history, "validation", "accuracy")
    assert chosen["step"] == 5 and TEACHER not in chosen and chosen[LIVE_TEACHER]["divergence"] == 0.1
    assert json.loads(json.dumps(chosen)) == chosen
