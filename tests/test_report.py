"""Reports against the raw store: every number in the Markdown, CSV, JSON and LaTeX
reports is recomputed here from the stored rows (numpy/scipy, not the report code);
significance, failed/diverged runs, sensitivity, references, cost and subsets; and one
real tiny run through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kdbench import cli
from kdbench.report import build_report, render_report, write_outputs
from report_fixtures import DIVERGE, FAIL, SEEDS, build_store, check_rows, expected, label, parse_cell, suite_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    suite, store = build_store(folder / "store.sqlite")
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="synthetic")
    files = write_outputs(report, ["md", "csv", "json", "latex"], folder)
    return suite, store, report, folder, files


def md_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every '## Title' pipe table of a Markdown report as a list of {column: cell}."""
    out, title, lines = {}, None, text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            title = lines[i][3:].strip()
        elif lines[i].startswith("|") and title and title not in out:
            head = [c.strip() for c in lines[i].strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            out[title] = rows
            continue
        i += 1
    return out


def test_markdown_numbers_match_the_raw_rows(synthetic):
    suite, store, report, folder, _ = synthetic
    exp = expected(store.runs())
    tables = md_tables((folder / "leaderboard.md").read_text())
    stats_rows = tables["Statistics and paired comparison vs none"]
    assert len(stats_rows) == len(exp) == 8
    checked = check_rows(stats_rows, tables["Leaderboard"], exp)
    assert checked > 100
    text = (folder / "leaderboard.md").read_text()
    assert "scipy.stats.ttest_rel" in text and "Student t 95% interval" in text  # the tests are named
    # the best student row of the column is in bold, and it is the highest mean
    best = max((e["mean"], k) for k, e in exp.items())
    (bold_row,) = [r for r in tables["Leaderboard"] if "**" in r["movie-sentiment (accuracy)"]]
    assert bold_row["method"] == f"{best[1][0]} [{best[1][1]}]"


def test_csv_and_json_numbers_match_the_raw_rows(synthetic):
    suite, store, report, folder, _ = synthetic
    exp = expected(store.runs())
    csv = pd.read_csv(folder / "leaderboard.csv")
    assert len(csv) == 8
    for r in csv.itertuples():
        e = exp[(r.method, r.student)]
        assert (r.n, r.failed, r.diverged) == (e["n"], e["failed"], e["diverged"])
        for col in ("mean", "std", "ci_low", "ci_high"):
            assert getattr(r, col) == pytest.approx(e[col], rel=1e-12)
        if "diff" in e:
            assert (r.pairs, r.result) == (e["pairs"], e["result"])
            assert r.diff == pytest.approx(e["diff"], abs=1e-12) and r.p == pytest.approx(e["p"], rel=1e-9)
        else:
            assert r.result == "baseline"
    full = json.loads((folder / "report.json").read_text())
    for row in full["leaderboard"]:
        e = exp[(row["method"], row["student"])]
        assert row["mean"] == pytest.approx(e["mean"], rel=1e-12) and row["n"] == e["n"]
    wide = json.loads((folder / "leaderboard.json").read_text())  # the plain leaderboard rows, no marks
    for row in wide:
        method, student = row["method"].rsplit(" [", 1)
        e = exp[(method, student.rstrip("]"))]
        assert row["movie-sentiment (accuracy)"] == f"{e['mean']:.2f} ± {e['std']:.2f} (n={e['n']})"


def test_better_by_construction_is_significant_identical_is_not(synthetic):
    _, _, report, _, _ = synthetic
    b = report.board.set_index(["method", "student"])
    assert b.loc[("kd(alpha=0.5, temperature=2.0)", "tiny-1L"), "result"] == "win"
    assert b.loc[("kd(alpha=0.5, temperature=2.0)", "tiny-1L"), "p"] < 1e-3
    assert b.loc[("kd(alpha=0.5, temperature=4.0)", "tiny-1L"), "result"] == "loss"
    same = b.loc[("kd(alpha=0.5, temperature=1.0)", "tiny-1L")]  # a copy of the baseline
    assert same["result"] == "n.s." and same["p"] == 1.0 and same["diff"] == 0.0
    assert b.loc[("none", "tiny-1L"), "result"] == "baseline"


def test_failed_and_diverged_runs_are_shown_never_averaged(synthetic):
    _, store, report, folder, _ = synthetic
    rows = store.runs()
    b = report.board.set_index(["method", "student"])
    none2 = b.loc[("none", "tiny-2L")]
    good = [r["metrics"]["test"]["accuracy"] * 100 for r in rows if (r["method"], r["student"]) == ("none", "tiny-2L") and r["status"] == "done"]
    assert none2["n"] == len(SEEDS) - 1 == len(good) and none2["failed"] == 1 and none2["mean"] == pytest.approx(np.mean(good))
    assert b.loc[("kd(alpha=0.5, temperature=2.0)", "tiny-2L"), "diverged"] == 1
    # paired over seeds where both finished: seed 3 (kd diverged) and seed 4 (none failed) drop out
    assert b.loc[("kd(alpha=0.5, temperature=2.0)", "tiny-2L"), "pairs"] == len(SEEDS) - 2
    tables = md_tables((folder / "leaderboard.md").read_text())
    problems = {(r["method"], r["status"], r["seed"]) for r in tables["Runs that did not finish"]}
    assert problems == {("none", "failed", str(FAIL[2])), ("kd(alpha=0.5, temperature=2.0)", "diverged", str(DIVERGE[2]))}
    not_done = {r["method"]: r["not done"] for r in tables["Leaderboard"]}
    assert not_done["none [tiny-2L]"] == "1 failed" and not_done["kd(alpha=0.5, temperature=2.0) [tiny-2L]"] == "1 diverged"


def test_sensitivity_spread_matches_a_hand_computation(synthetic):
    _, store, report, folder, files = synthetic
    rows = [r for r in store.runs() if r["status"] == "done"]

    def level_mean(pred) -> float:
        return float(np.mean([r["metrics"]["test"]["accuracy"] * 100 for r in rows if pred(r)]))

    temps = [level_mean(lambda r, t=t: r["method"] == "kd" and r["student"] == "tiny-1L" and r["params"] == {"alpha": 0.5, "temperature": t})
             for t in (1.0, 2.0, 4.0)]
    s = report.sens_scores.set_index(["method", "factor"])
    row = s.loc[("kd", "temperature")]
    assert row["levels"] == 3 and row["at"] == "alpha=0.5, student=tiny-1L"
    assert row["std"] == pytest.approx(np.std(temps, ddof=1)) and row["range"] == pytest.approx(max(temps) - min(temps))
    assert row["drop_from_best"] == pytest.approx(max(temps) - np.mean(temps)) and row["best_level"] == 2.0
    students = [level_mean(lambda r, s=s: r["method"] == "kd" and r["student"] == s and r["params"] == {"alpha": 0.5, "temperature": 2.0})
                for s in ("tiny-1L", "tiny-2L")]
    assert s.loc[("kd", "student"), "range"] == pytest.approx(abs(students[0] - students[1]))
    assert s.loc[("kd", "alpha"), "at"] == "student=tiny-1L, temperature=2.0"
    # the Markdown shows the same spread and links the plot, which was written
    sens = {(r["method"], r["factor"]): r for r in md_tables((folder / "leaderboard.md").read_text())["Sensitivity"]}
    assert float(sens[("kd", "temperature")]["max - min"]) == pytest.approx(max(temps) - min(temps), abs=0.005)
    plot = folder / "plots" / "sensitivity-movie-sentiment.png"
    assert plot in files and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](plots/sensitivity-movie-sentiment.png)" in (folder / "leaderboard.md").read_text()


