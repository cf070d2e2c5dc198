"""Evaluation metrics and the seeded split carve-out that tasks share.

Metrics take predictions (class ids, or floats for regression) and labels as arrays and
return a float; an undefined value (a constant input to a correlation, no positive class
for F1) is 0.0, "no skill", never NaN. :data:`METRICS` names them for tasks that choose
their metrics by name. :func:`carve_splits` is the one way a task cuts fixed splits out
of one set of examples: one seeded permutation, independent of any run.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from kdbench.api import MetricInfo


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Share of predictions equal to their label."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def binary_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class 1: 2TP / (2TP + FP + FN); 0 when there is no positive at all."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp, fp, fn = int(np.sum(p & y)), int(np.sum(p & ~y)), int(np.sum(~p & y))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation from the confusion matrix C (rows true, columns predicted),
    multi-class form (Gorodkin 2004); for two classes it is
    (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)). 0 when undefined."""
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    k = int(max(y.max(initial=0), p.max(initial=0))) + 1
    conf = np.zeros((k, k), dtype=np.float64)  # float64: the products overflow int64 on big sets
    np.add.at(conf, (y, p), 1.0)
    n, correct = conf.sum(), np.trace(conf)
    t, q = conf.sum(axis=1), conf.sum(axis=0)  # true and predicted class counts
    denom = math.sqrt((n * n - q @ q) * (n * n - t @ t))
    return float((correct * n - t @ q) / denom) if denom > 0 else 0.0


def _correlation(fn: Any, predictions: np.ndarray, labels: np.ndarray) -> float:
    x, y = np.asarray(predictions, dtype=np.float64).reshape(-1), np.asarray(labels, dtype=np.float64).reshape(-1)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0  # undefined for a constant input: no skill
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = float(fn(x, y)[0])
    return r if math.isfinite(r) else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson's r of predictions and labels (0 for a constant input)."""
    from scipy import stats  # here, not at the top: every task imports this module, few need scipy

    return _correlation(stats.pearsonr, predictions, labels)


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman's rank correlation of predictions and labels (0 for a constant input)."""
    from scipy import stats

    return _correlation(stats.spearmanr, predictions, labels)


#: Metrics by the names tasks report them under.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": binary_f1, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


#: Metric names (or ``name_...`` prefixes) read as proportions in [0, 1], and as correlations
#: in [-1, 1] ("score": combined GLUE-style scores, which may average a correlation).
PROPORTIONS = ("accuracy", "f1", "precision", "recall", "exact_match", "auc")
CORRELATIONS = ("mcc", "matthews", "pearson", "spearman", "corr", "score")
#: Metric names (or prefixes) where lower is better: errors, losses, perplexities.
ERRORS = ("mse", "rmse", "mae", "loss", "perplexity", "ppl", "error", "ece", "nll", "bits_per")


def _named(name: str, stems: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + "_") for p in stems)


def metric_info_by_name(metric: str) -> MetricInfo:
    """The usual reading of a metric from its name, for objectives' defaults: errors,
    losses and perplexities (:data:`ERRORS`) lower is better, shown as they are (x1,
    bounded below by 0); proportions (:data:`PROPORTIONS`) x100 in [0, 1]; correlations
    (:data:`CORRELATIONS`) x100 in [-1, 1]; any other name higher is better, x100,
    unbounded (KD papers' convention for scores)."""
    name = str(metric or "").lower()
    if _named(name, ERRORS):
        return MetricInfo(higher_is_better=False, scale=1.0, bounds=(0.0, None))
    if _named(name, PROPORTIONS):
        return MetricInfo(True, 100.0, (0.0, 1.0))
    if any(c in name for c in CORRELATIONS):
        return MetricInfo(True, 100.0, (-1.0, 1.0))
    return MetricInfo(True, 100.0, (None, None))


def carve_splits(n: int, seed: int, sizes: Mapping[str, int], rest: str = "train",
                 limits: Mapping[str, int | None] | None = None, sort: bool = False) -> dict[str, np.ndarray]:
    """Indices of ``range(n)`` cut into named parts by one permutation seeded by ``seed``:
    the parts in ``sizes`` take that many indices in order, ``rest`` takes the remainder.
    ``limits`` caps a part at a prefix of its random order (so a smaller training set is
    nested in a larger one and never moves an example between parts); ``sort`` returns
    each part in ascending order. The caller checks that ``rest`` is not empty."""
    perm = np.random.default_rng(seed).permutation(n)
    parts, at = {}, 0
    for name, size in sizes.items():
        parts[name], at = perm[at : at + size], at + size
    parts[rest] = perm[at:]
    for name, limit in (limits or {}).items():
        if limit is not None:
            parts[name] = parts[name][:limit]
    return {name: np.sort(idx) if sort else idx for name, idx in parts.items()}
