"""A lower-is-better metric (an MSE stored with its MetricInfo) read end to end by the
report: the best cell is the lowest mean, a method with a significantly lower MSE than the
baseline is a win (▲) and one with a higher MSE a loss (▼), in every format; the chance
and teacher rows and the "vs baseline" deltas stay on the metric's own scale (x1); grid
selection picks the lowest validation MSE. A store without metric info is read with the
classification/regression defaults (x100, higher is better) and the legend says so."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from kdbench.report import build_report, write_outputs
from kdbench.spec import build_suite
from kdbench.store import DONE, ResultsStore
from support.report_fixtures import small_suite_data

SEEDS = list(range(8))  # 8 paired seeds: the exact sign-flip test reaches 2/256, below 0.05 after Holm over 2 tests
MSE_INFO = {"mse": {"higher_is_better": False, "scale": 1.0, "bounds": [0.0, None]}}
CHANCE = {"movie-sentiment": {"metric": "mse", "splits": {"test": 2.5}, "rule": "training-mean prediction", "error": "", "sizes": {"test": 10}}}


def mse(method: str, temperature: float | None, seed: int) -> float:
    base = 1.0 + 0.05 * math.sin(seed + 1)
    if method == "none":
        return base
    return base - 0.3 - 0.001 * seed if temperature == 2.0 else base + 0.3 + 0.001 * seed


def metrics(value: float, with_info: bool = True) -> dict:
    out = {"step": 20, "selection": "final", "main_metric": "mse", "validation": {"mse": value}, "test": {"mse": value}}
    return out | ({"metric_info": MSE_INFO} if with_info else {})


def store_of(path: Path, data: dict, with_info: bool = True):
    suite = build_suite(data, source="lower-is-better")
    store = ResultsStore(path / "results.db")
    for spec in suite.runs:
        assert store.claim(spec)
        store.finish(spec, DONE, metrics=metrics(mse(spec.method, spec.params.get("temperature"), spec.seed), with_info),
                     history=[], cost={"wall_s": 1.0}, env={"git_commit": "abc123"})
    for spec in {r.teacher_hash: r for r in suite.runs if r.teacher_hash}.values():
        assert store.claim_teacher(spec.teacher_hash, spec.task.name, spec.teacher.model_dump(mode="json"))
        store.finish_teacher(spec.teacher_hash, DONE, path="teacher.safetensors", metrics=metrics(0.25, with_info),
                             cost={"wall_s": 100.0}, env={"git_commit": "abc123"})
    return suite, store


def three_methods() -> dict:
    data = small_suite_data(SEEDS)
    data["methods"] = [{"name": "none"}, {"name": "kd", "params": {"alpha": 0.5, "temperature": 2.0}},
                       {"name": "kd", "params": {"alpha": 0.5, "temperature": 4.0}}]
    return data


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[object, dict[str, str], Path]:
    folder = tmp_path_factory.mktemp("lower")
    suite, store = store_of(folder, three_methods())
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="lower", chance=CHANCE)
    files = write_outputs(report, ["md", "csv", "json", "latex", "html"], folder, plots=False)
    return report, {p.name: p.read_text(encoding="utf-8") for p in files}, folder


def expected_mean(method: str, temperature: float | None) -> float:
    return float(np.mean([mse(method, temperature, s) for s in SEEDS]))


def test_board_reads_direction_and_scale_from_the_store(written) -> None:
    report, _, _ = written
    b = report.board.set_index("method")
    assert b.loc["kd(temperature=2.0)", "mean"] == pytest.approx(expected_mean("kd", 2.0), rel=1e-12)  # x1, not x100
    assert b.loc["none", "mean"] == pytest.approx(expected_mean("none", None), rel=1e-12)
    assert b.loc["kd(temperature=2.0)", "result"] == "win" and b.loc["kd(temperature=4.0)", "result"] == "loss"
    assert b.loc["kd(temperature=2.0)", "diff"] == pytest.approx(-0.3 - 0.001 * np.mean(SEEDS), rel=1e-9)  # method - baseline, x1
    assert b.loc["chance", "mean"] == pytest.approx(2.5) and b.loc["teacher", "mean"] == pytest.approx(0.25)
    assert not b["higher_is_better"].any() and (b["scale"] == 1.0).all()


def _md_leaderboard(md: str) -> dict[str, list[str]]:
    lines = md.split("## Leaderboard", 1)[1].split("\n\n", 2)[1].splitlines() if "## Leaderboard" in md else md.splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    return {r[0]: r[1:] for r in rows}


def test_markdown_marks_the_lowest_mean_best_and_orients_the_arrows(written) -> None:
    _, text, _ = written
    md = text["leaderboard.md"]
    assert "movie-sentiment (mse, ↓ better)" in md
    table = _md_leaderboard(md)
    best, worse = table["kd(temperature=2.0)"][0], table["kd(temperature=4.0)"][0]
    assert best.startswith("**") and best.endswith("▲"), best
    assert not worse.startswith("**") and worse.endswith("▼"), worse
    assert table["chance"][0] == "2.50 (chance)" and table["teacher"][0].startswith("0.25")
    assert "lower is better" in md


def test_latex_and_html_bold_the_lowest_mean(written) -> None:
    _, text, _ = written
    tex, html = text["leaderboard.tex"], text["report.html"]
    low = f"{expected_mean('kd', 2.0):.2f}"
    high = f"{expected_mean('kd', 4.0):.2f}"
    assert f"\\textbf{{{low}" in tex and f"\\textbf{{{high}" not in tex
    assert "movie-sentiment (mse, $\\downarrow$ better)" in tex and "↓" not in tex
    assert f"<b>{low}" in html and f"<b>{high}" not in html


def test_csv_and_json_carry_direction_results_and_unscaled_means(written) -> None:
    _, text, folder = written
    rows = {r["method"]: r for r in csv.DictReader(text["leaderboard.csv"].splitlines())}
    assert rows["kd(temperature=2.0)"]["result"] == "win" and rows["kd(temperature=4.0)"]["result"] == "loss"
    assert rows["kd(temperature=2.0)"]["higher_is_better"] == "False"
    assert float(rows["kd(temperature=2.0)"]["mean"]) == pytest.approx(expected_mean("kd", 2.0), rel=1e-9)
    full = json.loads((folder / "report.json").read_text())
    board = {r["method"]: r for r in full["leaderboard"]}
    assert board["kd(temperature=2.0)"]["result"] == "win" and board["kd(temperature=2.0)"]["higher_is_better"] is False
    assert board["kd(temperature=4.0)"]["result"] == "loss"
    wide = {r["method"]: r for r in json.loads(text["leaderboard.json"])}
    col = "movie-sentiment (mse, ↓ better)"
    assert wide["kd(temperature=2.0)"][col].startswith(f"{expected_mean('kd', 2.0):.2f}")


def test_grid_selection_picks_the_lowest_validation_mse(tmp_path) -> None:
    data = small_suite_data(SEEDS)
    data["methods"] = [{"name": "none"}, {"name": "kd", "params": {"alpha": 0.5, "temperature": [4.0, 2.0]}, "grid_selection": "validation"}]
    suite, store = store_of(tmp_path, data)
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    (chosen,) = report.selection.chosen.itertuples()
    assert chosen.setting == "temperature=2.0"
    assert chosen.runner_up == "temperature=4.0" and chosen.gap == pytest.approx(0.6 + 0.002 * np.mean(SEEDS), rel=1e-9)


def test_an_older_store_is_read_with_the_defaults_and_says_so(tmp_path) -> None:
    suite, store = store_of(tmp_path, three_methods(), with_info=False)
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    b = report.board.set_index("method")
    assert b.loc["none", "mean"] == pytest.approx(100 * expected_mean("none", None), rel=1e-12)  # x100, as before
    assert b.loc["kd(temperature=2.0)", "result"] == "loss"  # read as higher is better
    (md,) = [p.read_text() for p in write_outputs(report, ["md"], tmp_path, plots=False)]
    assert "stored without metric directions and scales" in md


def test_sensitivity_names_the_lowest_level_best(written) -> None:
    report, _, _ = written
    (sweep,) = report.sens_scores[report.sens_scores["factor"] == "temperature"].itertuples()
    low, high = expected_mean("kd", 2.0), expected_mean("kd", 4.0)
    assert sweep.best_level == 2.0 and sweep.worst_level == 4.0
    assert sweep.range == pytest.approx(high - low, rel=1e-9)  # x1
    assert sweep.drop_from_best == pytest.approx((low + high) / 2 - low, rel=1e-9)  # how much worse than the best, on average


# ----------------------------------------------------------------- end to end: train, store, report


def _error_task() -> type:
    """cifar100 on the generated images, reporting its error rate (lower is better) as the
    main metric: the classification objective reads "error" as lower-is-better x1."""
    from kdbench.registry import get_registry
    from kdbench.metrics import accuracy

    base = get_registry().task("cifar100")

    class ErrorRate(base):  # type: ignore[misc, valid-type]
        name = "images-error"

        @property
        def main_metric(self) -> str:
            return "error"

        def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            acc = accuracy(predictions, labels)
            return {"error": 1.0 - acc, "accuracy": acc}

    return ErrorRate


def test_a_trained_lower_is_better_metric_is_stored_selected_and_reported(tmp_path) -> None:
    import types

    from kdbench.executors.local import run_local
    from kdbench.executors.phases import open_store
    from kdbench.hookspecs import hookimpl
    from kdbench.registry import Registry, make_plugin_manager
    from support.suites import image_data

    task = _error_task()
    pm, broken = make_plugin_manager([types.SimpleNamespace(kdbench_tasks=hookimpl(lambda: [task]))])
    registry = Registry(pm, broken)
    data = image_data(tmp_path / "images", selection="validation", seeds=[0, 1])
    data["tasks"][0]["name"] = "images-error"
    suite = build_suite(data, registry=registry)
    results = tmp_path / "results"
    run_local(suite, results, registry=registry, progress=False)
    rows = open_store(results).runs([r.hash for r in suite.runs])
    assert [r["status"] for r in rows] == [DONE] * 4, [r["error"] for r in rows]
    for r in rows:
        m = r["metrics"]
        assert m["metric_info"]["error"] == {"higher_is_better": False, "scale": 1.0, "bounds": [0.0, None]}
        assert m["metric_info"]["accuracy"] == {"higher_is_better": True, "scale": 100.0, "bounds": [0.0, 1.0]}
        errors = [(h["validation"]["error"], h["step"]) for h in r["history"]]
        assert m["step"] == min(errors)[1]  # the lowest validation error, earliest on ties
        assert m["validation"]["error"] == pytest.approx(1 - m["validation"]["accuracy"])
    report = build_report(open_store(results), [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    none = report.board[(report.board["method"] == "none")].iloc[0]
    assert none["mean"] == pytest.approx(np.mean([r["metrics"]["test"]["error"] for r in rows if r["method"] == "none"]), rel=1e-12)
    assert not none["higher_is_better"] and none["scale"] == 1.0
    (md,) = [p.read_text() for p in write_outputs(report, ["md"], tmp_path, plots=False)]
    assert "images-error (error, ↓ better)" in md and "images-error: error x1, lower is better" in md