def test_references_and_cost_against_the_rows(synthetic):
    _, store, report, folder, _ = synthetic
    rows = [r for r in store.runs() if r["status"] == "done"]
    none1 = [r["metrics"]["test"]["accuracy"] * 100 for r in rows if (r["method"], r["student"]) == ("none", "tiny-1L")]
    (ref,) = md_tables((folder / "leaderboard.md").read_text())["Paper comparison"]
    assert float(ref["reproduced"]) == pytest.approx(np.mean(none1), abs=0.005) and ref["seeds"] == str(len(none1))
    assert float(ref["difference"]) == pytest.approx(np.mean(none1) - 70.0, abs=0.005) and ref["citation"].startswith("Made-up")
    cost = report.cost.set_index(["method", "student"])
    wall = lambda m, s: np.mean([r["cost"]["wall_s"] for r in rows if r["method"] == m and r["student"] == s])  # noqa: E731
    assert cost.loc[("none", "tiny-2L"), "wall_rel"] == pytest.approx(wall("none", "tiny-2L") / wall("kd", "tiny-2L"))
    assert cost.loc[("none", "tiny-1L"), "peak_mem_mb"] == 500.0 and cost.loc[("none", "tiny-2L"), "params_rel"] == 1.0
    md_cost = {(r["method"], r["student"]): r for r in md_tables((folder / "leaderboard.md").read_text())["Cost"]}
    assert md_cost[("none", "tiny-1L")]["wall vs kd"] == f"{wall('none', 'tiny-1L') / wall('kd', 'tiny-1L'):.2f}x"
    assert report.env["device_name"] == ["CPU x2"] and report.env["torch"] == ["2.x-test"]


