"""benchmarks/teacher_probe.py: re-trains a stored teacher-updating run with the live
teacher scored on validation and test; the student's numbers must be the stored run's,
and the teacher's validation entries the stored drift entries."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.spec import load_suite
from support.suites import smoke_data

ROOT = Path(__file__).resolve().parents[1]


def probe_module():
    spec = importlib.util.spec_from_file_location("teacher_probe", ROOT / "benchmarks" / "teacher_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_reproduces_the_stored_run_and_adds_the_teachers_test_scores(tmp_path, capsys, monkeypatch):
    # movie-rating-pairs: validation (500) and test (1,000) differ in size, regression
    data = smoke_data(methods=[{"name": "metadistil", "params": {"teacher_lr": 0.01, "virtual_lr": 0.01}}], seeds=[0],
                      tasks=[{"name": "movie-rating-pairs", "options": {"train_size": 200, "max_length": 32}}],
                      budget={"steps": 6, "batch_size": 16, "eval_every": 3, "log_every": 3})
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    suite = load_suite(path)
    run_local(suite, tmp_path / "results", progress=False)
    (row,) = open_store(tmp_path / "results").runs()
    assert row["status"] == "done", row["error"]
    before = sorted(p.name for p in (tmp_path / "results").rglob("*"))
    out_json = tmp_path / "probe.json"
    assert probe_module().main([str(path), "--method", "metadistil", "--seed", "0", "--results", str(tmp_path / "results"),
                                "--json", str(out_json)]) == 0
    assert sorted(p.name for p in (tmp_path / "results").rglob("*")) == before  # nothing written into the results
    probed = json.loads(out_json.read_text())["probed"]
    assert [h["step"] for h in probed] == [h["step"] for h in row["history"]] == [3, 6]
    for new, old in zip(probed, row["history"]):
        assert new["validation"] == old["validation"] and new["test"] == old["test"]  # the same run, re-trained
        t_new, t_old = new["teacher"], old["teacher"]
        assert t_new["validation"] == t_old["validation"] and t_new["divergence"] == pytest.approx(t_old["divergence"])
        assert set(t_new["test"]) == {"pearson", "spearman", "score", "mse"} and t_new["test_divergence"] > 0
        assert t_new["test"] != t_new["validation"] and set(t_new["start_test"]) == set(t_new["test"])
    text = capsys.readouterr().out
    assert "teacher test" in text and "starting teacher: validation" in text


def test_probe_refuses_an_ambiguous_or_missing_run(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(smoke_data()))
    with pytest.raises(SystemExit):  # smoke has no metadistil run
        probe_module().main([str(path), "--method", "metadistil", "--seed", "0", "--results", str(tmp_path / "results")])
    with pytest.raises(SystemExit):  # no store there: refused, and nothing is created
        probe_module().main([str(path), "--method", "kd", "--seed", "0", "--results", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()
