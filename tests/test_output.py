"""What a person reads: run lines name a run by its entry's label or its non-default
parameters, the suite's one progress bar counts done and failed runs, and
``MethodEntry.label`` names the leaderboard row (refused when two rows would share a
name), changing names only: run hashes and every number stay."""

from __future__ import annotations

import copy
import io
import json

import pytest
import yaml

from kdbench.display import SuiteProgress, method_title, non_default_params, run_titles
from kdbench.report import build_report
from kdbench.spec import SuiteError, build_suite
from kdbench.store import DONE, ResultsStore
from support.report_fixtures import SMOKE


@pytest.fixture(scope="module")
def registry():
    from kdbench.registry import get_registry

    return get_registry()


def smoke(methods: list[dict], **changes) -> dict:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(methods=methods, **changes)
    return data


def test_a_run_line_shows_only_the_parameters_that_differ_from_the_defaults(registry):
    kd = registry.method("kd").Params
    defaults = kd().model_dump(mode="json")
    assert non_default_params(defaults, kd) == {}
    changed = defaults | {"temperature": defaults["temperature"] * 2}
    assert non_default_params(changed, kd) == {"temperature": defaults["temperature"] * 2}
    assert method_title("kd", defaults, kd) == "kd"
    assert method_title("kd", changed, kd) == f"kd(temperature={defaults['temperature'] * 2})"
    # a label replaces the method and its parameters, with the values its entry sweeps
    assert method_title("kd", changed, kd, label="soft") == "soft"
    assert method_title("kd", changed, kd, label="soft", swept={"alpha": 0.1}) == "soft(alpha=0.1)"


def test_metadistil_run_lines_are_short_and_the_store_keeps_the_full_spec(registry):
    suite = build_suite(smoke([{"name": "kd"}, {"name": "metadistil", "params": {"inner": "kd", "teacher_lr": 2.0e-5}},
                               {"name": "kd", "label": "hot", "params": {"temperature": [8.0, 16.0]}}]), registry=registry)
    titles = run_titles(suite, registry)
    by_method = {}
    for run in suite.runs:
        by_method.setdefault(titles[run.hash], []).append(run)
    assert set(by_method) == {"kd", "metadistil(teacher_lr=2e-05)", "hot(temperature=8.0)", "hot(temperature=16.0)"}
    meta = by_method["metadistil(teacher_lr=2e-05)"][0]
    assert len(meta.params) >= 8 and "virtual_lr" in meta.params  # the spec itself still holds every parameter, defaults filled in
    assert all(len(t) <= 130 for t in titles.values())


def test_the_suite_bar_counts_done_and_failed_runs_and_estimates_the_time_left():
    out = io.StringIO()
    bar = SuiteProgress(4, "s", enabled=True, file=out)
    for status in ("done", "failed", "diverged"):
        bar.finished(status)
    bar.close()
    last = out.getvalue().split("\r")[-1]
    assert (bar.done, bar.failed) == (1, 2)
    assert "suite s" in last and "3/4" in last and "done 1, failed 2" in last
    assert "<" in last  # tqdm's "elapsed<left" estimate of the time left
    quiet = io.StringIO()  # not a terminal and not asked for: nothing written
    SuiteProgress(2, "s", enabled=None, file=quiet).finished("done")
    assert quiet.getvalue() == ""


# ------------------------------------------------------------------ labels as row names


def store_of(tmp_path, data, registry):
    """Every run of ``data`` finished with a test accuracy made from its seed and params."""
    suite = build_suite(data, registry=registry)
    store = ResultsStore(tmp_path / "store.sqlite")
    for spec in suite.runs:
        assert store.claim(spec)
        acc = 0.5 + 0.01 * spec.seed + 0.001 * spec.params.get("temperature", 0)
        store.finish(spec, DONE, metrics={"step": 20, "selection": "final", "main_metric": "accuracy",
                                          "test": {"accuracy": acc}, "validation": {"accuracy": acc}},
                     history=[], cost={"wall_s": 1.0}, env={"git_commit": "abc"})
    return suite, store


