"""Teacher drift (issue 12 items 10-11): runs of teacher-updating methods record, at every
evaluation, the live teacher's validation metrics and its divergence from the starting
teacher; the report shows them per step and says when validation and test disagree."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.registry import Registry
from kdbench.spec import build_suite
from kdbench.train.evaluation import LIVE_TEACHER, METRIC_INFO, TEACHER, divergence, select_metrics
from support.suites import smoke_data


@pytest.fixture(scope="module")
def registry(fault_registry) -> Registry:
    return fault_registry


def suite_data(**changes) -> dict:
    return smoke_data(**({"budget": {"steps": 12, "batch_size": 16, "eval_every": 6, "log_every": 3}, "seeds": [0]} | changes))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One results folder for the runner tests, so each task's teacher is trained once."""
    return tmp_path_factory.mktemp("drift-runs")


def run_suite(results, registry, methods: list[dict], **changes) -> tuple[list[dict], dict]:
    """(run rows, their teacher's row) of a tiny suite of ``methods``, trained in ``results``."""
    suite = build_suite(suite_data(methods=methods, **changes), registry=registry)
    run_local(suite, results, registry=registry, progress=False)
    store = open_store(results)
    rows = store.runs([r.hash for r in suite.runs])
    assert [r["status"] for r in rows] == ["done"] * len(suite.runs), [r["error"] for r in rows]
    (teacher,) = [t for t in store.teachers() if t["hash"] == suite.runs[0].teacher_hash]
    return rows, teacher


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


def test_a_fixed_teacher_does_not_drift_and_scores_like_the_fine_tuned_one(results, registry):
    (row,), teacher = run_suite(results, registry, [{"name": "metadistil", "params": {"teacher_lr": 0.0}}])
    assert [h["step"] for h in row["history"]] == [6, 12]
    for h in row["history"]:
        entry = h[TEACHER]
        assert set(entry) == {"validation", "divergence", "divergence_kind", "start_validation"}
        assert entry["divergence"] == 0.0 and entry["divergence_kind"] == "kl"
        assert entry["validation"] == pytest.approx(teacher["metrics"]["validation"], abs=1e-12)
        assert entry["start_validation"] == entry["validation"]
    # the chosen metrics gain no split; the chosen evaluation's teacher entry has its own key
    assert row["metrics"][LIVE_TEACHER] == row["history"][-1][TEACHER]
    assert {k for k, v in row["metrics"].items() if isinstance(v, dict)} == {"validation", "test", LIVE_TEACHER, METRIC_INFO}


def test_a_trained_teacher_drifts(results, registry):
    (row,), teacher = run_suite(results, registry, [{"name": "metadistil", "params": {"teacher_lr": 0.01, "virtual_lr": 0.01}}])
    first, last = (h[TEACHER] for h in row["history"])
    assert 0.0 < first["divergence"] and 0.0 < last["divergence"]
    assert first["start_validation"] == pytest.approx(teacher["metrics"]["validation"], abs=1e-12)
    assert row["cost"]["eval_s"] > 0


def test_logging_the_teacher_changes_none_of_the_students_numbers(results, registry, monkeypatch):
    from kdbench.train import Runner
    from kdbench.train.teachers import provide_teacher

    methods = [{"name": "metadistil", "params": {"teacher_lr": 0.01, "virtual_lr": 0.01}}]
    (row,), _ = run_suite(results, registry, methods)
    (spec,) = build_suite(suite_data(methods=methods), registry=registry).runs
    runner = Runner(results, registry, device="cpu", progress=False)
    checkpoint = provide_teacher(spec, results, open_store(results), registry, runner.device)
    monkeypatch.setattr(Runner, "_teacher_drift", lambda self, spec, p, meter: None)
    plain = runner.run(spec, checkpoint)
    assert plain.status == "done", plain.error
    assert plain.history == [{k: v for k, v in h.items() if k != TEACHER} for h in row["history"]]


def test_prokt_drift_is_measured_from_its_re_initialised_start(results, registry):
    """ProKT replaces the teacher's weights in setup (teacher_init pretrained): the start is
    taken after setup, so a teacher that never steps has not drifted."""
    (row,), teacher = run_suite(results, registry, [{"name": "prokt", "params": {"teacher_lr": 0.0}}])
    for h in row["history"]:
        assert h[TEACHER]["divergence"] == 0.0
        assert h[TEACHER]["validation"] == h[TEACHER]["start_validation"]
    (moved,), _ = run_suite(results, registry, [{"name": "prokt", "params": {"teacher_lr": 0.01}}])
    assert all(h[TEACHER]["divergence"] > 0 for h in moved["history"])


def test_a_regression_teacher_drift_is_an_mse(results, registry):
    tasks = [{"name": "movie-rating", "options": {"train_size": 300, "max_length": 32}}]
    (row,), _ = run_suite(results, registry, [{"name": "metadistil", "params": {"teacher_lr": 0.01, "virtual_lr": 0.01}}], tasks=tasks)
    entry = row["history"][-1][TEACHER]
    assert entry["divergence_kind"] == "mse" and entry["divergence"] > 0
    assert set(entry["validation"]) == set(row["metrics"]["validation"])


