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
from support.report_fixtures import DIVERGE, FAIL, SEEDS, build_store, check_rows, expected, label, parse_cell, suite_data

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
    assert "sign-flip permutation test" in text and "Student t 95% interval" in text and "Holm" in text  # the tests are named
    assert "family of 6 comparisons" in text  # kd x 5 on tiny-1L, kd on tiny-2L
    # the best mean is bold only when its interval clears the runner-up's; else every overlapping cell is a tie
    ranked = sorted(exp.items(), key=lambda kv: -kv[1]["mean"])
    (top_key, top), runner = ranked[0], ranked[1][1]
    cells = {r["method"]: r["movie-sentiment (accuracy)"] for r in tables["Leaderboard"]}
    top_cell = cells[f"{top_key[0]} [{top_key[1]}]"]
    if runner["ci_high"] < top["ci_low"]:
        assert top_cell.startswith("**") and sum("**" in c for c in cells.values()) == 1
    else:
        # never tied for best and significantly worse than the baseline at once
        tied = {f"{k[0]} [{k[1]}]" for k, e in exp.items() if e["ci_high"] >= top["ci_low"] and e.get("result") != "loss"}
        assert any(e["ci_high"] >= top["ci_low"] and e.get("result") == "loss" for e in exp.values())  # the case arises here
        assert {m for m, c in cells.items() if "≈" in c} == tied and not any("**" in c for c in cells.values())


def test_csv_and_json_numbers_match_the_raw_rows(synthetic):
    suite, store, report, folder, _ = synthetic
    exp = expected(store.runs())
    csv = pd.read_csv(folder / "leaderboard.csv")
    assert csv[csv["method"] == "chance"].shape[0] == 1  # the chance row, then the 8 student rows
    csv = csv[csv["method"] != "chance"]
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
        if row["method"] == "chance":
            continue
        e = exp[(row["method"], row["student"])]
        assert row["mean"] == pytest.approx(e["mean"], rel=1e-12) and row["n"] == e["n"]
    wide = json.loads((folder / "leaderboard.json").read_text())  # the plain leaderboard rows, no marks
    for row in wide:
        if row["method"] == "chance":
            continue
        method, student = row["method"].rsplit(" [", 1)
        e = exp[(method, student.rstrip("]"))]
        assert row["movie-sentiment (accuracy)"] == f"{e['mean']:.2f} ± {e['std']:.2f} (n={e['n']})"


