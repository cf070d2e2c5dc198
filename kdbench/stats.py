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
* The paired difference's interval (:func:`sign_flip_interval`): the shifts the same
  exact test does not reject at ``ALPHA`` (the test inverted), so a 95% interval excludes
  0 exactly when the raw p < 0.05; unbounded when n is too small for any p below 0.05.
* Power of the procedure actually used (:func:`procedure_mdd`): the smallest true mean
  difference that the exact sign-flip test, corrected over the report's family of m
  comparisons, detects with 80% power at its strictest step (raw p < ``ALPHA`` / m, Holm's
  first step and Benjamini-Hochberg's last), for normal paired differences with the
  observed std; by a seeded simulation of ``POWER_DRAWS`` samples (its Monte Carlo error
  on the power is stated: :data:`POWER_SE`). :func:`least_n`: the fewest pairs with which
  significance is possible at all in a family of m (``m * 2 / 2^n < ALPHA``).
  (:func:`min_detectable_difference` keeps the single unadjusted paired-t figure.)
* A practical margin (the smallest difference that matters): equivalence within it only
  by two one-sided exact sign-flip tests (:func:`tost_p`).
* Over a sweep: the spread of the per-level means (std with ddof=1, and max - min), the
  mean drop from the best level, and a one-way ANOVA of the seed scores across levels
  (``scipy.stats.f_oneway``) next to the pooled within-level seed std, so a factor's
  effect is told apart from seed noise. Where every level has the same seeds, the ANOVA
  is blocked by seed (:func:`blocked_anova`: levels x seeds without replication, seeds as
  blocks), since the settings share seeds. Whether method A is less sensitive than B
  (:func:`interaction_test`): the blocked ANOVA of the per-seed difference A - B across
  the levels (the method x factor interaction), and each method's spread with a seeded
  bootstrap interval over seeds (:func:`spread_interval`).
* Accuracy versus cost: the Pareto front (no other point is both cheaper and better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
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
INTERVAL_METHOD = ("the exact sign-flip test inverted: every shift of the paired differences it does not reject at "
                   f"two-sided p < {ALPHA} (per comparison, not adjusted for the family; unbounded below n = 6)")
POWER_DRAWS = 4000
POWER_SEED = 0
POWER_SE = math.sqrt(POWER * (1 - POWER) / POWER_DRAWS)  # Monte Carlo standard error of a simulated 80% power
POWER_EXACT_MAX_N = 14  # beyond, the procedure's MDD uses the paired t approximation at ALPHA / m
POWER_METHOD = (f"the smallest true mean difference the exact sign-flip test with the report's correction detects with "
                f"{POWER:.0%} power at its strictest step (raw p < {ALPHA} / m for a family of m), for normal paired "
                f"differences with the observed std: a seeded simulation of {POWER_DRAWS} samples per n and m (power "
                f"{POWER:.2f} ± {POWER_SE:.3f}, Monte Carlo standard error; paired t at {ALPHA} / m above n = "
                f"{POWER_EXACT_MAX_N})")
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0
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
    mdd: float = math.nan  # minimum detectable difference at 80% power (single unadjusted paired t)
    min_p: float = math.nan  # smallest p attainable at this n
    ci_low: float = math.nan  # the exact test's inverted 95% interval of the mean difference
    ci_high: float = math.nan
    diffs: tuple[float, ...] = ()  # the paired differences, in seed order


def verdict(p: float, diff: float, alpha: float = ALPHA, higher_is_better: bool = True) -> str:
    """win / loss / n.s. (n/a without a p-value) of a difference ``diff`` (method -
    baseline) at ``p``: a win is a significant move in the better direction, up when
    ``higher_is_better`` (the metric's stored direction), down otherwise."""
    if p is None or math.isnan(p):
        return "n/a"
    return "n.s." if not p < alpha else ("win" if (diff > 0) == bool(higher_is_better) else "loss")


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
    low, high = sign_flip_interval(d, 1 - alpha)
    return Paired(n, diff, p, verdict(p, diff, alpha), sd, min_detectable_difference(sd, n, alpha), min_p(n), low, high,
                  tuple(float(x) for x in d))


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


# ------------------------------------------------------------- differences and power


@lru_cache(maxsize=None)
def _signs(n: int, exact_max_n: int = EXACT_MAX_N, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """The sign assignments the test enumerates (all 2^n up to ``exact_max_n``, else seeded draws)."""
    if n <= exact_max_n:
        return ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, size=(draws, n)) * 2.0 - 1.0


def _accepts(d: np.ndarray, shift: float, alpha: float) -> bool:
    """True when the two-sided sign-flip test does not reject ``mean(d) = shift`` at ``alpha``."""
    return not sign_flip_p(d - shift) < alpha


def sign_flip_interval(d: Sequence[float], confidence: float = CONFIDENCE, tol: float = 1e-9) -> tuple[float, float]:
    """The interval for the mean paired difference consistent with :func:`sign_flip_p`:
    every shift ``s`` for which the test of ``d - s`` gives p >= 1 - ``confidence``, its
    ends found by bisection (the p-value is a step function of the shift). Unbounded
    (``-inf, inf``) when no p below 1 - ``confidence`` is attainable at this n; NaN for n < 2."""
    d = np.asarray([v for v in d if v is not None and not math.isnan(v)], dtype=np.float64)
    n = d.size
    if n < 2:
        return (math.nan, math.nan)
    alpha = 1 - confidence
    if not min_p(n) < alpha:
        return (-math.inf, math.inf)
    centre, scale = float(d.mean()), max(1.0, float(np.abs(d).max()))

    def edge(outside: float) -> float:
        inside = centre  # the test of d - mean(d) gives p = 1: accepted
        while abs(outside - inside) > tol * scale:
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if _accepts(d, mid, alpha) else (inside, mid)
        return (inside + outside) / 2

    # beyond every difference all signs agree: p = min_p < alpha, rejected
    return edge(float(d.min()) - scale), edge(float(d.max()) + scale)


def least_n(family: int, alpha: float = ALPHA) -> int:
    """The fewest pairs with which the exact test can be significant after a correction
    over ``family`` comparisons: the least n with ``family * 2 / 2^n < alpha``."""
    m = max(int(family), 1)
    n = 1
    while not m * min_p(n) < alpha:
        n += 1
    return n


def _power(z: np.ndarray, shift: float, threshold: float) -> float:
    """Share of the samples ``z + shift`` whose exact two-sided p is below ``threshold``."""
    n = z.shape[1]
    signs = _signs(n)
    hits = 0
    for chunk in np.array_split(z + shift, max(1, z.shape[0] * signs.shape[0] // 4_000_000)):
        obs = np.abs(chunk.sum(axis=1))
        tol = 1e-9 * np.maximum(1.0, np.abs(chunk).sum(axis=1))
        p = np.mean(np.abs(chunk @ signs.T) >= (obs - tol)[:, None], axis=1)
        hits += int(np.sum(p < threshold))
    return hits / z.shape[0]


@lru_cache(maxsize=None)
def procedure_mdd_factor(n: int, family: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The procedure's MDD in units of the paired std: the least standardized shift at
    which the exact sign-flip test reaches raw p < ``alpha`` / ``family`` with ``power``
    (seeded simulation of normal differences, common random numbers, bisection); inf
    when no such p is attainable at n; paired t approximation above POWER_EXACT_MAX_N."""
    if n < 2:
        return math.nan
    m = max(int(family), 1)
    if n < least_n(m, alpha):
        return math.inf
    if n > POWER_EXACT_MAX_N:
        a = alpha / m
        return float((_st.t.ppf(1 - a / 2, n - 1) + _st.t.ppf(power, n - 1)) / math.sqrt(n))
    z = np.random.default_rng(POWER_SEED + 1000 * n + m).standard_normal((POWER_DRAWS, n))
    lo, hi = 0.0, 1.0
    while _power(z, hi, alpha / m) < power:
        lo, hi = hi, hi * 2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _power(z, mid, alpha / m) >= power else (mid, hi)
    return hi


def procedure_mdd(sd: float, n: int, family: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable difference of the procedure the report uses (see the module
    docstring): ``procedure_mdd_factor(n, family) * sd``; inf when significance is
    impossible at n in this family, NaN when the paired std is undefined."""
    if n < 2 or sd is None or math.isnan(sd):
        return math.nan
    k = procedure_mdd_factor(int(n), int(family), alpha, power)
    return k if math.isinf(k) else k * float(sd)


def one_sided_p(d: Sequence[float], greater: bool) -> float:
    """Exact one-sided sign-flip p-value: the share of sign assignments whose sum is at
    least (``greater``) or at most the observed sum of ``d``."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        return math.nan
    signs = _signs(d.size)
    obs, sums = float(d.sum()), signs @ d
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))
    hits = np.sum(sums >= obs - tol) if greater else np.sum(sums <= obs + tol)
    return float(hits / signs.shape[0]) if d.size <= EXACT_MAX_N else float((hits + 1) / (signs.shape[0] + 1))


def tost_p(d: Sequence[float], margin: float) -> float:
    """Two one-sided exact sign-flip tests of equivalence within ``±margin``: the larger of
    the p-values for ``mean > -margin`` and ``mean < +margin``; NaN without a margin or
    with fewer than 2 pairs."""
    d = np.asarray([v for v in d if v is not None and not math.isnan(v)], dtype=np.float64)
    if d.size < 2 or margin is None or math.isnan(margin) or margin <= 0:
        return math.nan
    return max(one_sided_p(d + margin, greater=True), one_sided_p(d - margin, greater=False))


# ------------------------------------------------------------- sensitivity blocked by seed


@dataclass(frozen=True)
class BlockedTest:
    f: float
    p: float  # NaN when undefined (fewer than 2 levels or seeds, or no residual variation)
    df_levels: int
    df_error: int


def blocked_anova(table: np.ndarray) -> BlockedTest:
    """Two-way ANOVA without replication of a levels x seeds table (seeds as blocks): the
    F test of the levels against the level x seed residual. Seeds shared by every level
    take the seed-to-seed variation out of the error term."""
    y = np.asarray(table, dtype=np.float64)
    a, b = y.shape if y.ndim == 2 else (0, 0)
    if a < 2 or b < 2 or np.isnan(y).any():
        return BlockedTest(math.nan, math.nan, max(a - 1, 0), max((a - 1) * (b - 1), 0))
    grand = y.mean()
    ss_levels = b * float(((y.mean(axis=1) - grand) ** 2).sum())
    resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + grand
    ss_err = float((resid**2).sum())
    dfl, dfe = a - 1, (a - 1) * (b - 1)
    if ss_err <= 1e-12 * max(1.0, float((y**2).sum())):
        return BlockedTest(math.nan, math.nan, dfl, dfe)
    f = (ss_levels / dfl) / (ss_err / dfe)
    return BlockedTest(float(f), float(_st.f.sf(f, dfl, dfe)), dfl, dfe)


def level_spread(table: np.ndarray) -> float:
    """max - min of the per-level means of a levels x seeds table."""
    means = np.asarray(table, dtype=np.float64).mean(axis=1)
    return float(means.max() - means.min())


def spread_interval(tables: Sequence[np.ndarray], confidence: float = CONFIDENCE, draws: int = BOOTSTRAP_DRAWS,
                    seed: int = BOOTSTRAP_SEED) -> list[tuple[float, float]]:
    """Percentile bootstrap intervals, resampling seeds (the same draw for every table and
    level, so blocked comparisons stay paired), of each table's :func:`level_spread` and,
    when two tables are given, of their difference (first - second) last."""
    ts = [np.asarray(t, dtype=np.float64) for t in tables]
    b = ts[0].shape[1]
    idx = np.random.default_rng(seed).integers(0, b, size=(draws, b))
    boot = np.array([[level_spread(t[:, i]) for t in ts] for i in idx])
    if len(ts) == 2:
        boot = np.column_stack([boot, boot[:, 0] - boot[:, 1]])
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    return [tuple(float(x) for x in np.percentile(boot[:, j], q)) for j in range(boot.shape[1])]


@dataclass(frozen=True)
class Interaction:
    levels: int
    seeds: int
    spread_a: float  # max - min of A's level means
    spread_b: float
    ci_a: tuple[float, float]
    ci_b: tuple[float, float]
    ci_diff: tuple[float, float]  # spread_a - spread_b
    f: float  # blocked ANOVA of A - B across levels (the method x factor interaction)
    p: float


def interaction_test(a: np.ndarray, b: np.ndarray) -> Interaction:
    """Is method A's response to a factor different from B's? ``a`` and ``b``: levels x
    seeds tables on the same levels and seeds. The interaction is the blocked ANOVA of the
    per-seed difference ``a - b`` across the levels; each spread (max - min of the level
    means) and their difference carry seeded bootstrap intervals over seeds."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    test = blocked_anova(a - b)
    ca, cb, cd = spread_interval([a, b])
    return Interaction(a.shape[0], a.shape[1], level_spread(a), level_spread(b), ca, cb, cd, test.f, test.p)