def test_runs_of_other_methods_record_no_teacher(results, registry):
    rows, _ = run_suite(results, registry, [{"name": "none"}, {"name": "kd"}])
    for row in rows:
        assert [set(h) for h in row["history"]] == [{"step", "validation", "test"}] * 2
        assert set(row["metrics"]) == {"step", "selection", "main_metric", "validation", "test", METRIC_INFO}


def test_selection_never_picks_the_teacher_entry_as_a_split():
    history = [{"step": 5, "validation": {"accuracy": 0.7}, "test": {"accuracy": 0.6},
                TEACHER: {"validation": {"accuracy": 0.9}, "divergence": 0.1, "divergence_kind": "kl"}},
               {"step": 10, "validation": {"accuracy": 0.6}, "test": {"accuracy": 0.65},
                TEACHER: {"validation": {"accuracy": 0.8}, "divergence": 0.2, "divergence_kind": "kl"}}]
    chosen = select_metrics(history, "validation", "accuracy")
    assert chosen["step"] == 5 and TEACHER not in chosen and chosen[LIVE_TEACHER]["divergence"] == 0.1
    assert json.loads(json.dumps(chosen)) == chosen


# ------------------------------------------------------------------------ the report

SEEDS = [0, 1, 2]
STEPS = [10, 20]


def teacher_entry(seed: int, step: int, kind: str = "kl") -> dict:
    """Made-up live-teacher entries: the teacher falls and drifts as steps pass."""
    return {"validation": {"accuracy": 0.80 - 0.01 * step / 10 - 0.003 * seed}, "divergence": 0.01 * step * (1 + seed),
            "divergence_kind": kind, "start_validation": {"accuracy": 0.80}}


def drift_store(path, gap: dict[str, tuple[float, float]], resumed: bool = False):
    """A store of none, kd and metadistil runs (3 seeds). ``gap``: method -> (validation,
    test) difference from ``none`` on every seed. metadistil runs carry teacher entries;
    ``resumed``: their first step is recorded twice, a stale entry before the real one."""
    from kdbench.store import DONE, ResultsStore

    data = suite_data(methods=[{"name": "none"}, {"name": "kd"}, {"name": "metadistil", "params": {"teacher_lr": 1e-3}}], seeds=SEEDS)
    suite = build_suite(data, source="drift-test")
    store = ResultsStore(path)
    for spec in suite.runs:
        assert store.claim(spec)
        base = 0.7 + 0.01 * spec.seed
        dv, dt = gap.get(spec.method, (0.0, 0.0))
        history = [{"step": s, "validation": {"accuracy": base + dv}, "test": {"accuracy": base + dt}} for s in STEPS]
        if spec.method == "metadistil":
            history = [h | {TEACHER: teacher_entry(spec.seed, h["step"])} for h in history]
            if resumed:
                stale = {"validation": {"accuracy": 0.1}, "divergence": 9.0, "divergence_kind": "kl", "start_validation": {"accuracy": 0.5}}
                history = [history[0] | {TEACHER: stale}, *history]
        metrics = select_metrics(history, "final", "accuracy")
        store.finish(spec, DONE, metrics=metrics, history=history, cost={"wall_s": 1.0}, env={"git_commit": "abc"})
    (spec,) = {r.teacher_hash: r for r in suite.runs if r.teacher_hash}.values()
    assert store.claim_teacher(spec.teacher_hash, spec.task.name, spec.teacher.model_dump(mode="json"))
    store.finish_teacher(spec.teacher_hash, DONE, path="t.safetensors", cost={"wall_s": 1.0}, env={},
                         metrics={"main_metric": "accuracy", "validation": {"accuracy": 0.85}, "test": {"accuracy": 0.84}})
    return suite, store


def report_of(tmp_path, gap, resumed: bool = False):
    from kdbench.report import build_report

    suite, store = drift_store(tmp_path / "store.sqlite", gap, resumed)
    return build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False), store


def test_the_report_key_is_the_history_key():
    from kdbench.report import drift

    assert drift.TEACHER == TEACHER