def test_better_by_construction_is_significant_identical_is_not(synthetic):
    _, _, report, _, _ = synthetic
    b = report.board.set_index(["method", "student"])
    assert b.loc[("kd(alpha=0.5, temperature=2.0)", "tiny-1L"), "result"] == "win"
    # better on all 10 seeds: only the all-plus and all-minus sign assignments reach it
    assert b.loc[("kd(alpha=0.5, temperature=2.0)", "tiny-1L"), "p"] == 2 / 2**10
    assert b.loc[("kd(alpha=0.5, temperature=2.0)", "tiny-1L"), "p_adj"] <= 6 * 2 / 2**10
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
    # active training time: steps x median step (a pause cannot inflate it), the train time where no median was stored
    active = lambda c: c["steps"] * c["step_s_median"] if c.get("step_s_median") is not None else c["train_s"]  # noqa: E731
    train = lambda m, s: np.mean([active(r["cost"]) for r in rows if r["method"] == m and r["student"] == s])  # noqa: E731
    cpu = lambda m, s: np.mean([r["cost"]["device_s"] for r in rows if r["method"] == m and r["student"] == s])  # noqa: E731
    # "vs" divides by the suite's baseline ('none' here), never by a hard-coded kd
    kd2 = ("kd(alpha=0.5, temperature=2.0)", "tiny-2L")
    assert cost.loc[kd2, "train_rel"] == pytest.approx(train("kd", "tiny-2L") / train("none", "tiny-2L"))
    assert cost.loc[kd2, "cpu_rel"] == pytest.approx(cpu("kd", "tiny-2L") / cpu("none", "tiny-2L"))
    assert cost.loc[("none", "tiny-1L"), "train_rel"] == 1.0
    # old-store fallbacks: memory = peak_mem_increase_mb, training params = student_params, deployed n/a
    none1 = cost.loc[("none", "tiny-1L")]
    assert none1["mem_mb"] == 40.0 and none1["params_training"] == 1000 and np.isnan(none1["params_deployed"])
    assert none1["shared_teacher_outputs"] == "n/a" and np.isnan(none1["prep_s"])
    kd = cost.loc[("kd(alpha=0.5, temperature=2.0)", "tiny-1L")]
    seeds = [s for s in SEEDS]
    assert kd["mem_mb"] == pytest.approx(np.mean([80.0 + s for s in seeds])) and kd["mem_kind"] == "cpu_rss_increase"
    assert kd["mem_mb_std"] == pytest.approx(np.std([80.0 + s for s in seeds], ddof=1))
    assert kd["step_s_median"] == pytest.approx(np.median([0.1 + 0.001 * s for s in seeds]))
    assert (kd["params_deployed"], kd["params_training"], kd["shared_teacher_outputs"]) == (1000, 1200, "yes")
    md_cost = {(r["method"], r["student"]): r for r in md_tables((folder / "leaderboard.md").read_text())["Cost"]}
    shown = md_cost[("kd(alpha=0.5, temperature=2.0)", "tiny-1L")]
    assert shown["active train vs none"] == f"{kd['train_rel']:.2f}x" and shown["cached teacher outputs"] == "yes"
    assert shown["CPU vs none"] == f"{kd['cpu_rel']:.2f}x"
    assert shown["train (s)"] == f"{kd['train_s']:.2f} ± {kd['train_s_std']:.2f}" and shown["prep (s)"].startswith("1.50")
    assert shown["step (ms) median [IQR]"] == f"{kd['step_s_median'] * 1000:.1f} [90.0, 120.0]"
    assert md_cost[("none", "tiny-1L")]["params deployed"] == "n/a" and md_cost[("none", "tiny-1L")]["prep (s)"] == "n/a"
    assert report.env["device_name"] == ["CPU x2"] and report.env["torch"] == ["2.x-test"]


def test_latex_is_booktabs_with_the_best_in_bold(synthetic):
    _, store, _, folder, _ = synthetic
    tex = (folder / "leaderboard.tex").read_text()
    assert tex.count("\\toprule") >= 3 and "\\midrule" in tex and "\\bottomrule" in tex
    exp = expected(store.runs())
    ranked = sorted(exp.values(), key=lambda e: -e["mean"])
    if ranked[1]["ci_high"] < ranked[0]["ci_low"]:  # bold only a clear best
        assert tex.count("\\textbf{") == 1
    else:
        assert tex.count("\\textbf{") == 0 and "$\\approx$" in tex
    assert "$\\blacktriangle$" in tex and "\\_" not in tex.split("\\begin{table}")[1].split("movie")[0]


