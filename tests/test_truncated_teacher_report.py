"""The report says which runs learnt from a truncated teacher (a top-k cache), read from
the runs' stored parameters, in every format; reports without such runs are unchanged."""

from __future__ import annotations

import json

import pytest
import yaml

from kdbench.report import build_report, write_outputs
from kdbench.spec import build_suite
from kdbench.store import DONE, ResultsStore
from kdbench.train.evaluation import select_metrics

SUITE = """
name: topk-report
tasks:
  - name: algorithmic
    options: {kind: addition, train_size: 64, eval_size: 8, digits: [1, 2], long_digits: [3, 3]}
teacher:
  model: causal-lm
  options: {tiny: {family: llama, layers: 2, hidden: 32, heads: 4, intermediate: 64, context: 48}}
students:
  - model: causal-lm
    options: {tiny: {family: llama, layers: 1, hidden: 16, heads: 2, intermediate: 32, context: 48}}
methods:
  - name: sft
  - name: token-kd
  - name: token-kd
    params: {teacher_topk: 16}
  - name: skew-kl
    params: {teacher_topk: 8}
seeds: [0, 1, 2]
budget: {steps: 4, batch_size: 16, eval_every: 4}
optimizer: {name: adamw, lr: 0.003}
baseline: sft
"""
SCORE = {"sft": 0.50, "token-kd": 0.60, "skew-kl": 0.55}


def store_of(path, methods=None):
    data = yaml.safe_load(SUITE)
    if methods is not None:
        data["methods"] = methods
    suite = build_suite(data, source="topk-test")
    store = ResultsStore(path)
    for spec in suite.runs:
        assert store.claim(spec)
        score = SCORE[spec.method] + 0.01 * spec.seed + (0.02 if spec.params.get("teacher_topk") else 0.0)
        history = [{"step": 4, **{s: {"exact_match": score, "nll": 1.0} for s in ("validation", "test", "test_long")}}]
        store.finish(spec, DONE, metrics=select_metrics(history, "final", "exact_match"), history=history, cost={"wall_s": 1.0}, env={})
    return suite, store


def test_rows_read_the_cache_size_from_the_stored_params(tmp_path):
    suite, store = store_of(tmp_path / "s.sqlite")
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    marks = {r.method: r.teacher_topk for r in rep.board.itertuples() if r.split == "test" and r.method not in ("teacher", "chance")}
    assert marks == {"sft": "", "token-kd(teacher_topk=full)": "", "token-kd(teacher_topk=16)": "top-16", "skew-kl": "top-8"}
    wide = rep.wide(marks=False).set_index("method")
    assert wide.loc["token-kd(teacher_topk=16)", "truncated teacher"] == "top-16"
    assert wide.loc["token-kd(teacher_topk=full)", "truncated teacher"] == "no" and wide.loc["sft", "truncated teacher"] == "no"


def test_a_report_without_truncated_runs_has_no_such_column(tmp_path):
    suite, store = store_of(tmp_path / "s.sqlite", methods=[{"name": "sft"}, {"name": "token-kd"}])
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    assert "teacher_topk" not in rep.board and "truncated teacher" not in rep.wide(marks=False)
    written = {p.name: p.read_text() for p in write_outputs(rep, ["md", "summary"], tmp_path / "out", plots=False)}
    assert not any("truncated teacher" in text for text in written.values())


@pytest.mark.parametrize("fmt, file", [("md", "leaderboard.md"), ("html", "report.html"), ("latex", "leaderboard.tex"),
                                       ("json", "report.json"), ("json", "leaderboard.json"), ("csv", "leaderboard.csv"),
                                       ("summary", "summary.md")])
def test_every_format_marks_the_truncated_rows(tmp_path, fmt, file):
    suite, store = store_of(tmp_path / "s.sqlite")
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, chance=False)
    written = {p.name: p.read_text() for p in write_outputs(rep, [fmt], tmp_path / "out", plots=False)}
    text = written[file]
    assert "top-16" in text and "top-8" in text
    if fmt == "json" and file == "report.json":
        board = json.loads(text)["leaderboard"]
        got = {r["method"]: r["teacher_topk"] for r in board if r["split"] == "test" and r["method"] not in ("teacher", "chance")}
        assert got["token-kd(teacher_topk=16)"] == "top-16" and got["token-kd(teacher_topk=full)"] == ""
        assert any("renormalised over those k tokens" in line for line in json.loads(text)["legend"])
    if fmt in ("md", "html", "latex"):
        assert "renormalised over those k tokens" in text  # the legend says what the mark means
        assert "truncated teacher (top-16, renormalised)" in text  # the statistics table's flag
    if fmt == "summary":
        assert "token-kd(teacher_topk=16) [truncated teacher: top-16]" in text and "skew-kl [truncated teacher: top-8]" in text
