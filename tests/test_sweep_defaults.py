"""A swept field that some runs name and others leave at its default (a field added with
:func:`kdbench.api.added` is left out of a run's stored options at its default) reads as
that default in the sweep and sensitivity tables, not as a missing value: checked on the
committed quickstart-teacher-cpu store, whose MetaDistil entries sweep teacher_schedule
between the default (constant, not stored) and linear."""

from __future__ import annotations

import json
from pathlib import Path

from kdbench.api import added_defaults
from kdbench.registry import get_registry
from kdbench.report import build_report
from kdbench.spec import load_suite
from kdbench.store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]


def test_added_defaults_are_the_fields_left_out_of_hashes():
    d = added_defaults(get_registry().method("metadistil").Params)
    assert d["teacher_schedule"] == "constant"
    assert "alpha" not in d  # an ordinary field: always stored, never implied


def test_the_default_level_is_named_in_sweeps_and_sensitivity():
    suite = load_suite(ROOT / "benchmarks" / "quickstart-teacher-cpu.yaml")
    store = ResultsStore(ROOT / "results" / "quickstart-teacher-cpu" / "store.sqlite")
    stored = [json.loads(r["params"]) if isinstance(r["params"], str) else r["params"] for r in store.runs() if r["method"] == "metadistil"]
    assert sum("teacher_schedule" not in p for p in stored) == 4  # the premise: the default runs stored no value
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    levels = rep.sens_levels[rep.sens_levels["factor"] == "teacher_schedule"]
    assert sorted(map(str, levels["level"])) == ["constant", "linear"]  # one line: the sweep with the most levels (inner kd)
    means = {r.level: round(r.mean, 2) for r in levels.itertuples()}
    assert means == {"constant": 64.30, "linear": 67.15}  # the results README's students, inner kd
    scores = rep.sens_scores[rep.sens_scores["factor"] == "teacher_schedule"]
    assert set(scores["worst_level"]) | set(scores["best_level"]) <= {"constant", "linear"}


def test_a_wrapping_method_reads_its_inner_methods_defaults():
    """regression-soft-cpu: MetaDistil wraps pkd; its runs at pkd's default regression_soft
    (logits, an added field of pkd's) stored no value, and must share the 'logits' level
    with pkd's runs that named it (the interaction test compares them level by level)."""
    suite = load_suite(ROOT / "benchmarks" / "regression-soft-cpu.yaml")
    store = ResultsStore(ROOT / "results" / "regression-soft-cpu" / "store.sqlite")
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    levels = rep.sens_levels[rep.sens_levels["factor"] == "regression_soft"]
    assert {(r.method, r.level) for r in levels.itertuples()} == {(m, lv) for m in ("metadistil", "pkd") for lv in ("logits", "probabilities")}
    means = {(r.method, r.level): round(r.mean, 2) for r in levels.itertuples()}
    assert means[("metadistil", "logits")] == 48.71 and means[("pkd", "probabilities")] == 47.45