def test_latex_is_booktabs_with_the_best_in_bold(synthetic):
    _, store, _, folder, _ = synthetic
    tex = (folder / "leaderboard.tex").read_text()
    assert tex.count("\\toprule") >= 3 and "\\midrule" in tex and "\\bottomrule" in tex
    exp = expected(store.runs())
    best = max(exp.values(), key=lambda e: e["mean"])
    assert f"\\textbf{{{best['mean']:.2f} $\\pm$ {best['std']:.2f} (n={best['n']})}}" in tex
    assert tex.count("\\textbf{") == 1 and "$\\blacktriangle$" in tex and "\\_" not in tex.split("\\begin{table}")[1].split("movie")[0]


def test_subsets(synthetic):
    suite, store, _, _, _ = synthetic
    hashes = [r.hash for r in suite.runs]
    only_none = build_report(store, hashes, suite_spec=suite.spec, methods=["none"])
    assert set(only_none.board["method"]) == {"none"}
    t4 = build_report(store, hashes, suite_spec=suite.spec, where={"temperature": 4})
    # runs of a method without the parameter (the label-only baseline) stay, so the comparison still works
    t4b = t4.board.set_index(["method", "student"])
    assert set(t4b.index) == {("kd(alpha=0.5, temperature=4.0)", "tiny-1L"), ("none", "tiny-1L"), ("none", "tiny-2L")}
    assert t4b.loc[("kd(alpha=0.5, temperature=4.0)", "tiny-1L"), "result"] == "loss"
    no_base = build_report(store, hashes, suite_spec=suite.spec, methods=["kd"], where={"temperature": 4})
    assert no_base.board["result"].tolist() == ["n/a"]  # the baseline is outside the subset: nothing to compare with
    small = build_report(store, hashes, suite_spec=suite.spec, students=["tiny-2L"], baseline="none")
    assert set(small.board["student"]) == {"tiny-2L"} and "tiny-2L" in render_report(small, "terminal")
    nothing = build_report(store, hashes, suite_spec=suite.spec, tasks=["no-such-task"])
    assert nothing.board.empty and "Leaderboard" in render_report(nothing, "md")


