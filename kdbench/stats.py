"""The statistics behind every leaderboard number.

* Over seeds: mean, sample standard deviation (ddof=1), n, and a two-sided 95% confidence
  interval for the mean from Student's t distribution: ``mean ± t_{0.975, n-1} * std / sqrt(n)``
  (``scipy.stats.t``), clipped to the metric's range when one is given; undefined (NaN)
  for n < 2.
* Against a baseline: the exact paired sign-flip permutation test over matched seeds
  (two-sided, on the mean of ``method - baseline``): under the null hypothesis each
  seed's difference is as likely to have either sign, so the p-value is the share of the
  ``2^n`` sign assignments whose absolute mean difference is at least the observed one
  (enumerated exactly up to ``EXACT_MAX_N`` pairs, a seeded Monte Carlo of ``DRAWS``
  assignments beyond). It needs no normality, is defined for zero variance (a constant
  gap on 3 seeds gives p = 2/8 = 0.25, never 0), and its smallest attainable p-value is
  ``2 / 2^n`` (:func:`min_p`): 0.25 at n = 3, 0.0625 at n = 5, below 0.05 from n = 6.
* A family of comparisons is corrected together (:func:`adjust`): Holm's step-down
  (family-wise error, the default) or Benjamini-Hochberg (false discovery rate).
* Power: the minimum detectable difference (:func:`min_detectable_difference`) at 80%
  power and two-sided ``ALPHA`` from the observed std of the paired differences, with the
  paired t approximation; infinite when n is too small for any test to reach ``ALPHA``.
* Over a sweep: the spread of the per-level means (std with ddof=1, and max - min), the
  mean drop from the best level, and a one-way ANOVA of the seed scores across levels
  (``scipy.stats.f_oneway``) next to the pooled within-level seed std, so a factor's
  effect is told apart from seed noise.
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
POWER = 0.80
EXACT_MAX_N = 16
DRAWS = 200_000
CORRECTIONS = ("holm", "bh")
CI_METHOD = "Student t 95% interval for the mean over seeds (scipy.stats.t), clipped to the metric's range"
TEST_METHOD = ("exact paired sign-flip permutation test over matched seeds (two-sided; all 2^n sign assignments "
               f"up to n = {EXACT_MAX_N}, {DRAWS} seeded random ones beyond)")
CORRECTION_METHOD = {"holm": "Holm step-down (family-wise error rate)", "bh": "Benjamini-Hochberg (false discovery rate)"}


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float


def summarize(values: Sequence[float], confidence: float = CONFIDENCE,
              bounds: tuple[float, float] | None = None) -> Summary:
    """Mean, std (ddof=1), n and the t confidence interval of ``values`` (NaNs dropped),
    the interval clipped to ``bounds`` (the metric's range) when given."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(mean, math.nan, 1, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Summary(mean, std, n, low, high)


def min_p(n: int) -> float:
    """The smallest two-sided p-value the exact sign-flip test can give with n pairs."""
    return math.nan if n < 1 else min(1.0, 2.0 / 2.0**n)


def sign_flip_p(d: Sequence[float], exact_max_n: int = EXACT_MAX_N, draws: int = DRAWS, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip permutation test on the differences ``d``."""
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n == 0:
        return math.nan
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # floating-point ties count as ties
    if n <= exact_max_n:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(draws, n)) * 2.0 - 1.0
    hits = int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (hits + 1) / (draws + 1)


def min_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean paired difference detected with ``power`` at two-sided ``alpha``:
    ``(t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)``; inf when no test at this n
    can reach ``alpha``; NaN when the paired std is undefined (n < 2)."""
    if n < 2 or sd is None or math.isnan(sd):
        return math.nan
    if min_p(n) > alpha:
        return math.inf
    return float((_st.t.ppf(1 - alpha / 2, n - 1) + _st.t.ppf(power, n - 1)) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Paired:
    n: int  # matched pairs
    diff: float  # mean of (method - baseline)
    p: float  # NaN when there is no test
    result: str  # "win", "loss", "n.s." or "n/a" (from the raw p; a report decides on the adjusted one)
    sd: float = math.nan  # std (ddof=1) of the paired differences
    mdd: float = math.nan  # minimum detectable difference at 80% power
    min_p: float = math.nan  # smallest p attainable at this n


def verdict(p: float, diff: float, alpha: float = ALPHA) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "n.s." if not p < alpha else ("win" if diff > 0 else "loss")


def paired_test(method: Mapping[Hashable, float], baseline: Mapping[Hashable, float], alpha: float = ALPHA) -> Paired:
    """Exact sign-flip test of ``method`` against ``baseline`` over their common keys (seeds).
    One pair gives a p-value of 1 (nothing can be concluded), reported as "n/a"."""
    keys = sorted(set(method) & set(baseline), key=repr)
    d = np.asarray([method[k] - baseline[k] for k in keys], dtype=np.float64)
    n = len(keys)
    if n == 0:
        return Paired(0, math.nan, math.nan, "n/a")
    diff = float(d.mean())
    if n < 2:
        return Paired(n, diff, math.nan, "n/a", min_p=min_p(n))
    p = sign_flip_p(d)
    sd = float(d.std(ddof=1))
    return Paired(n, diff, p, verdict(p, diff, alpha), sd, min_detectable_difference(sd, n, alpha), min_p(n))


def adjust(pvalues: Sequence[float], method: str = "holm") -> list[float]:
    """Adjusted p-values of one family (NaNs are not tests: left NaN, not counted).
    ``holm``: step-down, family-wise error; ``bh``: Benjamini-Hochberg, false discovery rate."""
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; known: {', '.join(CORRECTIONS)}")
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    ranked = p[order]
    if method == "holm":
        adj = np.maximum.accumulate((m - np.arange(m)) * ranked)
    else:
        adj = np.minimum.accumulate((m / np.arange(1, m + 1) * ranked)[::-1])[::-1]
    out[order] = np.minimum(adj, 1.0)
    return out.tolist()


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


@dataclass(frozen=True)
class FactorTest:
    f: float
    p: float  # NaN when undefined (fewer than 2 levels, a level without 2 seeds, or no seed noise at all)
    within_std: float  # pooled within-level seed std (ddof=1 per level)
    df_between: int
    df_within: int


def factor_anova(groups: Sequence[Sequence[float]]) -> FactorTest:
    """One-way ANOVA of the seed scores across a factor's levels (``scipy.stats.f_oneway``)
    and the pooled within-level seed std it compares the factor's effect with."""
    gs = [np.asarray([v for v in g if v is not None and not math.isnan(v)], dtype=np.float64) for g in groups]
    gs = [g for g in gs if g.size]
    dfw = int(sum(g.size - 1 for g in gs))
    ssw = float(sum(((g - g.mean()) ** 2).sum() for g in gs))
    within = math.sqrt(ssw / dfw) if dfw > 0 else math.nan
    if len(gs) < 2 or any(g.size < 2 for g in gs) or ssw == 0:
        return FactorTest(math.nan, math.nan, within, len(gs) - 1, dfw)
    res = _st.f_oneway(*gs)
    return FactorTest(float(res.statistic), float(res.pvalue), within, len(gs) - 1, dfw)


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