def test_subsets(synthetic):
    suite, store, _, _, _ = synthetic
    hashes = [r.hash for r in suite.runs]
    only_none = build_report(store, hashes, suite_spec=suite.spec, methods=["none"])
    assert set(only_none.board["method"]) == {"none"}
    t4 = build_report(store, hashes, suite_spec=suite.spec, where={"temperature": 4})
    # runs of a method without the parameter (the label-only baseline) stay, so the comparison still works
    t4b = t4.board.set_index(["method", "student"])
    assert set(t4b.index) == {("kd(alpha=0.5, temperature=4.0)", "tiny-1L"), ("none", "tiny-1L"), ("none", "tiny-2L"), ("chance", "-")}
    assert t4b.loc[("kd(alpha=0.5, temperature=4.0)", "tiny-1L"), "result"] == "loss"
    no_base = build_report(store, hashes, suite_spec=suite.spec, methods=["kd"], where={"temperature": 4})
    assert no_base.board["result"].tolist() == ["n/a"]  # the baseline is outside the subset: nothing to compare with
    small = build_report(store, hashes, suite_spec=suite.spec, students=["tiny-2L"], baseline="none")
    assert set(small.board["student"]) == {"tiny-2L", "-"} and "tiny-2L" in render_report(small, "terminal")
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
    csv = csv[csv["method"] != "chance"]
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
    from kdbench.executors.phases import open_store

    rows = open_store(results).runs()
    scores = np.array([r["metrics"]["test"]["accuracy"] * 100 for r in rows])
    board = md_tables((results / "leaderboard.md").read_text())["Leaderboard"]
    (row,) = [r for r in board if r["method"] == "none"]
    mean, std, n = parse_cell(row["movie-sentiment (accuracy)"])
    assert n == 2 and mean == pytest.approx(scores.mean(), abs=0.005) and std == pytest.approx(scores.std(ddof=1), abs=0.005)
    csv = pd.read_csv(results / "leaderboard.csv")
    csv = csv[csv["method"] == "none"]
    assert csv["mean"].iloc[0] == pytest.approx(scores.mean(), rel=1e-12)
    cost = md_tables((results / "leaderboard.md").read_text())["Cost"][0]
    walls = [r["cost"]["wall_s"] for r in rows]
    assert cost["wall (s)"] == f"{np.mean(walls):.2f} ± {np.std(walls, ddof=1):.2f}"  # every cost figure with its spread
    result = pd.read_csv(results / "leaderboard.csv", keep_default_na=False).set_index("method").loc["none", "result"]
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
    assert wide_table(leaderboard(runs_frame(rows)), marks=True).set_index("method").loc["kd", "glue-mnli (accuracy)"].endswith("(n=2) †")
    mnli = np.mean([(0.80 + 0.70) / 2, (0.82 + 0.74) / 2]) * 100
    assert wide.loc["kd", "avg over 2 tasks"] == f"{(mnli + 62.0) / 2:.2f}"
    assert wide.loc["kd", "glue-mnli (accuracy)"] == f"{81.0:.2f} ± {np.std([80, 82], ddof=1):.2f} (n=2)"  # plain table: no marks
    assert wide.loc["kd", "glue-mnli test_mismatched (accuracy)"].startswith("72.00 ± ")
    # a task missing for a row: no average for it
    assert "avg over 2 tasks" not in wide_table(leaderboard(runs_frame(rows[:2]))).columns


# ----------------------------------------------------------------- issue 11: known answers


from support.report_fixtures import custom_store, small_suite_data  # noqa: E402

KD = "kd"


def _report(store, suite, **kw):
    return build_report(store, [r.hash for r in suite.runs], {r.teacher_hash for r in suite.runs if r.teacher_hash},
                        suite_spec=suite.spec, title="t", **kw)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_constant_gap_small_n_exact_p_and_flags(tmp_path, n):
    """kd = none + 0.1 points on every seed: the exact test gives 2/2^n (never 0); n < 3 is
    flagged with its smallest attainable p in every format; no 'win' below n = 6."""
    suite, store = custom_store(tmp_path / "s.sqlite", small_suite_data(list(range(n))),
                                lambda m, s, seed: 0.70 + 0.01 * seed + (0.001 if m == KD else 0.0))
    rep = _report(store, suite, chance=False)
    row = rep.board.set_index("method").loc[KD]
    assert row["pairs"] == n and row["diff"] == pytest.approx(0.1)
    if n == 1:
        assert math.isnan(row["p"]) and row["result"] == "n/a" and rep.family == 0
    else:
        assert row["p"] == pytest.approx(2 / 2**n) and row["p_adj"] == row["p"] and row["result"] == "n.s." and rep.family == 1
        assert row["sd"] == pytest.approx(0.0, abs=1e-9) and (math.isinf(row["mdd"]) if n < 6 else True)
    assert bool(row["small_n"]) == (n < 3) and row["min_p"] == pytest.approx(min(1.0, 2 / 2**n))
    files = write_outputs(rep, ["md", "csv", "json", "html", "latex"], tmp_path, plots=False)
    text = {p.suffix: p.read_text() for p in files}
    flag = f"n < 3: smallest attainable p {min(1.0, 2 / 2**n):.2f}"
    assert (flag in text[".md"] and flag in __import__("html").unescape(text[".html"])) == (n < 3)
    assert ("(n=%d) †" % n in render_report(rep, "terminal")) == (n < 3) and ("$\\dagger$" in text[".tex"]) == (n < 3)
    assert pd.read_csv(tmp_path / "leaderboard.csv").set_index("method").loc[KD, "small_n"] == (n < 3)


