"""The paper comparisons end to end on tiny models: all six NLP methods on a real local
GLUE task and on a regression task, every CIFAR-track method on a generated CIFAR pair,
and transformer-only methods refused on a CNN before anything trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.report import suite_report
from kdbench.spec import SuiteError, build_suite
from test_cifar100 import write_cifar
from test_glue import make_glue_tree

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
TINY = {"layers": 2, "hidden": 16, "heads": 2, "intermediate": 32}
NLP_METHODS = [
    {"name": "none"},
    {"name": "kd"},
    {"name": "pkd", "params": {"beta": 10.0}},
    {"name": "tinybert"},
    {"name": "prokt"},
    {"name": "metadistil", "params": {"inner": "pkd", "beta": 10.0}},
]


def nlp_suite(task: dict) -> dict:
    return {
        "name": "tiny-paper",
        "tasks": [task],
        "teacher": {"model": "bert", "options": {"tiny": TINY, "dropout": 0.0},
                    "train": {"budget": {"steps": 4, "batch_size": 8}, "optimizer": {"lr": 1e-3}}},
        "students": [{"model": "bert", "options": {"tiny": TINY}, "label": "tiny-2L"}],  # pkd needs a layer below the top
        "methods": NLP_METHODS,
        "seeds": [0, 1],
        "budget": {"steps": 3, "batch_size": 8, "log_every": 1},
        "optimizer": {"lr": 1e-3},
        "quiz_fraction": 0.2,
    }


def run_and_check(data: dict, tmp_path: Path, metric_keys: set[str]) -> None:
    suite = build_suite(data)
    outcome = run_local(suite, tmp_path, progress=False)
    store = open_store(tmp_path)
    rows = store.runs([r.hash for r in suite.runs])
    bad = {r["method"]: r["error"] for r in rows if r["status"] != "done"}
    assert not bad, bad
    assert sorted(outcome.statuses.values()) == ["done"] * len(suite.runs)
    for r in rows:
        assert metric_keys <= set(r["metrics"]["test"]), r["metrics"]
    df, table = suite_report(store, [r.hash for r in suite.runs])
    assert sorted(df["method"].map(lambda m: m.split("(")[0]).unique()) == sorted(m["name"] for m in data["methods"])
    assert (df.groupby("method").size() == len(data["seeds"])).all()  # every method x seed
    for method, g in df.groupby("method"):  # the report's mean is the stored runs' mean
        row = table[table["method"] == method].iloc[0]
        cell = next(v for k, v in row.items() if k.startswith(data["tasks"][0]["name"]))
        assert cell.startswith(f"{np.mean(g['test'].astype(float)) * 100:.2f} ")


@pytest.mark.skipif(not (SHARED_GLUE / "RTE").is_dir(), reason="shared/data/glue not present")
def test_six_methods_on_real_rte(tmp_path):
    task = {"name": "glue-rte", "options": {"data_dir": str(SHARED_GLUE), "train_size": 80, "eval_size": 40, "max_length": 32}}
    run_and_check(nlp_suite(task), tmp_path, {"accuracy"})


def test_six_methods_on_regression_and_paraphrase_layouts(tmp_path):
    tree = make_glue_tree(tmp_path / "glue")
    run_and_check(nlp_suite({"name": "glue-stsb", "options": {"data_dir": str(tree), "max_length": 16}}), tmp_path / "stsb",
                  {"pearson", "spearman", "score"})
    run_and_check(nlp_suite({"name": "glue-qqp", "options": {"data_dir": str(tree), "max_length": 16}}), tmp_path / "qqp",
                  {"f1", "accuracy", "score"})


def cifar_suite(data_dir: Path) -> dict:
    return {
        "name": "tiny-cifar",
        "tasks": [{"name": "cifar100", "options": {"data_dir": str(data_dir), "validation_size": 40, "download": False}}],
        "pairs": [{"teacher": {"model": "cifar", "options": {"arch": "resnet14"},
                               "train": {"budget": {"steps": 2, "batch_size": 32}, "optimizer": {"name": "sgd", "lr": 0.05}}},
                   "student": {"model": "cifar", "options": {"arch": "resnet8"}, "label": "resnet8"}}],
        "methods": [{"name": m} for m in ("none", "kd", "fitnet", "at", "dkd", "prokt")]
        + [{"name": "crd", "params": {"nce_k": 64}}, {"name": "metadistil", "params": {"virtual_lr": 0.02, "teacher_lr": 3e-4}}],
        "seeds": [0],
        "budget": {"epochs": 1, "batch_size": 64, "eval_batch_size": 100},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    }


def test_one_epoch_of_a_cifar_pair_for_every_method(tmp_path):
    write_cifar(tmp_path / "data" / "cifar-100-python")
    data = cifar_suite(tmp_path / "data")
    suite = build_suite(data)
    assert {r.budget.epochs for r in suite.runs} == {1}
    run_and_check(data, tmp_path / "results", {"accuracy"})
    rows = open_store(tmp_path / "results").runs()
    assert {r["cost"]["steps"] for r in rows} == {(200 - 40 - 16) // 64}  # one epoch of the training split


def test_transformer_methods_refuse_a_cnn_before_training(tmp_path):
    data = cifar_suite(tmp_path / "nowhere")
    data["methods"] = [{"name": "pkd"}, {"name": "tinybert"}]
    with pytest.raises(SuiteError) as err:
        build_suite(data)
    text = "\n".join(err.value.problems)
    assert "method 'pkd' needs the student to expose ['hidden_states'], but model 'cifar' (cnn)" in text
    assert "method 'tinybert' needs the student to expose ['attention_scores', 'hidden_states']" in text
    assert not (tmp_path / "nowhere").exists()
