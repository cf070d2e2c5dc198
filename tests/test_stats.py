"""kdbench.stats against hand computations and against the behaviour a test must have:
about 5% false positives on identical methods, near-certain detection of a real gap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from kdbench.stats import pareto_front, paired_test, spread, summarize


def test_summary_by_hand():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)
    half = 3.182446305284263 * std / 2  # t_{0.975, 3} from a table
    assert (s.mean, s.n) == (2.5, 4) and s.std == pytest.approx(std, rel=1e-12)
    assert s.ci_low == pytest.approx(2.5 - half, rel=1e-9) and s.ci_high == pytest.approx(2.5 + half, rel=1e-9)
    one = summarize([7.0, float("nan")])
    assert one.n == 1 and one.mean == 7.0 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert summarize([]).n == 0


def test_paired_t_by_hand():
    a = {0: 71.0, 1: 73.5, 2: 70.2, 3: 74.1}
    b = {0: 70.0, 1: 72.0, 2: 70.0, 3: 72.5, 9: 99.0}  # seed 9 has no partner: ignored
    d = np.array([1.0, 1.5, 0.2, 1.6])
    t = d.mean() / (d.std(ddof=1) / 2)
    p = 2 * st.t.sf(abs(t), 3)
    res = paired_test(a, b)
    assert res.n == 4 and res.diff == pytest.approx(d.mean()) and res.p == pytest.approx(p, rel=1e-9)
    assert res.result == ("win" if p < 0.05 else "n.s.")
    assert paired_test(b, a).result == ("loss" if p < 0.05 else "n.s.")


def test_degenerate_pairs():
    assert paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}) == paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    same = paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same.p == 1.0 and same.result == "n.s."
    shifted = paired_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert shifted.p == 0.0 and shifted.result == "win"
    single = paired_test({0: 5.0}, {0: 1.0})
    assert single.n == 1 and single.result == "n/a" and math.isnan(single.p)
    assert paired_test({0: 1.0}, {1: 1.0}).result == "n/a"


def test_false_positive_rate_and_power():
    rng = np.random.default_rng(0)
    trials, n = 2000, 5
    fp = sum(paired_test(dict(enumerate(rng.normal(0, 1, n))), dict(enumerate(rng.normal(0, 1, n)))).result != "n.s."
             for _ in range(trials))
    assert 0.035 < fp / trials < 0.065  # alpha = 0.05
    seed_effect = rng.normal(0, 5, (trials, n))  # large shared seed noise, small real gap: pairing must see it
    hits = sum(paired_test(dict(enumerate(s + 1.0 + rng.normal(0, 0.2, n))), dict(enumerate(s))).result == "win"
               for s in seed_effect[:200])
    assert hits >= 195


def test_spread_by_hand():
    sp = spread({1.0: 70.0, 2.0: 72.0, 4.0: 71.0, 8.0: float("nan")})
    assert sp.levels == 3 and sp.range == 2.0 and sp.std == pytest.approx(1.0) and sp.drop_from_best == pytest.approx(1.0)
    assert (sp.best_level, sp.worst_level) == (2.0, 1.0)


def test_pareto_front():
    costs = [1.0, 2.0, 2.0, 3.0, 0.5, float("nan")]
    scores = [70.0, 75.0, 74.0, 74.0, 60.0, 99.0]
    assert pareto_front(costs, scores) == [True, True, False, False, True, False]
