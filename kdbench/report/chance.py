"""The chance row: what a constant prediction scores on each test split.

The store records no label distributions, so the report builder computes them from the
task data the runs read: each run's stored spec names its task (and options), quiz
fraction and data seed, and the registry loads that data from the local cache (no
download: a task whose data is not at hand gets no chance row, and the report says so).
The constant is the task objective's chance rule (:meth:`kdbench.api.Objective.chance`;
the built-ins: classification the test split's majority class, regression the
training-split mean), scored with the task's own metrics (a correlation of a constant is
undefined and shown as n/a). An objective without a chance rule gives no chance row."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from kdbench.report.frame import TEST


def constant_prediction(data: Any, train_labels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, str] | None:
    """(the constant predictions, the rule's name) of ``data``'s objective; None when the
    objective has no chance rule."""
    chance = data.objective.chance(train_labels, labels)
    return None if chance is None else (chance.predictions, chance.rule)


def _score(task: Any, pred: np.ndarray, labels: np.ndarray, metric: str) -> float:
    with np.errstate(all="ignore"):
        try:
            value = task.compute_metrics(pred, labels).get(metric)
        except Exception:  # a metric undefined for a constant prediction (e.g. a correlation)
            return math.nan
    return float(value) if value is not None and np.isfinite(value) else math.nan


def chance_scores(rows: Iterable[dict[str, Any]], registry: Any = None) -> dict[str, dict[str, Any]]:
    """Per task name: ``{"metric", "splits": {split: score (0-1)}, "rule", "error"}``,
    from the first stored run of each task."""
    from kdbench.data import load_task_data
    from kdbench.registry import get_registry
    from kdbench.spec import TaskSpec

    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        spec, metrics = r.get("spec") or {}, r.get("metrics") or {}
        if r["task"] in out or "task" not in spec or not metrics.get("main_metric"):
            continue
        metric = metrics["main_metric"]
        try:
            data = load_task_data(registry or get_registry(), TaskSpec(**spec["task"]), spec.get("quiz_fraction", 0.0),
                                  spec.get("data_seed", 0))
        except Exception as exc:  # data not at hand: no chance row, said in the report
            out[r["task"]] = {"metric": metric, "splits": {}, "rule": "no chance row, the task data is not at hand",
                              "error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        splits = [s for s in data.eval_splits if s == TEST or s.startswith(TEST + "_")]
        train = data.labels("train")
        consts = {s: constant_prediction(data, train, data.labels(s)) for s in splits}
        if any(c is None for c in consts.values()):
            out[r["task"]] = {"metric": metric, "splits": {}, "rule": f"no chance row, objective '{data.objective.name}' has no chance rule", "error": ""}
            continue
        scores = {s: _score(data.task, c[0], data.labels(s), metric) for s, c in consts.items() if c is not None}
        rule = next(iter(consts.values()))[1] if consts else ""  # type: ignore[index]
        out[r["task"]] = {"metric": metric, "splits": scores, "rule": rule, "error": "",
                          "sizes": {s: int(len(data.labels(s))) for s in splits}}
    return dict(sorted(out.items()))