def board(suite, store):
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="t", chance=False)
    b = rep.board[rep.board["split"] == "test"] if "split" in rep.board else rep.board
    return {r.method: (round(r.mean, 6), int(r.n)) for r in b.itertuples() if r.method != "teacher"}


def test_a_label_names_the_row_and_changes_neither_hashes_nor_numbers(tmp_path, registry):
    plain = smoke([{"name": "none"}, {"name": "kd", "params": {"temperature": 2.0}},
                   {"name": "kd", "params": {"temperature": 4.0}}])
    named = copy.deepcopy(plain)
    named["methods"][2]["label"] = "kd-hot"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    s1, st1 = store_of(tmp_path / "a", plain, registry)
    s2, st2 = store_of(tmp_path / "b", named, registry)
    assert [r.hash for r in s1.runs] == [r.hash for r in s2.runs]
    b1, b2 = board(s1, st1), board(s2, st2)
    # unlabelled: one method, two rows told apart by temperature
    assert set(b1) == {"none", "kd(temperature=2.0)", "kd(temperature=4.0)"}
    # labelled: the label names its row; kd's other runs no longer vary, so they are "kd"
    assert set(b2) == {"none", "kd", "kd-hot"}
    assert b2["kd-hot"] == b1["kd(temperature=4.0)"] == (pytest.approx(100 * (0.5 + (0.00 + 0.01) / 2 + 0.004)), 2)  # seeds 0 and 1
    assert b2["kd"] == b1["kd(temperature=2.0)"]


@pytest.mark.parametrize("methods, message", [
    ([{"name": "kd", "label": "x"}, {"name": "metadistil", "label": "x"}], "methods[1].label: methods[0] has the same label"),
    ([{"name": "kd"}, {"name": "metadistil", "label": "kd"}], "methods[1].label: methods[0] is the method 'kd' without a label"),
    ([{"name": "none", "label": "kd"}, {"name": "kd"}], "methods[0].label: methods[1] is the method 'kd' without a label"),
    ([{"name": "kd", "label": "teacher"}], "methods[0].label: 'teacher' names the report's teacher row"),
])
def test_two_entries_with_one_row_name_are_refused(registry, methods, message):
    with pytest.raises(SuiteError) as err:
        build_suite(smoke(methods), registry=registry)
    assert message in str(err.value)


def test_one_label_on_disjoint_students_is_allowed(registry):
    data = smoke([{"name": "kd", "label": "x", "students": ["tiny-1L"]},
                  {"name": "metadistil", "label": "x", "students": ["tiny-2L"]}])
    big = copy.deepcopy(data["students"][0]) | {"label": "tiny-2L"}
    big["options"]["tiny"]["layers"] = 2
    data["students"].append(big)
    data["baseline"] = "kd"
    assert len(build_suite(data, registry=registry).runs) == 4


def test_a_labelled_entry_of_the_baseline_method_is_compared_with_the_baseline_not_pooled_into_it(tmp_path, registry):
    # baseline kd is the unlabelled kd entry (T = 2); kd labelled kd-hot (T = 4) is a method
    # of its own: paired with kd like none is, never a second baseline configuration (which
    # left none unpaired, "2 baseline configurations", and paired by shared parameters)
    data = smoke([{"name": "none"}, {"name": "kd", "params": {"temperature": 2.0}},
                  {"name": "kd", "label": "kd-hot", "params": {"temperature": 4.0}}], baseline="kd")
    suite, store = store_of(tmp_path, data, registry)
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="t", chance=False)
    b = rep.board[rep.board["split"] == "test"] if "split" in rep.board else rep.board
    rows = {r.method: r for r in b.itertuples()}
    assert rows["kd"].result == "baseline"
    # accuracy = 0.5 + 0.01 seed + 0.001 T: every seed's difference is 100 x 0.001 x (T - 2)
    assert rows["kd-hot"].diff == pytest.approx(0.2) and rows["kd-hot"].pairs == 2
    assert rows["none"].diff == pytest.approx(-0.2) and rows["none"].pairs == 2
    assert {rows["none"].baseline_method, rows["kd-hot"].baseline_method} == {"kd"}
    # the cost ratios divide by the same runs
    cost = rep.cost.set_index("method")
    assert set(cost.index) == {"none", "kd", "kd-hot"}