def test_every_teacher_its_own_row_and_references_matched(tmp_path):
    data = small_suite_data([0, 1, 2, 3, 4], two_teachers=True)
    data["references"] = [
        {"task": "movie-sentiment", "method": "teacher", "teacher": "teacher-A", "value": 88.0, "citation": "A"},
        {"task": "movie-sentiment", "method": "teacher", "teacher": "teacher-B", "value": 79.0, "citation": "B"},
        {"task": "movie-sentiment", "method": "kd", "teacher": "teacher-B", "student": "tiny-2L", "value": 70.0, "std": 1.0,
         "n": 5, "protocol": "last epoch", "citation": "C"}]
    suite, store = custom_store(tmp_path / "s.sqlite", data, lambda m, s, seed: 0.70 + 0.01 * seed + (0.05 if s == "tiny-2L" else 0),
                                cost=lambda *k: {"wall_s": 2.0, "train_s": 1.5}, teacher_scores={"teacher-A": 0.9, "teacher-B": 0.8})
    rep = _report(store, suite, chance=False)
    wide = rep.wide().set_index("method")
    assert wide.loc["teacher [teacher-A]", "movie-sentiment (accuracy)"] == "90.00 (n=1)"
    assert wide.loc["teacher [teacher-B]", "movie-sentiment (accuracy)"] == "80.00 (n=1)"
    refs = rep.references
    assert len(refs) == 3  # 2 teacher references x their own teacher, no cross join
    t = refs[refs["method"] == "teacher"].set_index("teacher")
    assert t.loc["teacher-A", "reproduced"] == pytest.approx(90.0) and t.loc["teacher-B", "reproduced"] == pytest.approx(80.0)
    kd = refs[refs["method"] != "teacher"].iloc[0]
    scores = [75.0 + s for s in range(5)]
    lo, hi = (max(v, 0) for v in __import__("scipy").stats.t.interval(0.95, 4, loc=np.mean(scores), scale=np.std(scores, ddof=1) / math.sqrt(5)))
    assert kd["student"] == "tiny-2L" and kd["reproduced"] == pytest.approx(77.0) and kd["n"] == 5
    assert kd["inside_ci"] == ("yes" if lo <= 70.0 <= hi else "no") == "no"
    shown = md_tables(render_report(rep, "md"))["Paper comparison"]
    (row,) = [r for r in shown if r["method"] != "teacher"]
    assert row["reference"] == "70.00 ± 1.00 (n=5)" and row["protocol"] == "last epoch" and row["reference in CI"] == "no"
    tc = rep.teacher_cost.set_index("teacher")
    rows = store.runs()
    for t in store.teachers():
        used = sum(r["teacher_hash"] == t["hash"] and r["status"] == "done" and r["method"] != "none" for r in rows)  # none never reads it
        label = t["spec"]["label"]
        assert tc.loc[label, "runs"] == used and tc.loc[label, "amortised_train_s"] == pytest.approx(90.0 / used)
        student = "tiny-1L" if label == "teacher-A" else "tiny-2L"
        c = rep.cost.set_index(["method", "student"])
        assert c.loc[(KD, student), "train_with_teacher_s"] == pytest.approx(1.5 + 90.0 / used)
        assert c.loc[("none", student), "train_with_teacher_s"] == pytest.approx(1.5)  # labels only: no teacher share


