"""The statistics behind every leaderboard number.

* Over seeds: mean, sample standard deviation (ddof=1), n, and a two-sided 95% confidence
  interval for the mean from Student's t distribution: ``mean ± t_{0.975, n-1} * std / sqrt(n)``
  (``scipy.stats.t``); undefined (NaN) for n < 2.
* Against a baseline: the paired t-test over matched seeds (``scipy.stats.ttest_rel``,
  two-sided) of ``method - baseline``; a difference is a significant win or loss when
  p < ``ALPHA`` (0.05). With fewer than two pairs there is no test ("n/a").
* Over a sweep: the spread of the per-level means (std with ddof=1, and max - min) and the
  mean drop from the best level (best - mean of the levels: what choosing a level blindly
  costs on average).
* Accuracy versus cost: the Pareto front (no other point is both cheaper and better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats as _st

ALPHA = 0.05
CONFIDENCE = 0.95
CI_METHOD = "Student t 95% interval for the mean over seeds (scipy.stats.t)"
TEST_METHOD = "paired t-test over matched seeds (scipy.stats.ttest_rel, two-sided)"


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float

    @property
    def ci_half(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, std (ddof=1), n and the t confidence interval of ``values`` (NaNs dropped)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(mean, math.nan, 1, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(mean, std, n, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    n: int  # matched pairs
    diff: float  # mean of (method - baseline)
    p: float  # NaN when there is no test
    result: str  # "win", "loss", "n.s." or "n/a"


def paired_test(method: Mapping[Hashable, float], baseline: Mapping[Hashable, float], alpha: float = ALPHA) -> Paired:
    """Paired t-test of ``method`` against ``baseline`` over their common keys (seeds).

    When every difference is the same, the t statistic is undefined for scipy; we then
    report p = 1 for a zero difference and p = 0 for a constant non-zero one (the limit of
    the test as the spread goes to zero)."""
    keys = sorted(set(method) & set(baseline), key=repr)
    a = np.asarray([method[k] for k in keys], dtype=np.float64)
    b = np.asarray([baseline[k] for k in keys], dtype=np.float64)
    n = len(keys)
    if n == 0:
        return Paired(0, math.nan, math.nan, "n/a")
    d = a - b
    diff = float(d.mean())
    if n < 2:
        return Paired(n, diff, math.nan, "n/a")
    if np.all(d == d[0]):
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = float(_st.ttest_rel(a, b).pvalue)
    result = "n.s." if not p < alpha else ("win" if diff > 0 else "loss")
    return Paired(n, diff, p, result)


@dataclass(frozen=True)
class Spread:
    levels: int
    std: float  # ddof=1 over the per-level means
    range: float  # max - min
    drop_from_best: float  # best - mean of the levels
    best_level: Hashable
    worst_level: Hashable


def spread(level_means: Mapping[Hashable, float]) -> Spread:
    """Sensitivity of a score to one factor, from its mean at each level of the sweep."""
    items = [(k, float(v)) for k, v in level_means.items() if v is not None and not math.isnan(v)]
    if not items:
        return Spread(0, math.nan, math.nan, math.nan, None, None)
    vals = np.asarray([v for _, v in items])
    best = items[int(np.argmax(vals))][0]
    worst = items[int(np.argmin(vals))][0]
    std = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
    return Spread(len(vals), std, float(vals.max() - vals.min()), float(vals.max() - vals.mean()), best, worst)


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[bool]:
    """True for points on the front: no other point costs no more and scores no less, with
    at least one of the two strictly better."""
    c = np.asarray(costs, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    out = []
    for i in range(len(c)):
        if math.isnan(c[i]) or math.isnan(s[i]):
            out.append(False)
            continue
        dominated = np.any((c <= c[i]) & (s >= s[i]) & ((c < c[i]) | (s > s[i])))
        out.append(not bool(dominated))
    return out
