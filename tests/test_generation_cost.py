"""The cost table splits training time into sampling inside the steps and the update: the
columns read each run's stored ``generation_s`` and show '-' (NaN) for methods that never
sample, never 0."""

from __future__ import annotations

import math

import pytest
import yaml

from kdbench.report import build_report
from kdbench.report.sections import cost_display
from kdbench.spec import build_suite
from kdbench.store import DONE, ResultsStore
from support.report_fixtures import SMOKE


def test_generation_and_update_columns_against_the_stored_runs(tmp_path):
    from kdbench.registry import get_registry

    data = yaml.safe_load(SMOKE.read_text())
    data.update(methods=[{"name": "none"}, {"name": "kd"}], baseline="none")
    suite = build_suite(data, registry=get_registry())
    store = ResultsStore(tmp_path / "store.sqlite")
    gen = {}
    for spec in suite.runs:
        assert store.claim(spec)
        cost = {"wall_s": 12.0, "train_s": 10.0 + spec.seed}
        if spec.method == "kd":  # pretend kd sampled: 2 s on seed 0, 3 s on seed 1
            gen[spec.seed] = cost["generation_s"] = 2.0 + spec.seed
        store.finish(spec, DONE, metrics={"step": 20, "selection": "final", "main_metric": "accuracy",
                                          "test": {"accuracy": 0.5}, "validation": {"accuracy": 0.5}},
                     history=[], cost=cost, env={"git_commit": "abc"})
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="t", chance=False)
    cost = rep.cost.set_index("method")
    assert sorted(gen) == [0, 1]
    assert cost.loc["kd", "generation_s"] == pytest.approx(2.5)                 # (2 + 3) / 2
    assert cost.loc["kd", "update_s"] == pytest.approx(((10 - 2) + (11 - 3)) / 2)  # train - generation, per run
    assert cost.loc["kd", "generation_s_std"] == pytest.approx(math.sqrt(0.5))
    assert math.isnan(cost.loc["none", "generation_s"]) and math.isnan(cost.loc["none", "update_s"])
    shown = cost_display(rep.cost, "none").set_index("method")
    assert shown.loc["none", "generation in steps (s)"] == "-" and shown.loc["none", "update (s)"] == "-"
    assert shown.loc["kd", "generation in steps (s)"].startswith("2.50")
