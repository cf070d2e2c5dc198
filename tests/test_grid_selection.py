"""A method entry's grid point chosen per task (and student) on validation, in the report
(``grid_selection: validation``). The stores are made up so that the setting best on
validation is never the one best on test: the report must choose by validation, break
ties by suite order, and put the chosen setting's runs in the leaderboard row."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdbench import cli
from kdbench.report import build_report, render_report, report_json
from kdbench.report.selection import SelectionError
from kdbench.spec import SuiteError, build_suite, entry_settings, load_suite
from kdbench.store import DONE, ResultsStore
from support.report_fixtures import SMOKE

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]
ROW = "kd (selected on validation from 3 settings)"


def grid_suite(temperatures=(1.0, 2.0, 4.0), **entry) -> dict:
    """none and a kd temperature sweep with grid selection; two tasks, two students."""
    data = yaml.safe_load(SMOKE.read_text())
    small = data["students"][0]
    big = copy.deepcopy(small) | {"label": "tiny-2L"}
    big["options"]["tiny"]["layers"] = 2
    data.update(name="grid-selection", seeds=SEEDS, baseline="none", students=[small, big],
                tasks=[{"name": "movie-sentiment"}, {"name": "movie-rating"}])
    data["methods"] = [{"name": "none"},
                       {"name": "kd", "params": {"alpha": 0.5, "temperature": list(temperatures)},
                        "grid_selection": "validation", **entry}]
    return data


#: (task, student) -> temperature -> (validation, test) at seed 0; seed s adds 0.01 * s to
#: validation and 0.02 * s to test. On every (task, student) the best test setting is not
#: the best validation setting.
TRUTH = {
    ("movie-sentiment", "tiny-1L"): {1.0: (0.70, 0.75), 2.0: (0.80, 0.72), 4.0: (0.78, 0.90)},
    ("movie-sentiment", "tiny-2L"): {1.0: (0.66, 0.95), 2.0: (0.60, 0.70), 4.0: (0.71, 0.65)},
    ("movie-rating", "tiny-1L"): {1.0: (0.50, 0.40), 2.0: (0.45, 0.60), 4.0: (0.30, 0.20)},
    ("movie-rating", "tiny-2L"): {1.0: (0.20, 0.60), 2.0: (0.25, 0.30), 4.0: (0.24, 0.10)},
}
BASE = {"movie-sentiment": (0.60, 0.60), "movie-rating": (0.10, 0.10)}


def truth(task: str, method: str, params: dict, student: str, seed: int) -> tuple[float, float]:
    val, test = BASE[task] if method == "none" else TRUTH[(task, student)][params["temperature"]]
    return val + 0.01 * seed, test + 0.02 * seed


def make_store(path: Path, data: dict, scores=truth, metrics=None):
    """Every run of ``data`` finished with (validation, test) = ``scores(task, method,
    params, student, seed)`` (0-1 scale) on the task's main metric."""
    suite = build_suite(data, source="grid-selection")
    store = ResultsStore(path)
    for spec in suite.runs:
        assert store.claim(spec)
        val, test = scores(spec.task.name, spec.method, spec.params, spec.student_label, spec.seed)
        main = "accuracy" if spec.task.name == "movie-sentiment" else "pearson"
        m = (metrics or (lambda v, t: {"validation": {main: v}, "test": {main: t}}))(val, test)
        store.finish(spec, DONE, metrics={"step": 20, "selection": "final", "main_metric": main, **m}, history=[],
                     cost={"wall_s": 1.0}, env={"git_commit": "abc123"})
    return suite, store


def report_of(suite, store, **kw):
    return build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="grid", chance=False, **kw)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    suite, store = make_store(tmp_path_factory.mktemp("grid") / "store.sqlite", grid_suite())
    return suite, store, report_of(suite, store)


def by_hand(task: str, student: str, temperature: float) -> dict[str, float]:
    """Validation and test mean / std (x100) of one setting over SEEDS, with numpy."""
    v = np.array([truth(task, "kd", {"temperature": temperature}, student, s)[0] for s in SEEDS]) * 100
    t = np.array([truth(task, "kd", {"temperature": temperature}, student, s)[1] for s in SEEDS]) * 100
    return {"val_mean": v.mean(), "val_std": v.std(ddof=1), "test_mean": t.mean(), "test_std": t.std(ddof=1)}


def best_on(split: int, task: str, student: str) -> float:
    table = TRUTH[(task, student)]
    return max(table, key=lambda temp: table[temp][split])