def test_the_drift_table_is_the_mean_of_the_stored_history(tmp_path):
    from kdbench.report.sections import sections

    rep, store = report_of(tmp_path, {})
    rows = [r for r in store.runs() if r["method"] == "metadistil"]
    assert len(rep.drift) == len(STEPS) and set(rep.drift["method"]) == {"metadistil"}
    for r in rep.drift.itertuples():
        entries = [h[TEACHER] for row in rows for h in row["history"] if h["step"] == r.step]
        scores = np.array([e["validation"]["accuracy"] * 100 for e in entries])
        divs = np.array([e["divergence"] for e in entries])
        assert r.n == len(SEEDS) and r.divergence_kind == "kl"
        assert r.teacher_mean == pytest.approx(scores.mean()) and r.teacher_std == pytest.approx(scores.std(ddof=1))
        assert r.divergence_mean == pytest.approx(divs.mean()) and r.divergence_std == pytest.approx(divs.std(ddof=1))
        assert r.fine_tuned == pytest.approx(85.0) and r.start_mean == pytest.approx(80.0)
    (title, table, note), = [s for s in sections(rep) if s[0] == "Teacher drift"]
    last = table.iloc[-1]
    assert last["step"] == "20" and last["fine-tuned teacher (validation)"] == "85.00" and last["starting teacher"] == "80.00"
    scores = np.array([teacher_entry(s, 20)["validation"]["accuracy"] * 100 for s in SEEDS])
    assert last["live teacher (validation)"] == f"{scores.mean():.2f} ± {scores.std(ddof=1):.2f} (n=3)"
    assert last["divergence from start"].startswith("kl 0.4 ± 0.2")
    assert "KL(p_start || p_now)" in note and "budget is too short" in note


def test_a_step_recorded_twice_counts_once_with_its_last_entry(tmp_path):
    """As the learning curves do (kdbench.report.frame.evaluations): a resumed run's
    repeated step is one evaluation, the later one."""
    plain, _ = report_of(tmp_path / "plain", {})
    resumed, store = report_of(tmp_path / "resumed", {}, resumed=True)
    assert any(len(r["history"]) == len(STEPS) + 1 for r in store.runs())  # the duplicate is stored
    pd.testing.assert_frame_equal(resumed.drift, plain.drift)
    assert list(resumed.drift["n"]) == [len(SEEDS)] * len(STEPS)


def test_every_format_shows_the_drift_section(tmp_path):
    from kdbench.report import write_outputs

    rep, _ = report_of(tmp_path, {})
    files = write_outputs(rep, ["md", "html", "json", "csv", "latex"], tmp_path / "out", plots=False)
    text = {p.name: p.read_text() for p in files}
    assert "## Teacher drift" in text["leaderboard.md"] and "id='section-drift'" in text["report.html"]
    ids = re.findall(r"id='([^']+)'|id=\"([^\"]+)\"", text["report.html"])
    assert len(ids) == len(set(ids))  # one id per section and table
    assert "Teacher drift" in text["leaderboard.tex"]
    full = json.loads(text["report.json"])
    assert len(full["teacher_drift"]) == 2 and full["teacher_updating_methods"] == ["metadistil"]
    assert "leaderboard.teacher_drift.csv" in text


def test_the_disagreement_note_appears_only_when_signs_differ(tmp_path):
    from kdbench.report import render_report

    rep, _ = report_of(tmp_path / "a", {"metadistil": (0.02, -0.03), "kd": (0.01, -0.01)})
    assert list(rep.disagreements["method"]) == ["metadistil"]  # kd does not update its teacher: no note
    expected = ("validation and test disagree for metadistil on movie-sentiment (validation +2.00, test -3.00, each beyond one standard error); it trains "
                "its teacher on training data, so validation-based selection (and model selection on validation) may mislead here.")
    md = render_report(rep, "md")
    assert expected in md and md.index(expected) > md.index("## Statistics and paired comparison")
    assert md.index(expected) < md.index("## Teacher drift")
    for i, gap in enumerate(({"metadistil": (0.02, 0.03)}, {"metadistil": (-0.02, -0.01)}, {"kd": (0.02, -0.03)})):
        rep, _ = report_of(tmp_path / str(i), gap)
        assert rep.disagreements.empty and "disagree" not in render_report(rep, "md")


def test_a_flip_inside_seed_noise_is_not_reported():
    """The note needs each split's mean difference beyond its standard error (std / sqrt(n))."""
    from kdbench.report.drift import _mean_and_se

    (v, t), (sv, st) = _mean_and_se([(0.001, -0.002), (0.003, 0.004), (-0.001, -0.005)])
    assert (v, t) == pytest.approx((0.1, -0.1)) and sv == pytest.approx(np.std([0.1, 0.3, -0.1], ddof=1) / np.sqrt(3))
    assert abs(v) < sv  # +0.10 on validation is inside its noise: such a flip gets no note
    assert _mean_and_se([(0.02, -0.03)])[1] == (0.0, 0.0)


def test_a_report_without_teacher_updating_runs_has_no_drift_section(tmp_path):
    from kdbench.report import build_report
    from kdbench.report.sections import sections

    suite, store = drift_store(tmp_path / "store.sqlite", {})
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, methods=["none", "kd"], chance=False)
    assert rep.drift.empty and rep.updating == [] and "Teacher drift" not in [s[0] for s in sections(rep)]


def test_drift_splits_must_start_with_validation(tmp_path):
    from kdbench.api import KDBenchError
    from kdbench.train import Runner

    with pytest.raises(KDBenchError, match="drift_splits must start with 'validation'"):
        Runner(tmp_path, device="cpu", drift_splits=("test",))
    assert Runner(tmp_path, device="cpu", drift_splits=("validation", "test")).drift_splits == ("validation", "test")
