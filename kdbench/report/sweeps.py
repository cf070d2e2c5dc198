"""Sensitivity: how a method's score moves along each swept factor, and whether that
movement is larger than the seed noise within a setting (one-way ANOVA)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from kdbench import stats
from kdbench.api import added_defaults
from kdbench.report.aggregate import group_info, summ
from kdbench.report.frame import SCALE, method_options, param_text, param_value
from kdbench.store import DONE

LEVEL_COLS = ["task", "method", "factor", "level", "at", "mean", "std", "n", "ci_low", "ci_high"]
SCORE_COLS = ["task", "method", "factor", "levels", "at", "std", "range", "drop_from_best", "best_level", "worst_level",
              "seed_std", "design", "anova_f", "anova_p", "anova_p_adj", "verdict"]
INTERACTION_COLS = ["task", "factor", "method", "other", "levels", "seeds", "range", "range_low", "range_high", "other_range",
                    "other_range_low", "other_range_high", "range_diff_low", "range_diff_high", "interaction_f", "interaction_p",
                    "interaction_p_adj", "answer"]
BLOCKED, ONE_WAY = "blocked by seed", "one-way (levels do not share seeds)"


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


def seed_table(sub: pd.DataFrame, keys: list[str], scale: float = SCALE) -> tuple[np.ndarray, list[Any]] | None:
    """The levels x seeds table of scores (x ``scale``, the runs' stored one) of one sweep
    line when every level has the same seeds (at least 2, one score each), else None."""
    per = [sub[sub["level"].map(json.dumps) == k].dropna(subset=["score"]) for k in keys]
    seeds = [sorted(p["seed"].tolist(), key=repr) for p in per]
    if not seeds or len(seeds[0]) < 2 or any(s != seeds[0] for s in seeds) or len(set(map(repr, seeds[0]))) != len(seeds[0]):
        return None
    table = np.array([[float(p.set_index("seed").loc[seed, "score"]) * scale for seed in seeds[0]] for p in per])
    return table, seeds[0]


def _level_keys(sub: pd.DataFrame, order: dict[str, int]) -> list[str]:
    return sorted(sub["level"].map(json.dumps).unique(), key=lambda v: (order.get(json.loads(v), len(order)), _level_key(json.loads(v))))


def _sweep(task: str, name: str, f: str, sub: pd.DataFrame, at: str, order: dict[str, int]) -> tuple[list[dict], dict]:
    levels, means, groups = [], {}, []
    info = group_info(sub)  # the runs' stored scale and direction
    keys = _level_keys(sub, order)
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
    table = seed_table(sub, keys, info.scale)
    f_stat, p, design = an.f, an.p, ONE_WAY
    if table is not None:  # the settings share seeds: the seed-to-seed variation is a block, not error
        blocked = stats.blocked_anova(table[0])
        f_stat, p, design = blocked.f, blocked.p, BLOCKED
    score = {"task": task, "method": name, "factor": f, "levels": sp.levels, "at": at, "std": sp.std, "range": sp.range,
             "drop_from_best": sp.drop_from_best, "best_level": sp.best_level, "worst_level": sp.worst_level,
             "seed_std": an.within_std, "design": design, "anova_f": f_stat, "anova_p": p, "anova_p_adj": np.nan, "verdict": ""}
    return levels, score


def verdict(r: dict[str, Any], alpha: float = stats.ALPHA) -> str:
    """The one sentence the test supports about a factor's effect on a method."""
    p = r["anova_p_adj"]
    if p != p:
        return (f"no test: {r['factor']} needs at least 2 seeds per level and some seed noise; the spread "
                f"{r['range']:.2f} cannot be told apart from seed noise")
    how = "ANOVA blocked by seed" if r.get("design") == BLOCKED else "one-way ANOVA"
    if p < alpha:
        return f"{r['factor']} changes {r['method']}'s score beyond seed noise ({how}, adjusted p {p:.3g})"
    return (f"no evidence that {r['factor']} changes {r['method']}'s score beyond seed noise ({how}, adjusted p {p:.3g}; "
            f"spread {r['range']:.2f} vs within-setting seed std {r['seed_std']:.2f})")


def unnamed_defaults(method: str, inner: str | None = None) -> dict[str, Any]:
    """The fields ``method`` added after runs were stored (:func:`kdbench.api.added`) with
    their defaults, from the installed plugin (empty when it is not installed): a run that
    left such a field at its default stored no value for it. For a wrapping method (one
    whose options have an ``inner`` field, as :func:`kdbench.api.wrapped_options` reads
    them) the added fields of its inner method come too: ``inner``, else the field's default."""
    options = method_options(method)
    if options is None:
        return {}
    out = added_defaults(options)
    if "inner" in options.model_fields:
        inner_options = method_options(inner or options.model_fields["inner"].default)
        out = (added_defaults(inner_options) if inner_options is not None else {}) | out
    return out


def sweep_lines(df: pd.DataFrame):
    """``(task, name, factor, held-at text, runs with a 'level' column)`` for every factor
    each method sweeps (finished runs), along the line of :func:`_line`. A line whose runs
    all come from one labelled method entry is named by that label (``dkd+ls``, not
    ``dkd``: the runs a reader finds under that row); one that spans entries (two entries
    that differ only in the factor) or has no label, by the method's name (``entry``
    column of the runs frame, :func:`kdbench.report.labels.entry_rows`). A field that some
    runs name and others leave at its default (:func:`unnamed_defaults`) reads as that
    default in the others, not as missing; a parameter left unset (null) is the level its
    method names (``teacher_topk=full``), as in row names."""
    done = df[df["status"] == DONE]
    for (task, method), g in done.groupby(["task", "method_name"], sort=True):
        configs = g.assign(p=g["params"].map(json.loads))
        settings = [dict(p) | {"student": s} for p, s in zip(configs["p"], configs["student"])]
        keys = sorted(set().union(*(s.keys() for s in settings)))
        implied = {inner: {k: v for k, v in unnamed_defaults(method, inner).items() if k in keys}  # one lookup per inner method
                   for inner in {s.get("inner") for s in settings}}
        settings = [implied[s.get("inner")] | s for s in settings]
        factors = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
        for f in factors:
            found = _line(settings, factors, f, keys)
            if found is None:
                continue
            fixed, mask = found
            line = configs[mask]
            entries = set(line["entry"]) if "entry" in line else {method}
            name = entries.pop() if len(entries) == 1 else method
            at = ", ".join(param_text(method, k, fixed.get(k)) for k in factors if k != f)
            shown = [param_value(method, f, s.get(f)) for s, m in zip(settings, mask) if m]
            yield task, name, f, at, line.assign(level=pd.Series(shown, index=line.index, dtype=object))


def _answer(r: dict[str, Any], alpha: float = stats.ALPHA) -> str:
    """The sentence the interaction test and the spreads support."""
    m, o, f = r["method"], r["other"], r["factor"]
    spreads = (f"{f} moves {m} by {r['range']:.2f} [{r['range_low']:.2f}, {r['range_high']:.2f}] and {o} by "
               f"{r['other_range']:.2f} [{r['other_range_low']:.2f}, {r['other_range_high']:.2f}] (max - min of the level means; "
               f"difference in 95% bootstrap interval [{r['range_diff_low']:.2f}, {r['range_diff_high']:.2f}])")
    p = r["interaction_p_adj"]
    if p != p:
        return f"no interaction test (needs 2 seeds shared by every level and some noise); {spreads}"
    if p < alpha:
        less = m if r["range"] < r["other_range"] else o
        more = o if less == m else m
        return f"{m} and {o} respond differently to {f} (interaction adjusted p {p:.3g}): {less} less sensitive than {more}; {spreads}"
    return (f"no evidence that {m} and {o} respond differently to {f} (interaction adjusted p {p:.3g}): neither shown less "
            f"sensitive; {spreads}")


def _comparator(lines: dict[tuple, pd.DataFrame], task: str, factor: str, baseline: str, base_method: str) -> str | None:
    """The entry a sweep of ``factor`` on ``task`` is compared with: the baseline row's own
    sweep, else the first (by name) labelled entry of the baseline's method that sweeps it
    (``kd+ls`` when the baseline ``kd`` holds temperature fixed); None without one."""
    if (task, baseline, factor) in lines:
        return baseline
    same = sorted(e for (t, e, f), sub in lines.items() if t == task and f == factor and sub["method_name"].iloc[0] == base_method)
    return same[0] if same else None


def interactions(df: pd.DataFrame, student_order: list[str] | None = None, correction: str = "holm",
                 baseline: str | None = None) -> pd.DataFrame:
    """Is a method less sensitive than the baseline to a factor? For each task and factor
    that a method entry and the baseline both sweep over the same levels and seeds (the
    baseline row's sweep, else a labelled entry of its method: :func:`_comparator`; the
    ``other`` column names which): the method x factor interaction (the ANOVA blocked by seed of their per-seed difference across
    the levels, corrected over the report's interaction tests) and each one's spread (max
    - min of the level means) with seeded bootstrap intervals over seeds
    (:func:`kdbench.stats.interaction_test`)."""
    if df.empty or not baseline:
        return pd.DataFrame(columns=INTERACTION_COLS)
    order = {s: i for i, s in enumerate(student_order or [])}
    lines = {(task, name, f): sub for task, name, f, _, sub in sweep_lines(df)}
    marked = df["is_baseline"].astype(bool) if "is_baseline" in df else df["method_name"] == baseline
    base_method = df.loc[marked, "method_name"].iloc[0] if marked.any() else baseline
    out = []
    for (task, name, f), sub in lines.items():
        if sub["method_name"].iloc[0] == base_method:
            continue  # the baseline's method compared with itself says nothing
        other = _comparator(lines, task, f, baseline, base_method)
        if other is None:
            continue
        base = lines[(task, other, f)]
        keys = _level_keys(sub, order)
        if keys != _level_keys(base, order):
            continue
        mine, theirs = seed_table(sub, keys), seed_table(base, keys)
        if mine is None or theirs is None or mine[1] != theirs[1]:
            continue
        it = stats.interaction_test(mine[0], theirs[0])
        out.append({"task": task, "factor": f, "method": name, "other": other, "levels": it.levels, "seeds": it.seeds,
                    "range": it.spread_a, "range_low": it.ci_a[0], "range_high": it.ci_a[1], "other_range": it.spread_b,
                    "other_range_low": it.ci_b[0], "other_range_high": it.ci_b[1], "range_diff_low": it.ci_diff[0],
                    "range_diff_high": it.ci_diff[1], "interaction_f": it.f, "interaction_p": it.p, "interaction_p_adj": np.nan,
                    "answer": ""})
    res = pd.DataFrame.from_records(out, columns=INTERACTION_COLS)
    tested = res["interaction_p"].notna()
    if tested.any():
        res.loc[tested, "interaction_p_adj"] = stats.adjust(res.loc[tested, "interaction_p"].tolist(), correction)
    res["answer"] = [_answer(r) for r in res.to_dict("records")]
    return res


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
    for task, name, f, at, sub in sweep_lines(df):
        lv, sc = _sweep(task, name, f, sub, at, order)
        levels += lv
        scores.append(sc)
    scores_df = pd.DataFrame.from_records(scores, columns=SCORE_COLS)
    tested = scores_df["anova_p"].notna()
    if tested.any():
        scores_df.loc[tested, "anova_p_adj"] = stats.adjust(scores_df.loc[tested, "anova_p"].tolist(), correction)
    scores_df["verdict"] = [verdict(r) for r in scores_df.to_dict("records")]
    return pd.DataFrame.from_records(levels, columns=LEVEL_COLS), scores_df