def test_the_chosen_setting_is_the_best_on_validation_not_on_test(grid):
    _, _, report = grid
    chosen = report.selection.chosen.set_index(["task", "student"])
    assert len(chosen) == 4
    for (task, student), row in chosen.iterrows():
        want = best_on(0, task, student)
        assert want != best_on(1, task, student)  # the store is built so that test would choose otherwise
        assert row["setting"] == f"temperature={want}" and json.loads(row["params"])["temperature"] == want
        exp = by_hand(task, student, want)
        for key in ("val_mean", "val_std", "test_mean", "test_std"):
            assert row[key] == pytest.approx(exp[key], abs=1e-9), (task, student, key)
        assert row["val_n"] == row["test_n"] == 3 and row["settings"] == row["searched"] == 3
        # runner-up: the second best validation mean, and the gap to it
        others = {t: by_hand(task, student, t)["val_mean"] for t in TRUTH[(task, student)] if t != want}
        runner = max(others, key=others.get)
        assert row["runner_up"] == f"temperature={runner}"
        assert row["gap"] == pytest.approx(exp["val_mean"] - others[runner], abs=1e-9)
        assert row["seed_std"] == pytest.approx(1.0, abs=1e-9)  # validation moves 1 point per seed in every setting


def test_the_leaderboard_row_and_the_comparison_use_the_chosen_setting(grid):
    _, _, report = grid
    board = report.board[report.board["method"].str.startswith("kd")]
    assert set(board["method"]) == {ROW}  # one row per student, no per-setting kd rows
    for r in board.itertuples():
        want = best_on(0, r.task, r.student)
        exp = by_hand(r.task, r.student, want)
        assert (r.mean, r.std, r.n) == (pytest.approx(exp["test_mean"]), pytest.approx(exp["test_std"]), 3)
        assert json.loads(r.params)["temperature"] == want
        # paired with none on the same seeds: test(chosen) - test(none) = t0 - b0 on every seed
        b0, t0 = BASE[r.task][1], TRUTH[(r.task, r.student)][want][1]
        assert r.diff == pytest.approx((t0 - b0) * 100)
        assert r.pairs == 3 and r.p == pytest.approx(0.25)  # 3 pairs, all of one sign: 2/2^3
    wide = report.wide(marks=False)
    assert {f"{ROW} [tiny-1L]", f"{ROW} [tiny-2L]"} <= set(wide["method"])


def test_the_full_sweep_stays_in_the_report(grid):
    _, _, report = grid
    settings = report.selection.settings
    assert len(settings) == 4 * 3
    for (task, student), g in settings.groupby(["task", "student"]):
        assert sorted(g["setting"]) == ["temperature=1.0", "temperature=2.0", "temperature=4.0"]
        order = sorted(TRUTH[(task, student)], key=lambda t: -TRUTH[(task, student)][t][0])
        assert [g.set_index("setting").loc[f"temperature={t}", "rank"] for t in order] == [1, 2, 3]
        assert g.loc[g["selected"], "setting"].tolist() == [f"temperature={order[0]}"]
        for r in g.itertuples():
            exp = by_hand(task, student, float(r.setting.split("=")[1]))
            assert r.test_mean == pytest.approx(exp["test_mean"]) and r.val_mean == pytest.approx(exp["val_mean"])
    levels = report.sens_levels[report.sens_levels["factor"] == "temperature"]
    assert sorted(set(levels["level"])) == [1.0, 2.0, 4.0]  # the sweep section still reads every setting


