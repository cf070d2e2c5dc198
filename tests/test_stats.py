"""kdbench.stats against hand computations and against the behaviour a test must have:
at most 5% false positives on identical methods, near-certain detection of a real gap;
the exact sign-flip test against a brute-force enumeration; Holm and Benjamini-Hochberg
against scipy and a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

import itertools

from kdbench.stats import (adjust, factor_anova, min_detectable_difference, min_p, pareto_front, paired_test, sign_flip_p,
                           spread, summarize)


def test_summary_by_hand():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)
    half = 3.182446305284263 * std / 2  # t_{0.975, 3} from a table
    assert (s.mean, s.n) == (2.5, 4) and s.std == pytest.approx(std, rel=1e-12)
    assert s.ci_low == pytest.approx(2.5 - half, rel=1e-9) and s.ci_high == pytest.approx(2.5 + half, rel=1e-9)
    one = summarize([7.0, float("nan")])
    assert one.n == 1 and one.mean == 7.0 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert summarize([]).n == 0


def brute_force_p(d):
    """Every one of the 2^n sign assignments, one at a time."""
    obs = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-9 for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("d", [[1.0, 1.5, 0.2, 1.6], [0.3, -0.1, 0.4, 0.2, 0.5], [2.0, -1.0, 0.5], [1.0, 1.0, 1.0],
                               [0.0, 0.0], [0.7, -0.2, 0.1, 0.9, 0.4, 0.3, 0.8], [5.0]])
def test_sign_flip_matches_brute_force(d):
    assert sign_flip_p(d) == pytest.approx(brute_force_p(d), abs=1e-12)


def test_paired_sign_flip_by_hand():
    a = {0: 71.0, 1: 73.5, 2: 70.2, 3: 74.1}
    b = {0: 70.0, 1: 72.0, 2: 70.0, 3: 72.5, 9: 99.0}  # seed 9 has no partner: ignored
    d = np.array([1.0, 1.5, 0.2, 1.6])
    res = paired_test(a, b)
    # all four positive: only the all-plus and all-minus assignments reach |sum| = 4.3
    assert res.n == 4 and res.diff == pytest.approx(d.mean()) and res.p == pytest.approx(2 / 16)
    assert res.result == "n.s." and res.min_p == 2 / 16 and res.sd == pytest.approx(d.std(ddof=1))
    assert math.isinf(res.mdd)  # at n = 4 no test reaches 0.05
    assert paired_test(b, a).p == res.p


def test_degenerate_pairs_never_give_p_zero():
    same = paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same.p == 1.0 and same.result == "n.s."
    shifted = paired_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # a constant gap: p = 2/4, not 0
    assert shifted.p == 0.5 and shifted.result == "n.s."
    three = paired_test({s: 90.1 for s in range(3)}, {s: 90.0 for s in range(3)})
    assert three.p == pytest.approx(0.25) and three.sd == pytest.approx(0.0, abs=1e-12)
    single = paired_test({0: 5.0}, {0: 1.0})
    assert single.n == 1 and single.result == "n/a" and math.isnan(single.p) and single.min_p == 1.0
    assert paired_test({0: 1.0}, {1: 1.0}).result == "n/a"
    assert [min_p(n) for n in (1, 2, 3, 5, 6)] == [1.0, 0.5, 0.25, 0.0625, 0.03125]


def test_false_positive_rate_and_power():
    # n = 8: the exact test can reach 2/256 (at n = 5 its floor is 0.0625, so no test could "win")
    rng = np.random.default_rng(0)
    trials, n = 2000, 8
    fp = sum(paired_test(dict(enumerate(rng.normal(0, 1, n))), dict(enumerate(rng.normal(0, 1, n)))).result != "n.s."
             for _ in range(trials))
    assert fp / trials < 0.06  # alpha = 0.05; a permutation test is exact or conservative
    seed_effect = rng.normal(0, 5, (trials, n))  # large shared seed noise, small real gap: pairing must see it
    hits = sum(paired_test(dict(enumerate(s + 1.0 + rng.normal(0, 0.2, n))), dict(enumerate(s))).result == "win"
               for s in seed_effect[:200])
    assert hits >= 195


def test_holm_and_bh_against_scipy_and_by_hand():
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    # Holm by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, then running max
    assert adjust(p, "holm")[:3] + adjust(p, "holm")[4:] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjust(p, "holm")[3])
    finite = [0.01, 0.04, 0.03, 0.005]
    bh = adjust(finite, "bh")
    assert bh == pytest.approx(list(st.false_discovery_control(finite, method="bh")))
    assert adjust([0.9, 0.8], "holm") == [1.0, 1.0]
    with pytest.raises(ValueError):
        adjust(finite, "bonferroni-ish")


def test_minimum_detectable_difference_by_hand():
    sd, n = 2.0, 10
    expect = (st.t.ppf(0.975, 9) + st.t.ppf(0.8, 9)) * sd / math.sqrt(n)
    assert min_detectable_difference(sd, n) == pytest.approx(expect)
    assert math.isinf(min_detectable_difference(sd, 5)) and math.isnan(min_detectable_difference(sd, 1))


def test_interval_is_clipped_to_the_metric_range():
    s = summarize([99.0, 100.0, 100.0], bounds=(0.0, 100.0))
    assert s.ci_high == 100.0 and s.ci_low < 99.67
    wide = summarize([-28.0, 146.0], bounds=(0.0, 100.0))
    assert (wide.ci_low, wide.ci_high) == (0.0, 100.0)


def test_factor_anova_against_scipy():
    groups = [[70.0, 72.0, 71.0], [75.0, 74.0, 77.0], [70.5, 69.0, 71.5]]
    res = factor_anova(groups)
    ref = st.f_oneway(*groups)
    assert res.f == pytest.approx(ref.statistic) and res.p == pytest.approx(ref.pvalue)
    pooled = math.sqrt(sum(np.var(g, ddof=1) * 2 for g in groups) / 6)
    assert res.within_std == pytest.approx(pooled) and (res.df_between, res.df_within) == (2, 6)
    assert math.isnan(factor_anova([[1.0], [2.0, 3.0]]).p)  # a level with one seed: no test
    assert math.isnan(factor_anova([[1.0, 1.0], [2.0, 2.0]]).p)  # no seed noise at all: undefined, not p = 0


def test_spread_by_hand():
    sp = spread({1.0: 70.0, 2.0: 72.0, 4.0: 71.0, 8.0: float("nan")})
    assert sp.levels == 3 and sp.range == 2.0 and sp.std == pytest.approx(1.0) and sp.drop_from_best == pytest.approx(1.0)
    assert (sp.best_level, sp.worst_level) == (2.0, 1.0)


def test_pareto_front():
    costs = [1.0, 2.0, 2.0, 3.0, 0.5, float("nan")]
    scores = [70.0, 75.0, 74.0, 74.0, 60.0, 99.0]
    assert pareto_front(costs, scores) == [True, True, False, False, True, False]