def test_cli_report_on_a_subset_writes_every_format(synthetic, tmp_path):
    suite, store, _, folder, _ = synthetic
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite_data()))
    out = tmp_path / "out"
    rc = cli.main(["report", str(path), "--results", str(folder), "--where", "alpha=0.5", "--student", "tiny-1L",
                   "--format", "md", "--format", "html", "--format", "csv", "--no-plots", "--output", str(out / "x.md")])
    assert rc == 2  # --output names one file
    for fmt in ("md", "html", "csv"):
        assert cli.main(["report", str(path), "--results", str(folder), "--where", "alpha=0.5", "--student", "tiny-1L",
                         "--format", fmt, "--no-plots", "--output", str(out / f"r.{fmt}")]) == 0
    csv = pd.read_csv(out / "r.csv")
    assert set(csv["student"]) == {"tiny-1L"} and len(csv) == 4  # none + kd T=1,2,4 at alpha 0.5
    exp = expected(store.runs())
    for r in csv.itertuples():
        assert r.mean == pytest.approx(exp[(r.method, r.student)]["mean"], rel=1e-12)
    assert "Subset:" in (out / "r.md").read_text()


def test_a_real_tiny_run_reported_from_the_store(tmp_path):
    data = yaml.safe_load((ROOT / "benchmarks" / "smoke.yaml").read_text())
    data.update(name="tiny-real", teacher=None, methods=[{"name": "none"}], seeds=[0, 1],
                budget={"steps": 6, "batch_size": 16, "eval_every": 6, "log_every": 3})
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    assert cli.main(["run", str(path), "--results", str(results), "--no-report"]) == 0
    assert cli.main(["report", str(path), "--results", str(results), "--format", "md", "--format", "csv"]) == 0
    from kdbench.executor import open_store

    rows = open_store(results).runs()
    scores = np.array([r["metrics"]["test"]["accuracy"] * 100 for r in rows])
    board = md_tables((results / "leaderboard.md").read_text())["Leaderboard"]
    mean, std, n = parse_cell(board[0]["movie-sentiment (accuracy)"])
    assert n == 2 and mean == pytest.approx(scores.mean(), abs=0.005) and std == pytest.approx(scores.std(ddof=1), abs=0.005)
    csv = pd.read_csv(results / "leaderboard.csv")
    assert csv["mean"].iloc[0] == pytest.approx(scores.mean(), rel=1e-12)
    cost = md_tables((results / "leaderboard.md").read_text())["Cost"][0]
    assert float(cost["wall (s)"]) == pytest.approx(np.mean([r["cost"]["wall_s"] for r in rows]), abs=0.005)
    result = pd.read_csv(results / "leaderboard.csv", keep_default_na=False)["result"].iloc[0]
    assert math.isnan(csv["p"].iloc[0]) and result == "baseline"  # the suite's only method is its default baseline
    assert label("none", {}) == "none"


def test_average_over_tasks_uses_main_metric_over_test_splits():
    from kdbench.report import leaderboard, runs_frame, wide_table

    def row(task, seed, main, test, extra=None):
        metrics = {"main_metric": main, "test": {main: test, "other": 0.0}}
        if extra is not None:
            metrics["test_mismatched"] = {main: extra}
        return {"hash": f"{task}{seed}", "task": task, "method": "kd", "params": {}, "student": "s", "seed": seed,
                "status": "done", "metrics": metrics, "cost": {"wall_s": 1.0}, "env": {}, "diverged_step": None, "error": None}

    rows = [row("glue-mnli", 0, "accuracy", 0.80, 0.70), row("glue-mnli", 1, "accuracy", 0.82, 0.74),
            row("glue-mrpc", 0, "score", 0.60), row("glue-mrpc", 1, "score", 0.64)]
    wide = wide_table(leaderboard(runs_frame(rows))).set_index("method")
    mnli = np.mean([(0.80 + 0.70) / 2, (0.82 + 0.74) / 2]) * 100
    assert wide.loc["kd", "avg over 2 tasks"] == f"{(mnli + 62.0) / 2:.2f}"
    assert wide.loc["kd", "glue-mnli (accuracy)"] == f"{81.0:.2f} ± {np.std([80, 82], ddof=1):.2f} (n=2)"
    assert wide.loc["kd", "glue-mnli test_mismatched (accuracy)"].startswith("72.00 ± ")
    # a task missing for a row: no average for it
    assert "avg over 2 tasks" not in wide_table(leaderboard(runs_frame(rows[:2]))).columns
