"""The statistics that answer each table's question (issue 29), against brute force and
independent computations: the exact test's inverted interval, the power of the procedure
the report uses (exact test + correction over its family), TOST equivalence, sensitivity
blocked by seed and the method x factor interaction; markers that never contradict;
flagged tasks; cost under pauses; infinity in JSON."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from kdbench import stats
from kdbench.report import build_report, render_report, write_outputs
from kdbench.report.aggregate import practical, task_flags
from kdbench.report.tables import best_marks, wide_table
from support.report_fixtures import brute_force_sign_flip, custom_store, small_suite_data


def brute_p(d, shift=0.0):
    return brute_force_sign_flip([x - shift for x in d])


@pytest.mark.parametrize("d", [[0.7, -0.2, 0.1, 0.9, 0.4, 0.3, 0.8], [1.2, 0.4, -0.3, 0.9, 1.5, 0.2, 0.8, 1.1, -0.1],
                               [-0.5, -1.1, 0.2, -0.9, -0.4, -1.3]])
def test_interval_is_the_exact_test_inverted(d):
    lo, hi = stats.sign_flip_interval(d)
    eps = 1e-6
    # inside the ends the test does not reject, just outside it does (brute force, one assignment at a time)
    assert brute_p(d, lo + eps) >= 0.05 and brute_p(d, lo - eps) < 0.05
    assert brute_p(d, hi - eps) >= 0.05 and brute_p(d, hi + eps) < 0.05
    # so the interval excludes 0 exactly when the raw two-sided p is below 0.05
    assert (lo > 0 or hi < 0) == (brute_p(d) < 0.05)


def test_interval_is_unbounded_where_no_p_below_alpha_exists():
    assert stats.sign_flip_interval([1.0, 1.2, 0.9, 1.1, 1.3]) == (-math.inf, math.inf)  # n = 5: smallest p 0.0625
    assert all(math.isnan(v) for v in stats.sign_flip_interval([1.0]))


@pytest.mark.parametrize("m, n", [(1, 6), (2, 7), (6, 8), (10, 9), (40, 11)])
def test_least_n_with_a_family(m, n):
    # m x 2 / 2^n < 0.05: the figures (n = 9 with 10 comparisons, 8 with 6, 7 with 2)
    assert stats.least_n(m) == n
    assert m * 2 / 2**n < 0.05 <= m * 2 / 2 ** (n - 1)


def simulated_power(shift: float, n: int, m: int, draws: int = 1500, seed: int = 12345) -> float:
    """Independent simulation: fresh draws, p by brute force over every sign assignment."""
    rng = np.random.default_rng(seed)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    hits = 0
    for _ in range(draws):
        d = rng.standard_normal(n) + shift
        p = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-9)
        hits += m * p < 0.05
    return hits / draws


@pytest.mark.parametrize("n, m", [(7, 2), (9, 10)])
def test_procedure_mdd_has_80_percent_power_by_an_independent_simulation(n, m):
    k = stats.procedure_mdd_factor(n, m)
    se = math.sqrt(0.8 * 0.2 / 1500)
    assert simulated_power(k, n, m) == pytest.approx(0.8, abs=4 * se + stats.POWER_SE * 2)
    # the single unadjusted paired-t MDD the report used to print has far less power under this procedure
    t_mdd = stats.min_detectable_difference(1.0, n)
    assert t_mdd < k and simulated_power(t_mdd, n, m) < 0.6
    assert stats.procedure_mdd(2.0, n, m) == pytest.approx(2 * k)


def test_procedure_mdd_is_infinite_below_the_least_n():
    assert stats.procedure_mdd(1.0, 8, 10) == math.inf and stats.procedure_mdd(1.0, 9, 10) < math.inf
    assert math.isnan(stats.procedure_mdd(float("nan"), 9, 10))


def test_tost_against_brute_force():
    d = [0.1, -0.2, 0.05, 0.15, -0.1, 0.0, 0.2, -0.05]
    margin = 0.5
    signs = list(itertools.product((1, -1), repeat=len(d)))
    up = [x + margin for x in d]
    down = [x - margin for x in d]
    p_low = np.mean([sum(s * x for s, x in zip(sg, up)) >= sum(up) - 1e-9 for sg in signs])
    p_high = np.mean([sum(s * x for s, x in zip(sg, down)) <= sum(down) + 1e-9 for sg in signs])
    assert stats.tost_p(d, margin) == pytest.approx(max(p_low, p_high)) and stats.tost_p(d, margin) < 0.05
    assert stats.tost_p(d, 0.05) > 0.05  # inside so narrow a margin nothing is shown
    assert math.isnan(stats.tost_p(d, float("nan")))


def test_practical_verdicts():
    assert practical("win", 0.02, 1.0, 0.01) == "win, below the margin"
    assert practical("loss", -1.5, 1.0, 1.0) == "loss"
    assert practical("n.s.", 0.1, 1.0, 0.01) == "equivalent"
    assert practical("n.s.", 0.1, 1.0, 0.2) == "n.s."
    assert practical("win", 0.02, float("nan"), float("nan")) == "win"  # no margin: the statistical verdict


def test_blocked_anova_against_nested_regressions():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(4, 5)) + np.arange(4)[:, None] * 0.5 + rng.normal(size=5)[None, :] * 3
    res = stats.blocked_anova(table)
    y = table.ravel()
    lv = np.kron(np.eye(4), np.ones((5, 1)))
    sd = np.kron(np.ones((4, 1)), np.eye(5))
    rss = lambda x: float(np.sum((y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) ** 2))  # noqa: E731
    f = ((rss(sd) - rss(np.hstack([sd, lv]))) / 3) / (rss(np.hstack([sd, lv])) / 12)
    assert res.f == pytest.approx(f) and res.p == pytest.approx(st.f.sf(f, 3, 12)) and (res.df_levels, res.df_error) == (3, 12)


def test_interaction_says_which_method_is_less_sensitive():
    rng = np.random.default_rng(0)
    seeds = rng.normal(size=6) * 2  # shared seed effects, as settings that share seeds have
    flat = seeds[None, :] + rng.normal(size=(3, 6)) * 0.1
    steep = seeds[None, :] + np.array([[0.0], [2.0], [4.0]]) + rng.normal(size=(3, 6)) * 0.1
    it = stats.interaction_test(flat, steep)
    assert it.p < 1e-6 and it.spread_a < it.spread_b
    assert it.ci_diff[1] < 0 and it.ci_b[0] > it.ci_a[1]
    same = stats.interaction_test(steep, steep + rng.normal(size=(3, 6)) * 0.1)
    assert same.p > 0.01


def _board(rows):
    cols = {"task": "t", "split": "test", "student": "s", "metric": "accuracy", "std": 1.0, "n": 9, "small_n": False,
            "data_flag": "", "failed": 0, "diverged": 0, "running": 0, "time_per_run_s": 1.0, "params": "{}", "p_adj": 0.01}
    return pd.DataFrame([cols | r for r in rows])


def test_a_cell_is_never_tied_for_best_and_significantly_worse():
    # the nlp-cpu case: every interval overlaps the best's, one row is significantly below the baseline
    board = _board([
        {"method": "pkd", "method_name": "pkd", "mean": 67.31, "ci_low": 66.8, "ci_high": 67.8, "result": "win", "practical": "win, below the margin"},
        {"method": "kd", "method_name": "kd", "mean": 67.29, "ci_low": 66.8, "ci_high": 67.8, "result": "baseline", "practical": "baseline"},
        {"method": "metadistil", "method_name": "metadistil", "mean": 66.80, "ci_low": 66.0, "ci_high": 67.5, "result": "loss",
         "practical": "loss, below the margin"}])
    wide = wide_table(board, marks=True).set_index("method")
    cell = wide.loc["metadistil", "t (accuracy)"]
    assert "▽" in cell and "≈" not in cell
    assert "≈" in wide.loc["kd", "t (accuracy)"] and "≈" in wide.loc["pkd", "t (accuracy)"] and "△" in wide.loc["pkd", "t (accuracy)"]
    for i, r in board.assign(col="c").iterrows():  # the rule itself, over every row
        assert not (best_marks(board.assign(col="c")).get(i) == "tie" and r["result"] == "loss")


def _flag_store(tmp_path, teacher_score):
    data = small_suite_data([0, 1, 2])
    return custom_store(tmp_path / "store.sqlite", data, lambda m, s, seed: 0.5, teacher_scores={None: teacher_score},
                        cost=lambda m, s, seed: {"wall_s": 400.0 if seed == 1 else 10.0, "device_s": 9.0, "device_time_kind": "process_cpu",
                                                 "train_s": 8.0, "steps": 20, "step_s_median": 0.4})


def test_a_task_whose_teacher_is_at_chance_is_flagged_everywhere(tmp_path):
    suite, store = _flag_store(tmp_path, 0.505)
    chance = {"movie-sentiment": {"metric": "accuracy", "splits": {"test": 0.5}, "rule": "majority class of the test split", "error": ""}}
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="flag", chance=chance)
    why = report.flagged["movie-sentiment"]
    assert "teacher (50.50) is not above chance (50.00) by more than the margin 1.00" in why
    terminal = render_report(report, "terminal")
    assert "[flagged] movie-sentiment" in terminal and "left out of the averages" in terminal
    assert "movie-sentiment (accuracy) [flagged]" in terminal
    files = write_outputs(report, ["md", "csv", "json", "html", "latex", "summary"], tmp_path, plots=False)
    text = {p.name: p.read_text() for p in files}
    assert "[flagged]" in text["leaderboard.md"] and "[flagged]" in text["report.html"] and "[flagged]" in text["leaderboard.tex"]
    assert "Flagged:" in text["summary.md"]
    assert json.loads(text["report.json"])["flagged_tasks"] == {"movie-sentiment": why}
    assert set(pd.read_csv(tmp_path / "leaderboard.csv")["task_flag"].dropna()) == {why}
    # a teacher clearly above chance is not flagged
    (tmp_path / "ok").mkdir()
    suite2, store2 = _flag_store(tmp_path / "ok", 0.9)
    ok = build_report(store2, [r.hash for r in suite2.runs], suite_spec=suite2.spec, chance=chance)
    assert ok.flagged == {}


def test_flagged_tasks_are_left_out_of_the_averages():
    board = pd.DataFrame([{"task": t, "split": "test", "method": m, "student": "s", "metric": "mcc", "mean": v, "std": np.nan,
                           "n": 1 if m == "teacher" else (0 if m == "chance" else 3), "ci_low": np.nan, "ci_high": np.nan,
                           "small_n": False, "data_flag": "", "failed": 0, "diverged": 0, "running": 0, "time_per_run_s": 1.0,
                           "method_name": m, "params": "{}", "off_cpu": 0}
                          for t, m, v in [("cola", "teacher", 0.85), ("cola", "chance", 0.0), ("cola", "kd", 0.0), ("cola", "none", 0.0),
                                          ("sst", "teacher", 90.0), ("sst", "chance", 50.0), ("sst", "kd", 80.0), ("sst", "none", 78.0)]])
    flags = task_flags(board)
    assert set(flags) == {"cola"}
    wide = wide_table(board.assign(task_flag=[flags.get(t, "") for t in board["task"]])).set_index("method")
    assert "cola (mcc) [flagged]" in wide.columns
    avg = [c for c in wide.columns if c.startswith("avg")]
    assert avg == [] or wide.loc["kd", avg[0]] == "80.00"  # sst alone: no average over one task


def test_the_flag_and_verdicts_follow_the_stored_direction():
    """A lower-is-better metric (an error): the teacher far below chance is not flagged, one
    just below it by less than the margin is; a significant decrease is a win."""
    def board(teacher: float) -> pd.DataFrame:
        return pd.DataFrame([{"task": "t", "split": "test", "method": m, "metric": "mse", "mean": v, "higher_is_better": False}
                             for m, v in [("teacher", teacher), ("chance", 2.5)]])
    margins = {"t": 0.5}
    assert task_flags(board(0.25), margins) == {}  # 2.25 better than chance (lower), above the margin
    assert set(task_flags(board(2.3), margins)) == {"t"}  # better by 0.2 only
    assert set(task_flags(board(2.3).assign(higher_is_better=True), margins)) == {"t"}  # worse than chance when higher is better
    assert stats.verdict(0.01, -0.3, higher_is_better=False) == "win" and stats.verdict(0.01, 0.3, higher_is_better=False) == "loss"
    assert stats.verdict(0.01, 0.3) == "win" and stats.verdict(0.2, -0.3, higher_is_better=False) == "n.s."


def test_default_margin_reads_the_stored_scale_and_bounds():
    from kdbench.api import MetricInfo
    from kdbench.report.frame import default_margin, task_margin
    assert default_margin("accuracy") == 1.0  # pre-metric-info store: one point of an x100 accuracy
    assert default_margin("accuracy", MetricInfo(True, 1.0, (0.0, 1.0))) == pytest.approx(0.01)  # the same point shown x1
    assert math.isnan(default_margin("mse", MetricInfo(False, 1.0, (0.0, None))))  # unbounded: the suite must declare one
    assert task_margin("t", "mse", {"t": 0.2}, MetricInfo(False, 1.0, (0.0, None))) == 0.2


def test_runs_mostly_off_the_cpu_are_marked_and_cost_is_relative_to_cpu_and_active_time(tmp_path):
    """A run with wall 400 s and CPU 9 s is marked "off-CPU" (a pause and a load-starved
    run look alike to the ratio), in every format, never called paused."""
    suite, store = _flag_store(tmp_path, 0.9)
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    cost = report.cost.set_index("method")
    assert cost.loc["none", "off_cpu"] == 1 and cost.loc["none", "wall_cpu_max"] == pytest.approx(400 / 9)
    assert cost.loc["kd", "off_cpu"] == 1  # every method's seed 1 ran 400 s on 9 s of CPU
    assert cost.loc["none", "active_train_s"] == pytest.approx(20 * 0.4)
    terminal = render_report(report, "terminal")
    assert "1 of 3 runs: wall > 3x CPU" in terminal and "(1 off-CPU)" in terminal
    last = [line for line in terminal.splitlines() if line.strip()][-1]  # the line under the leaderboard says why
    assert "Time/run (k off-CPU): k runs whose wall time exceeds 3x their CPU time (stopped, or waiting for a core" in last
    files = write_outputs(report, ["md", "csv", "json", "html", "summary"], tmp_path / "out", plots=False)
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "paused" not in text.lower(), path.name
    summary = next(p for p in files if p.name == "summary.md").read_text(encoding="utf-8")
    assert "1 of 3 runs spent most of their wall time off the CPU (wall > 3x CPU" in summary


def test_json_tells_infinity_from_missing(tmp_path):
    suite, store = _flag_store(tmp_path, 0.9)  # 3 seeds: significance impossible, the MDD infinite
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    files = write_outputs(report, ["json"], tmp_path, plots=False)
    full = json.loads(next(p for p in files if p.name == "report.json").read_text())
    kd = next(r for r in full["leaderboard"] if r["method_name"] == "kd")
    base = next(r for r in full["leaderboard"] if r["method_name"] == "none")
    assert kd["mdd"] == "inf" and kd["possible"] is False and kd["least_n"] == 6
    assert kd["diff_low"] == "-inf" and kd["diff_high"] == "inf"
    assert base["mdd"] is None  # the baseline has no test: missing, not infinite
    text = render_report(report, "terminal")
    assert "impossible: n = 3, needs n ≥ 6 in this family" in text


@pytest.mark.parametrize("margins, message", [({"no-such-task": 1.0}, "does not run"), ({"movie-sentiment": 0.0}, "positive"),
                                              ({"movie-sentiment": -1.0}, "positive")])
def test_bad_margins_are_refused_at_validate(margins, message):
    from kdbench.api import KDBenchError
    from kdbench.spec import build_suite

    with pytest.raises(KDBenchError, match=message):
        build_suite(small_suite_data([0, 1]) | {"margins": margins}, source="custom")
    assert build_suite(small_suite_data([0, 1]) | {"margins": {"movie-sentiment": 0.5}}, source="custom").spec.margins == {
        "movie-sentiment": 0.5}


def test_the_summary_format_refreshes_the_readme_block_of_its_results_folder(tmp_path):
    """Written as `kdbench report --format summary` writes it (through the atomic staging
    folder): summary.md and the README's block between the markers are the same text, the
    README's own prose is kept, and nothing is left in the staging folder."""
    from kdbench.report.summary import BEGIN, END

    suite, store = _flag_store(tmp_path, 0.9)
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "README.md").write_text(f"# prose before\n\n{BEGIN}\nstale numbers\n{END}\n\nprose after\n", encoding="utf-8")
    files = write_outputs(report, ["summary"], folder, plots=False)
    assert sorted(p.name for p in files) == ["README.md", "summary.md"] and all(p.parent == folder for p in files)
    summary = (folder / "summary.md").read_text(encoding="utf-8")
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert readme == "# prose before\n\n" + summary.rstrip("\n") + "\n\nprose after\n"
    assert "stale numbers" not in readme and sorted(p.name for p in folder.iterdir()) == ["README.md", "summary.md"]


def test_the_pareto_figure_ranks_by_active_training_time_not_wall_time(tmp_path, monkeypatch):
    """Seed 1 of every method ran 400 s of wall time on 9 s of CPU: the figure's costs are
    the cost table's active training time (20 steps x 0.4 s), never the wall time."""
    from kdbench.report import plots

    suite, store = _flag_store(tmp_path, 0.9)
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    seen = []
    monkeypatch.setattr(plots.stats, "pareto_front", lambda costs, scores: seen.append(costs) or [False] * len(costs))
    figures = plots.report_plots(report)
    assert "pareto-movie-sentiment" in figures and seen == [[pytest.approx(8.0)] * len(report.cost)]
    assert report.cost["wall_s"].iloc[0] == pytest.approx((400 + 10 + 10) / 3)  # what it would have ranked by


def test_the_summary_says_scores_x100_only_where_every_task_is_read_so():
    from kdbench.report.summary import _reading

    x100 = pd.DataFrame({"scale": [100.0, 100.0], "higher_is_better": [True, True]})
    assert _reading(x100) == "scores x100"
    mse = pd.DataFrame({"scale": [1.0], "higher_is_better": [False]})
    assert _reading(mse).startswith("scores on each task's scale and direction")