def test_every_format_shows_the_selection(grid, tmp_path):
    _, _, report = grid
    md = render_report(report, "md")
    assert "## Selected on validation" in md and "## Every setting searched (validation and test)" in md
    assert "never read to choose" in md and "noisy" in md
    table = md[md.index("## Selected on validation"):md.index("## Every setting searched")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| movie")]
    assert ["movie-sentiment", "tiny-1L", "kd", "temperature=2.0", "81.00 ± 1.00 (n=3)", "74.00 ± 2.00 (n=3)", "3",
            "temperature=4.0", "2.00", "1.00"] in rows and len(rows) == 4
    terminal = render_report(report, "terminal")
    assert "Selected on validation" in terminal and "Every setting searched" not in terminal
    assert "Every setting searched" in render_report(report, "terminal", verbose=True)
    out = report_json(report)
    assert len(out["selected_on_validation"]) == 4 and len(out["settings_searched"]) == 12


@pytest.mark.parametrize("order, expected", [((4.0, 1.0, 2.0), 4.0), ((2.0, 1.0, 4.0), 2.0), ((1.0, 2.0, 4.0), 2.0)])
def test_a_tie_on_validation_goes_to_the_first_setting_in_suite_order(tmp_path, order, expected):
    """T=2 and T=4 tie on validation on every seed; T=1 is best on test."""
    table = {1.0: (0.70, 0.99), 2.0: (0.80, 0.72), 4.0: (0.80, 0.60)}

    def scores(task, method, params, student, seed):
        return (0.5, 0.5) if method == "none" else tuple(x + 0.01 * seed for x in table[params["temperature"]])

    data = grid_suite(order)
    data.update(tasks=[{"name": "movie-sentiment"}], students=data["students"][:1])
    suite, store = make_store(tmp_path / "store.sqlite", data, scores)
    chosen = report_of(suite, store).selection.chosen
    assert chosen["setting"].tolist() == [f"temperature={expected}"] and chosen["gap"].tolist() == [0.0]


def test_one_seed_per_setting_is_said_and_has_no_seed_std(tmp_path):
    data = grid_suite()
    data.update(seeds=[0], tasks=[{"name": "movie-sentiment"}])
    suite, store = make_store(tmp_path / "store.sqlite", data)
    report = report_of(suite, store)
    assert report.selection.chosen["seed_std"].isna().all()
    md = render_report(report, "md")
    assert "n/a (1 seed per setting)" in md and "Every setting here has one seed." in md


def test_a_run_shared_with_an_entry_without_selection_keeps_its_own_row(tmp_path):
    data = grid_suite()
    data["methods"].append({"name": "kd", "params": {"alpha": 0.5, "temperature": 4.0}})  # also a grid point
    data.update(tasks=[{"name": "movie-sentiment"}], students=data["students"][:1])
    suite, store = make_store(tmp_path / "store.sqlite", data)
    board = report_of(suite, store).board
    rows = board.set_index("method")
    assert rows.loc[ROW, "mean"] == pytest.approx(by_hand("movie-sentiment", "tiny-1L", 2.0)["test_mean"])
    assert rows.loc["kd(temperature=4.0)", "mean"] == pytest.approx(by_hand("movie-sentiment", "tiny-1L", 4.0)["test_mean"])


def test_without_grid_selection_the_board_keeps_every_setting(tmp_path):
    data = grid_suite()
    del data["methods"][1]["grid_selection"]
    data.update(tasks=[{"name": "movie-sentiment"}], students=data["students"][:1])
    suite, store = make_store(tmp_path / "store.sqlite", data)
    report = report_of(suite, store)
    assert report.selection.chosen.empty and "Selected on validation" not in render_report(report, "md")
    assert len(report.board[report.board["method_name"] == "kd"]) == 3


# ----------------------------------------------------------------- refusals and hashes


def test_an_entry_that_sweeps_nothing_is_refused(tmp_path):
    data = grid_suite((2.0,))
    with pytest.raises(SuiteError, match=r"methods\[1\]\.grid_selection: method 'kd' sweeps nothing"):
        build_suite(data)
    data["methods"][1]["params"]["temperature"] = 2.0  # a plain value: nothing to choose either
    with pytest.raises(SuiteError, match="sweeps nothing"):
        build_suite(data)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["validate", str(path)]) == 2


def test_only_validation_can_select(tmp_path):
    data = grid_suite()
    data["methods"][1]["grid_selection"] = "test"
    with pytest.raises(SuiteError, match=r"methods\[1\]\.grid_selection: Input should be 'validation' \(allowed: 'validation'\) \(got 'test'\)"):
        build_suite(data)


def test_two_selected_entries_under_one_row_name_are_refused():
    data = grid_suite()
    data["methods"].append({"name": "kd", "params": {"alpha": [0.1, 0.9]}, "grid_selection": "validation"})
    with pytest.raises(SuiteError, match=r"methods\[2\]\.grid_selection: methods\[1\] is also 'kd'"):
        build_suite(data)
    data["methods"][2]["label"] = "kd-alpha"
    build_suite(data)


def test_runs_without_a_validation_split_are_refused_by_the_report(tmp_path):
    data = grid_suite()
    data.update(tasks=[{"name": "movie-sentiment"}], students=data["students"][:1])
    suite, store = make_store(tmp_path / "store.sqlite", data, metrics=lambda v, t: {"test": {"accuracy": t}})
    with pytest.raises(SelectionError, match="recorded no validation split"):
        report_of(suite, store)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["report", str(path), "--results", str(tmp_path), "--no-plots"]) == 2


def test_the_field_is_report_only_and_never_changes_a_run_hash():
    with_sel = build_suite(grid_suite())
    plain = grid_suite()
    del plain["methods"][1]["grid_selection"]
    assert [r.hash for r in with_sel.runs] == [r.hash for r in build_suite(plain).runs]
    assert all("grid_selection" not in json.dumps(r.identity()) for r in with_sel.runs)


def test_the_pkd_grid_suite_selects_its_36_points_on_validation():
    suite = load_suite(ROOT / "benchmarks" / "paper-glue-pkd-grid.yaml")
    (i, entry), = [(i, m) for i, m in enumerate(suite.spec.methods) if m.grid_selection]
    assert entry.name == "pkd" and entry.grid_selection == "validation"
    assert len(entry_settings(suite.spec, i)) == 36 and suite.spec.selection == "validation"