def test_outside_runs_commits_and_data_fingerprints(tmp_path):
    def env(method, student, seed):
        fp = {"test": {"sha256": "aa" * 32, "n": 100}}
        if method == KD and seed == 1:
            fp = {"test": {"sha256": "bb" * 32, "n": 100}}  # kd's seed 1 read other data
        return {"git_commit": "c1" if seed == 0 else "c2+dirty", "data": fp}

    suite, store = custom_store(tmp_path / "s.sqlite", small_suite_data([0, 1, 2]), lambda m, s, seed: 0.7 + 0.01 * seed, env=env)
    smaller = build_suite_from(small_suite_data([0, 1]))
    rep = build_report(store, [r.hash for r in smaller.runs], suite_spec=smaller.spec, chance=False)
    assert sorted(rep.outside["seed"]) == [2, 2] and set(rep.outside["method"]) == {"none", KD}  # listed ...
    b = rep.board.set_index("method")
    assert b.loc["none", "n"] == 2  # ... never averaged in
    assert b.loc[KD, "data_flag"] == "mixed data" and b.loc[KD, "n"] == 0 and math.isnan(b.loc[KD, "mean"])
    assert b.loc[KD, "result"] == "mixed data" and rep.family == 0
    commits = rep.commits.set_index("commit")
    assert commits.loc["c1", "dirty"] == "no" and commits.loc["c2", "dirty"] == "yes" and commits.loc["c2", "runs"] == 2
    assert commits.loc["c1", "which runs"] == "kd: seeds 0; none: seeds 0" and commits.loc["c2", "which runs"] == "kd: seeds 1; none: seeds 1"
    data = rep.data.set_index("sha256")
    assert data.loc["aa" * 32, "runs"] == 3 and data.loc["bb" * 32, "runs"] == 1 and data.loc["aa" * 32, "size"] == "100"
    md = render_report(rep, "md")
    assert "Runs in the store outside this suite (not averaged)" in md and "Rows whose runs read different data" in md
    assert "| c2       | yes     |" in md and "Report made" in md


def build_suite_from(data):
    from kdbench.spec import build_suite

    return build_suite(data, source="custom")


def test_old_store_says_not_recorded(synthetic):
    _, _, report, _, _ = synthetic
    assert report.data["sha256"].tolist() == ["not recorded"]


def test_chance_row_is_the_test_majority_class(synthetic):
    suite, _, report, _, _ = synthetic
    from kdbench.data import load_task_data
    from kdbench.registry import get_registry

    run = suite.runs[0]
    labels = load_task_data(get_registry(), run.task, run.quiz_fraction, run.data_seed).labels("test")
    majority = np.bincount(labels).max() / len(labels) * 100
    chance = report.board.set_index("method").loc["chance"]
    assert chance["mean"] == pytest.approx(majority) and "chance" in report.wide().set_index("method").index


def test_benjamini_hochberg_option_against_scipy(synthetic):
    suite, store, holm, _, _ = synthetic
    from scipy import stats as st

    bh = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, correction="bh", chance=False)
    tested = bh.board[bh.board["p"].notna()]
    assert len(tested) == holm.family == 6
    assert tested["p_adj"].tolist() == pytest.approx(list(st.false_discovery_control(tested["p"].tolist(), method="bh")))


def test_sensitivity_anova_blocked_by_seed_against_a_regression(synthetic):
    """The temperature sweep ran the same seeds at every level: the ANOVA is blocked by seed,
    checked against the F test of nested least-squares fits (level + seed vs seed only)."""
    _, store, report, _, _ = synthetic
    from scipy import stats as st

    rows = [r for r in store.runs() if r["status"] == "done" and r["method"] == "kd" and r["student"] == "tiny-1L"]
    groups = [[r["metrics"]["test"]["accuracy"] * 100 for r in rows if r["params"] == {"alpha": 0.5, "temperature": t}]
              for t in (1.0, 2.0, 4.0)]
    cells = [(li, r["seed"], r["metrics"]["test"]["accuracy"] * 100) for li, t in enumerate((1.0, 2.0, 4.0)) for r in rows
             if r["params"] == {"alpha": 0.5, "temperature": t}]
    seeds = sorted({c[1] for c in cells})
    y = np.array([c[2] for c in cells])
    seed_cols = np.array([[1.0 if c[1] == s else 0.0 for s in seeds] for c in cells])
    level_cols = np.array([[1.0 if c[0] == k else 0.0 for k in (1, 2)] for c in cells])
    rss = [float(np.sum((y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) ** 2)) for x in (seed_cols, np.hstack([seed_cols, level_cols]))]
    dfe = len(y) - len(seeds) - 2
    f = ((rss[0] - rss[1]) / 2) / (rss[1] / dfe)
    row = report.sens_scores.set_index(["method", "factor"]).loc[("kd", "temperature")]
    assert row["design"] == "blocked by seed"
    assert row["anova_f"] == pytest.approx(f, rel=1e-9) and row["anova_p"] == pytest.approx(st.f.sf(f, 2, dfe), rel=1e-9)
    assert row["anova_f"] != pytest.approx(st.f_oneway(*groups).statistic)  # the seeds' own variation left the error term
    pooled = math.sqrt(sum(np.var(g, ddof=1) * (len(g) - 1) for g in groups) / sum(len(g) - 1 for g in groups))
    assert row["seed_std"] == pytest.approx(pooled)
    tested = report.sens_scores["anova_p"].notna()
    from kdbench.stats import adjust

    assert report.sens_scores.loc[tested, "anova_p_adj"].tolist() == pytest.approx(adjust(report.sens_scores.loc[tested, "anova_p"].tolist()))
    assert ("beyond seed noise" in row["verdict"]) and ("no evidence" in row["verdict"]) == (row["anova_p_adj"] >= 0.05)


