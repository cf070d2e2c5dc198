"""The objective sizes the model's head, tasks declare their objective (and a task written
the older way, declaring only a ``Problem``, still works), and labels the objective cannot
take are refused at ``kdbench validate`` (exit 2, nothing written) where the task can read
them cheaply."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdbench.api import Problem, Task
from kdbench.cli import main
from kdbench.hookspecs import hookimpl
from kdbench.registry import Registry, get_registry, make_plugin_manager, set_registry
from kdbench_plugins.models.cifar import CifarFactory, CifarOptions
from kdbench_plugins.models.cnn import CNNFactory, CNNOptions
from kdbench_plugins.models.hf import HFFactory, HFOptions
from support.suites import smoke_data

MovieSentiment = get_registry().task("movie-sentiment")


class SevenWide:
    """An objective of its own (not classification or regression): only num_outputs."""

    def num_outputs(self) -> int:
        return 7


@pytest.mark.parametrize("build", [
    lambda obj: CNNFactory().build(CNNOptions(), obj).head.out_features,
    lambda obj: CifarFactory().build(CifarOptions(arch="resnet8"), obj).head.out_features,
    lambda obj: HFFactory().build(HFOptions(family="bert", tiny={"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}),
                                  obj).head.out_features,
])
def test_heads_are_as_wide_as_the_objective_says(build) -> None:
    assert build(SevenWide()) == 7
    reg = get_registry()
    assert build(reg.objective_for(reg.task("glue-mnli")(reg.task("glue-mnli").Options()))) == 3
    assert build(reg.objective_for(reg.task("glue-stsb")(reg.task("glue-stsb").Options()))) == 1
    assert build(Problem("regression", 1)) == 1 and build(Problem("classification", 5)) == 5  # a bare Problem, as before


def test_a_task_declares_its_objective_and_the_problem_follows() -> None:
    reg = get_registry()
    rating = reg.task("movie-rating")(reg.task("movie-rating").Options())
    assert (rating.objective, rating.num_labels, rating.problem) == ("regression", 1, Problem("regression", 1))
    mnli = reg.task("glue-mnli")(reg.task("glue-mnli").Options())
    assert (mnli.objective, mnli.problem) == ("classification", Problem("classification", 3))


def test_a_task_declaring_only_a_problem_still_names_its_objective() -> None:
    class Legacy(MovieSentiment):  # type: ignore[misc, valid-type]
        objective = Task.objective  # as a task written before objectives: no objective of its own

        @property
        def problem(self) -> Problem:
            return Problem("regression", 1)

    task = Legacy(Legacy.Options())
    assert task.objective == "regression" and get_registry().objective_for(task).num_outputs() == 1


def test_a_task_declaring_neither_is_told_what_to_declare() -> None:
    class Bare(MovieSentiment):  # type: ignore[misc, valid-type]
        name = "bare"
        objective = Task.objective

    with pytest.raises(TypeError, match="task 'bare' declares no objective: set 'objective'"):
        Bare(Bare.Options()).problem


# ----------------------------------------------------------------- labels at validate


def _with_task(objective: str, num_labels: int, labels: list) -> Registry:
    class OddLabels(MovieSentiment):  # type: ignore[misc, valid-type]
        name = "odd-labels"

        def local_labels(self) -> dict[str, np.ndarray]:
            return {"train": np.asarray(labels)}

    OddLabels.objective, OddLabels.num_labels = objective, num_labels  # type: ignore[assignment]
    plugin = types.SimpleNamespace(kdbench_tasks=hookimpl(lambda: [OddLabels]))
    return Registry(*make_plugin_manager([plugin]))


def _validate(tmp_path: Path, data: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**data, "results": "out"}))
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("objective,num_labels,labels,why", [
    ("classification", 3, [0, 2, 3, 5], "split 'train' has labels [3, 5] outside 0..2"),
    ("classification", 2, [0, 0.5], "split 'train' has labels [0.5] that are not class ids"),
    ("regression", 1, ["1.5", "high"], "split 'train' has labels that are not numbers"),
])
def test_labels_the_objective_cannot_take_are_refused_at_validate(tmp_path, monkeypatch, capsys, objective, num_labels,
                                                                   labels, why) -> None:
    monkeypatch.chdir(tmp_path)
    set_registry(_with_task(objective, num_labels, labels))
    try:
        code, err = _validate(tmp_path, smoke_data(tasks=[{"name": "odd-labels"}]), capsys)
    finally:
        set_registry(None)
    assert code == 2 and f"task 'odd-labels': {why}" in err
    assert not (tmp_path / "out").exists()


def test_labels_that_fit_validate(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    set_registry(_with_task("classification", 3, [0, 1, 2]))
    try:
        code, _ = _validate(tmp_path, smoke_data(tasks=[{"name": "odd-labels"}]), capsys)
    finally:
        set_registry(None)
    assert code == 0


def test_a_local_ratings_file_with_a_rating_that_is_no_number_is_refused_at_validate(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "snippets.txt").write_text("1\t1.5\tgood film\n2\t-2\tdull\n3\tgreat\tfine cast\n")
    data = smoke_data(tasks=[{"name": "movie-rating", "options": {"source_file": str(tmp_path / "snippets.txt")}}])
    code, err = _validate(tmp_path, data, capsys)
    assert code == 2 and "snippets.txt:3: rating 'great' is not a number" in err
    assert not (tmp_path / "out").exists()


def test_glue_local_labels_are_the_tsv_files_labels(tmp_path) -> None:
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nok\t0\n")
    cls = get_registry().task("glue-sst2")
    labels = cls(cls.Options(source="local", data_dir=str(tmp_path))).local_labels()
    assert {k: v.tolist() for k, v in labels.items()} == {"train.tsv": [1, 0, 1], "dev.tsv": [0]}
    assert cls(cls.Options()).local_labels() is None  # the hub: checked when the data loads
