"""Sensitivity: how a method's score moves along each swept factor, and whether that
movement is larger than the seed noise within a setting (one-way ANOVA)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from kdbench import stats
from kdbench.report.aggregate import group_info, summ
from kdbench.store import DONE

LEVEL_COLS = ["task", "method", "factor", "level", "at", "mean", "std", "n", "ci_low", "ci_high"]
SCORE_COLS = ["task", "method", "factor", "levels", "at", "std", "range", "drop_from_best", "best_level", "worst_level",
              "seed_std", "anova_f", "anova_p", "anova_p_adj", "verdict"]


def _level_key(v: Any) -> tuple:
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def _line(settings: list[dict], factors: list[str], f: str, keys: list[str]) -> tuple[dict, list[bool]] | None:
    """The configurations that hold every factor but ``f`` fixed: the line with the most
    levels (ties: the one closest to the most common setting, the centre of a
    one-factor-at-a-time design)."""
    others = [k for k in keys if k != f]
    groups: dict[str, set[str]] = {}
    cfg_count: dict[str, set[str]] = {}
    for s in settings:
        o = json.dumps({k: s.get(k) for k in others}, sort_keys=True)
        groups.setdefault(o, set()).add(json.dumps(s.get(f)))
        cfg_count.setdefault(o, set()).add(json.dumps(s, sort_keys=True))
    common = {k: pd.Series([json.dumps(s.get(k)) for s in settings]).value_counts().index[0] for k in others}
    center_hits = {o: sum(json.dumps(json.loads(o).get(k)) == common[k] for k in others) for o in groups}
    line = max(groups, key=lambda o: (len(groups[o]), center_hits[o], len(cfg_count[o])))
    if len(groups[line]) < 2:
        return None
    fixed = json.loads(line)
    return fixed, [all(json.dumps(s.get(k)) == json.dumps(fixed.get(k)) for k in others) for s in settings]


def _sweep(task: str, name: str, f: str, sub: pd.DataFrame, at: str, order: dict[str, int]) -> tuple[list[dict], dict]:
    levels, means, groups = [], {}, []
    info = group_info(sub)  # the runs' stored scale and direction
    keys = sorted(sub["level"].map(json.dumps).unique(), key=lambda v: (order.get(json.loads(v), len(order)), _level_key(json.loads(v))))
    for key in keys:
        level = json.loads(key)
        scores = sub.loc[sub["level"].map(json.dumps) == key, "score"].dropna()
        s = summ(scores, info=info)
        groups.append([float(v) * info.scale for v in scores])
        means[level if not isinstance(level, list) else key] = s.mean
        levels.append({"task": task, "method": name, "factor": f, "level": level, "at": at, "mean": s.mean, "std": s.std,
                       "n": s.n, "ci_low": s.ci_low, "ci_high": s.ci_high})
    sign = 1.0 if info.higher_is_better else -1.0  # spread's best is the highest: negated, a lower-is-better best is the lowest
    sp, an = stats.spread({k: sign * v for k, v in means.items()}), stats.factor_anova(groups)
    score = {"task": task, "method": name, "factor": f, "levels": sp.levels, "at": at, "std": sp.std, "range": sp.range,
             "drop_from_best": sp.drop_from_best, "best_level": sp.best_level, "worst_level": sp.worst_level,
             "seed_std": an.within_std, "anova_f": an.f, "anova_p": an.p, "anova_p_adj": np.nan, "verdict": ""}
    return levels, score


def verdict(r: dict[str, Any], alpha: float = stats.ALPHA) -> str:
    """The one sentence the test supports about a factor's effect on a method."""
    p = r["anova_p_adj"]
    if p != p:
        return (f"no test: {r['factor']} needs at least 2 seeds per level and some seed noise; the spread "
                f"{r['range']:.2f} cannot be told apart from seed noise")
    if p < alpha:
        return f"{r['factor']} changes {r['method']}'s score beyond seed noise (ANOVA adjusted p {p:.3g})"
    return (f"no evidence that {r['factor']} changes {r['method']}'s score beyond seed noise (ANOVA adjusted p {p:.3g}; "
            f"spread {r['range']:.2f} vs within-setting seed std {r['seed_std']:.2f})")


def sensitivity(df: pd.DataFrame, student_order: list[str] | None = None, correction: str = "holm") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(levels, scores). For each task and method name, every factor that varies among its
    runs (a parameter, or ``student``) is a sweep along one line of the grid (see
    :func:`_line`). ``levels``: mean/std/n over seeds at each level; ``scores``: spread of the
    level means (std ddof=1, max - min, drop from best), the pooled within-level seed std,
    a one-way ANOVA of the seed scores across levels (its p corrected over every sweep of
    the report) and the sentence it supports."""
    levels, scores = [], []
    if df.empty:
        return pd.DataFrame(columns=LEVEL_COLS), pd.DataFrame(columns=SCORE_COLS)
    order = {s: i for i, s in enumerate(student_order or [])}
    done = df[df["status"] == DONE]
    for (task, name), g in done.groupby(["task", "method_name"], sort=True):
        configs = g.assign(p=g["params"].map(json.loads))
        settings = [dict(p) | {"student": s} for p, s in zip(configs["p"], configs["student"])]
        keys = sorted(set().union(*(s.keys() for s in settings)))
        factors = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
        for f in factors:
            found = _line(settings, factors, f, keys)
            if found is None:
                continue
            fixed, mask = found
            at = ", ".join(f"{k}={fixed.get(k)}" for k in factors if k != f)
            sub = configs[mask].assign(level=[s.get(f) for s, m in zip(settings, mask) if m])
            lv, sc = _sweep(task, name, f, sub, at, order)
            levels += lv
            scores.append(sc)
    scores_df = pd.DataFrame.from_records(scores, columns=SCORE_COLS)
    tested = scores_df["anova_p"].notna()
    if tested.any():
        scores_df.loc[tested, "anova_p_adj"] = stats.adjust(scores_df.loc[tested, "anova_p"].tolist(), correction)
    scores_df["verdict"] = [verdict(r) for r in scores_df.to_dict("records")]
    return pd.DataFrame.from_records(levels, columns=LEVEL_COLS), scores_df