def test_terminal_ends_with_the_leaderboard(synthetic, tmp_path, capsys):
    suite, _, _, folder, _ = synthetic
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite_data()))
    assert cli.main(["report", str(path), "--results", str(folder)]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    last = max(i for i, line in enumerate(out) if line == "Leaderboard")
    assert out[last + 1].startswith("method") and out[-1].startswith("▲/▼: Holm") and "family of 6 comparisons" in out[-1]
    assert "chance" in "\n".join(out[last:]) and "p_adj=" in "\n".join(out[last:])
    assert not any(line.startswith("95% CI:") for line in out)  # the legend is in the files and --verbose
    assert cli.main(["report", str(path), "--results", str(folder), "--verbose"]) == 0
    assert any(line.startswith("95% CI:") for line in capsys.readouterr().out.splitlines())


def test_run_warns_on_a_dirty_tree(monkeypatch, capsys):
    import subprocess

    import importlib

    environment = importlib.import_module("kdbench.train.environment")  # the module (kdbench.train re-exports a function of that name)

    monkeypatch.setattr(environment, "_GIT", None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=" M kdbench/x.py\0"))
    cli._warn_if_dirty()
    assert "uncommitted changes" in capsys.readouterr().err


def test_a_committed_results_store_being_written_is_not_a_dirty_tree(monkeypatch, capsys):
    """Adding runs to a suite whose store is committed (a leaderboard's) writes that store:
    the code is still its commit's. Any other changed tracked file still makes it dirty."""
    import subprocess

    import importlib

    environment = importlib.import_module("kdbench.train.environment")
    status = {"now": " M results/llm-real-cpu/store.sqlite\0 M results/x/store.sqlite-wal\0"}
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 0, stdout="aaaa" if cmd[3] == "rev-parse" else status["now"]))
    monkeypatch.setattr(environment, "_GIT", None)
    assert environment.git_commit() == "aaaa"
    cli._warn_if_dirty()
    assert capsys.readouterr().err == ""
    for changed in (" M kdbench/x.py\0 M results/a/store.sqlite\0", "R  kdbench/new.py\0old.py\0", " M results/a/README.md\0"):
        status["now"] = changed
        monkeypatch.setattr(environment, "_GIT", None)
        assert environment.git_commit() == "aaaa+dirty", changed
    assert environment.code_changes(" M a.sqlite\0 M b.py\0R  d.sqlite\0c.py\0") == ["b.py"]  # c.py is the old name


def test_code_changes_reads_what_git_prints_for_odd_names(tmp_path):
    """Names with spaces, non-ASCII letters and a rename, from a real repository's
    ``git status --porcelain -z`` (what git_commit runs): stores are not code, the rest is."""
    import importlib
    import subprocess

    environment = importlib.import_module("kdbench.train.environment")
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout  # noqa: E731
    git("init", "-q")
    files = ["results/my suite/store.sqlite", "résultats/store.sqlite", "kdbench/a b.py", "kdbench/old.py", "docs/é.md"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("one\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    status = lambda: git("status", "--porcelain", "-z", "--untracked-files=no")  # noqa: E731
    for name in files[:2]:
        (tmp_path / name).write_text("two\n")
    assert environment.code_changes(status()) == []  # only stores changed
    (tmp_path / "kdbench/a b.py").write_text("two\n")
    git("mv", "kdbench/old.py", "kdbench/new é.py")
    (tmp_path / "docs/é.md").write_text("two\n")
    assert sorted(environment.code_changes(status())) == ["docs/é.md", "kdbench/a b.py", "kdbench/new é.py"]


def test_run_fixes_the_recorded_commit_before_training(monkeypatch, capsys):
    """The commit is read when `kdbench run` starts: a commit made while the suite runs
    does not become the commit its later runs record."""
    import subprocess

    import importlib

    environment = importlib.import_module("kdbench.train.environment")  # the module (kdbench.train re-exports a function of that name)

    answers = {"rev-parse": "aaaa", "status": ""}
    monkeypatch.setattr(environment, "_GIT", None)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 0, stdout=answers[cmd[3]]))
    cli._warn_if_dirty()
    assert capsys.readouterr().err == ""
    answers["rev-parse"] = "bbbb"  # a commit made during the suite
    assert environment.git_commit() == "aaaa"


# ----------------------------------------------------------------- a report format from a plugin


from test_cli import external_plugin, kdbench_here  # noqa: E402,F401  (installs tests/external_plugin; one fixture for both files)


def test_a_plugin_report_format_is_listed_and_written(synthetic, tmp_path, external_plugin, capsys):
    suite, store, _, folder, _ = synthetic
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite_data()))
    out = tmp_path / "board.tsv"
    args = ["report", str(path), "--results", str(folder), "--format", "tsv", "--output", str(out)]
    code, _, err = kdbench_here(capsys, *args)  # the registry rebuilt in this process sees the installed package
    assert code == 0, err
    lines = out.read_text().splitlines()
    assert lines[0].split("\t")[:2] == ["method", "movie-sentiment (accuracy)"] and lines[-1].startswith("# 6 comparisons, holm")
    exp = expected(store.runs())
    row = next(line.split("\t") for line in lines if line.startswith("none [tiny-1L]"))
    mean, std, n = parse_cell(row[1])
    assert (mean, n) == (round(exp[("none", "tiny-1L")]["mean"], 2), exp[("none", "tiny-1L")]["n"])
    code, _, err = kdbench_here(capsys, *args[:-4], "--format", "tsvv")
    assert code == 2 and "tsv" in err  # the choices come from the registry, the plugin's included


def test_markdown_cells_with_table_syntax_keep_the_table_whole():
    """A label with '|' or a line break (labels come from suite files) is escaped, so every
    row of the Markdown table keeps its column count and the text survives."""
    import re

    from kdbench.report.text import render

    table = pd.DataFrame({"method": ["kd | x", "a\nb", "c\\d"], "score": ["1.00", "2.00", "3.00"]})
    lines = render(table, "md").strip().splitlines()
    cells = [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in lines]
    assert [len(c) for c in cells] == [2, 2, 2, 2, 2]
    assert [c[0].strip() for c in cells[2:]] == [r"kd \| x", "a b", r"c\\d"]


def test_environment_lists_not_recorded_where_some_finished_runs_lack_a_field():
    from kdbench.report.provenance import environments

    rows = [{"status": "done", "env": {"torch": "2.13", "host_allocator": "glibc, freed blocks kept", "data": {"x": 1}}, "cost": {}},
            {"status": "done", "env": {"torch": "2.13"}, "cost": {}},  # made before host_allocator was recorded
            {"status": "failed", "env": {"torch": "2.12", "extra": "y"}, "cost": {}}]  # unfinished runs are not read
    assert environments(rows) == {"host_allocator": ["glibc, freed blocks kept", "not recorded"], "torch": ["2.13"]}
