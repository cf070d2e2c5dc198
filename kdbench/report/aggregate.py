"""Aggregation over seeds: the leaderboard (students, every teacher in its own row, a
chance row per task) and the paired comparisons with the baseline, corrected as one
family per report."""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np
import pandas as pd

from kdbench import stats
from kdbench.api import MetricInfo
from kdbench.report.frame import TEST, baseline_runs, legacy_info, off_cpu, row_info, same, scaled_bounds, stored_info, task_margin, test_splits
from kdbench.store import DIVERGED, DONE, FAILED, RUNNING

MIXED_DATA = "mixed data"
BOARD_COLS = ["task", "split", "method", "method_name", "params", "student", "metric", "mean", "std", "n", "ci_low", "ci_high",
              "small_n", "min_p", "data_flag", "failed", "diverged", "running", "not_done", "time_per_run_s", "off_cpu",
              "higher_is_better", "scale"]
COMP_COLS = ["task", "split", "method", "student", "baseline_method", "pairs", "diff", "diff_low", "diff_high", "sd", "p", "p_adj",
             "mdd", "least_n", "possible", "margin", "tost_p", "tost_p_adj", "result", "practical"]
#: the practical verdicts (column ``practical``): the statistical one refined by the task's margin
BELOW_MARGIN = "below the margin"
EQUIVALENT = "equivalent"


def summ(values: Iterable[float], metric: Any = None, info: MetricInfo | None = None) -> stats.Summary:
    """Mean, std and interval of ``values`` on the shown scale: ``info`` (the runs' stored
    :class:`MetricInfo`), else the pre-metric-info reading of ``metric``
    (:func:`~kdbench.report.frame.legacy_info`); the interval clipped to its bounds."""
    info = info or legacy_info(metric)
    return stats.summarize([float(v) * info.scale for v in values], bounds=scaled_bounds(info))


def group_info(g: pd.DataFrame) -> MetricInfo:
    """The MetricInfo of a group of runs (one row of the board): its finished runs' (the
    first one's: one task, one metric), else any run's."""
    ok = g[g["status"] == DONE] if "status" in g else g
    first = ok if len(ok) else g
    if "scale" in first and len(first):
        return row_info(first.iloc[0])
    return legacy_info(first["metric"].iloc[0] if len(first) else None)


def mixed_data(runs: pd.DataFrame) -> bool:
    """True when the finished runs of one row read data with different fingerprints."""
    return runs["data"].dropna().nunique() > 1 if "data" in runs else False


def _splits(ok: pd.DataFrame) -> list[str]:
    return sorted({s for d in ok["splits"] for s in d}, key=lambda s: (s != TEST, s)) or [TEST]


def _student_rows(task: str, method: str, student: str, g: pd.DataFrame) -> list[dict[str, Any]]:
    ok = g[g["status"] == DONE]
    metric = ok["metric"].iloc[0] if len(ok) else g["metric"].iloc[0]
    flag = MIXED_DATA if mixed_data(ok) else ""
    info = group_info(g)
    rows = []
    for split in _splits(ok):
        vals = [] if flag else [d.get(split) for d in ok["splits"] if d.get(split) is not None]
        s = summ(vals, metric, info)
        rows.append({
            "task": task, "split": split, "method": method, "method_name": g["method_name"].iloc[0], "params": g["params"].iloc[0],
            "student": student, "metric": metric, "mean": s.mean, "std": s.std, "n": s.n, "ci_low": s.ci_low, "ci_high": s.ci_high,
            "small_n": 0 < s.n < 3, "min_p": stats.min_p(s.n), "data_flag": flag,
            "failed": int((g["status"] == FAILED).sum()), "diverged": int((g["status"] == DIVERGED).sum()),
            "running": int((g["status"] == RUNNING).sum()), "not_done": int(len(g) - len(ok)),
            "time_per_run_s": ok["wall_s"].mean() if len(ok) else np.nan, "off_cpu": int(off_cpu(ok).sum()),
            "higher_is_better": info.higher_is_better, "scale": info.scale,
        })
    return rows


def teacher_label(t: dict[str, Any]) -> str:
    """A teacher's display name: its label, else its model (and pretrained checkpoint)."""
    spec = t.get("spec") or {}
    if spec.get("label"):
        return str(spec["label"])
    opts = spec.get("options") or {}
    pre = opts.get("arch") or opts.get("pretrained")
    return f"{spec.get('model', 'teacher')}({pre})" if pre else str(spec.get("model", "teacher"))


def teacher_names(t: dict[str, Any]) -> set[str]:
    """Every name a reference may use for a teacher: its label, model, and option values
    such as the architecture or pretrained checkpoint."""
    spec = t.get("spec") or {}
    opts = spec.get("options") or {}
    return {teacher_label(t), str(spec.get("model"))} | {str(v) for v in opts.values() if isinstance(v, str)}


def _fixed_row(task: str, split: str, method: str, student: str, metric: Any, value: float, info: MetricInfo,
               time_s: float = np.nan) -> dict[str, Any]:
    """A teacher or chance row: ``value`` (unscaled) shown on ``info``'s scale."""
    return {"task": task, "split": split, "method": method, "method_name": method, "params": "{}", "student": student,
            "metric": metric, "mean": value * info.scale if value == value else np.nan, "std": np.nan, "n": 1 if method == "teacher" else 0,
            "ci_low": np.nan, "ci_high": np.nan, "small_n": False, "min_p": np.nan, "data_flag": "", "failed": 0, "diverged": 0,
            "running": 0, "not_done": 0, "time_per_run_s": time_s, "off_cpu": 0, "higher_is_better": info.higher_is_better,
            "scale": info.scale}


def teacher_rows(teachers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per fine-tuned teacher (never merged: a suite may have several per task)."""
    out = []
    for t in teachers:
        m = t["metrics"] or {}
        main = m.get("main_metric")
        info = stored_info(m, main)[0]
        for split in test_splits(m) or [TEST]:
            value = m.get(split, {}).get(main, np.nan)
            out.append(_fixed_row(t["task"], split, "teacher", teacher_label(t), main, float(value), info,
                                  (t["cost"] or {}).get("wall_s", np.nan)))
    return out


def chance_rows(chance: dict[str, dict[str, Any]], infos: dict[str, MetricInfo] | None = None) -> list[dict[str, Any]]:
    """The chance row per task and test split (see :mod:`kdbench.report.chance`), on the
    scale of the task's runs (``infos`` by task; else the pre-metric-info reading)."""
    out = []
    for task, c in (chance or {}).items():
        info = (infos or {}).get(task) or legacy_info(c.get("metric"))
        for split, value in (c.get("splits") or {}).items():
            out.append(_fixed_row(task, split, "chance", "-", c.get("metric"), value, info))
    return out


def leaderboard(df: pd.DataFrame, teachers: list[dict[str, Any]] | None = None, baseline: str | None = None,
                chance: dict[str, dict[str, Any]] | None = None, correction: str = "holm",
                margins: dict[str, float] | None = None) -> pd.DataFrame:
    """Aggregate finished runs per (task, split, method, student): mean, std (ddof=1), n,
    95% t interval clipped to the metric's range, the n < 3 flag and the smallest p any
    test can reach at that n; counts of failed / diverged / running runs; mean wall time
    per run. Rows whose runs read different data (fingerprints differ) are flagged and not
    averaged. Teachers and chance get rows of their own. With ``baseline``, the paired
    comparison against it, corrected over the whole table (see :func:`comparisons`)."""
    out = []
    if not df.empty:
        for (task, method, student), g in df.groupby(["task", "method", "student"], sort=True):
            out += _student_rows(task, method, student, g)
    infos = {task: group_info(g) for task, g in df.groupby("task")} if not df.empty else {}
    out += teacher_rows(teachers or []) + chance_rows(chance or {}, infos)
    board = pd.DataFrame.from_records(out, columns=BOARD_COLS)
    flags = task_flags(board, margins, infos)
    board["task_flag"] = [flags.get(t, "") for t in board["task"]]
    if baseline is not None and not board.empty:
        board = board.merge(comparisons(df, baseline, correction, margins), on=["task", "split", "method", "student"], how="left")
    return board


NOT_SEPARABLE = "cannot separate methods"


def task_flags(board: pd.DataFrame, margins: dict[str, float] | None = None,
               infos: dict[str, MetricInfo] | None = None) -> dict[str, str]:
    """Per task whose teacher is not better than the chance row by more than the task's
    practical margin (on the test split): why. Such a task cannot tell students apart (a
    teacher at chance has nothing to distil); its column is flagged and left out of the
    averages over tasks. Tasks without a teacher or a defined chance score are not judged.
    "Better" is the task's stored direction (the board's ``higher_is_better``); ``infos``
    (the runs' MetricInfo by task) gives the default margin's scale and bounds."""
    out: dict[str, str] = {}
    if board.empty:
        return out
    test = board[board["split"] == TEST]
    for task, g in test.groupby("task", sort=True):
        teacher = g.loc[(g["method"] == "teacher") & g["mean"].notna()]
        chance = g.loc[(g["method"] == "chance") & g["mean"].notna(), "mean"]
        if teacher.empty or chance.empty:
            continue
        metric = teacher["metric"].iloc[0]
        info = (infos or {}).get(task) or legacy_info(metric)
        hib = teacher["higher_is_better"].iloc[0] if "higher_is_better" in teacher else info.higher_is_better
        sign, margin = (-1.0 if hib is False or hib == 0 else 1.0), task_margin(task, metric, margins, info)
        best = float((teacher["mean"] * sign).max() * sign)
        gain = (best - float(chance.iloc[0])) * sign
        if margin == margin and not gain > margin:
            out[task] = (f"{NOT_SEPARABLE}: the teacher ({best:.2f}) is not above chance ({float(chance.iloc[0]):.2f}) "
                         f"by more than the margin {margin:.2f}")
    return out


def pick_baseline_config(base: pd.DataFrame, params: str) -> tuple[str | None, str]:
    """Which baseline configuration a method is paired with: the only one, else the one
    that agrees on every parameter the two share (e.g. alpha, temperature)."""
    configs = sorted(base["params"].unique())
    if len(configs) == 1:
        return configs[0], ""
    mine = json.loads(params)
    matches = [c for c in configs if all(same(mine[k], v) for k, v in json.loads(c).items() if k in mine)
               and any(k in mine for k in json.loads(c))]
    if len(matches) == 1:
        return matches[0], ""
    return None, f"{len(configs)} baseline configurations and {len(matches)} agree on the shared parameters"


def _no_test(row: dict[str, Any], result: str, baseline_method: Any = None, pairs: float = 0) -> dict[str, Any]:
    return row | {"baseline_method": baseline_method, "pairs": pairs, "diff": np.nan, "diff_low": np.nan, "diff_high": np.nan,
                  "sd": np.nan, "p": np.nan, "p_adj": np.nan, "mdd": np.nan, "least_n": np.nan, "possible": None,
                  "tost_p": np.nan, "tost_p_adj": np.nan, "result": result, "practical": result, "higher_is_better": True}


def _compare(row: dict[str, Any], g: pd.DataFrame, base_all: pd.DataFrame, split: str) -> dict[str, Any]:
    if base_all.empty:
        return _no_test(row, "n/a")
    cfg, _ = pick_baseline_config(base_all, g["params"].iloc[0])
    if cfg is None:
        return _no_test(row, "n/a")
    base = base_all[base_all["params"] == cfg]
    if mixed_data(g) or mixed_data(base) or (g["data"].dropna().nunique() == 1 == base["data"].dropna().nunique()
                                              and set(g["data"].dropna()) != set(base["data"].dropna())):
        return _no_test(row, MIXED_DATA, base["method"].iloc[0])
    info = group_info(g)
    a = {r.seed: r.splits[split] * info.scale for r in g.itertuples() if r.splits.get(split) is not None}
    b = {r.seed: r.splits[split] * info.scale for r in base.itertuples() if r.splits.get(split) is not None}
    res = stats.paired_test(a, b)
    result = oriented_verdict(res.p, res.diff, info.higher_is_better) if res.result in ("win", "loss") else res.result
    return row | {"baseline_method": base["method"].iloc[0], "pairs": res.n, "diff": res.diff, "diff_low": res.ci_low,
                  "diff_high": res.ci_high, "sd": res.sd, "p": res.p, "p_adj": np.nan, "mdd": np.nan, "least_n": np.nan,
                  "possible": None, "tost_p": stats.tost_p(res.diffs, row["margin"]), "tost_p_adj": np.nan, "result": result,
                  "practical": result, "higher_is_better": info.higher_is_better}


def oriented_verdict(p: float, diff: float, higher_is_better: Any) -> str:
    """win / loss / n.s. of a difference ``diff`` (method - baseline) at ``p``: a win is a
    significant move in the better direction (down for a lower-is-better metric)."""
    return stats.verdict(p, diff, higher_is_better=not (higher_is_better is False or higher_is_better == 0))


def practical(result: str, diff: float, margin: float, tost_p_adj: float, alpha: float = stats.ALPHA) -> str:
    """The verdict with the task's margin: a significant difference smaller than the
    margin is "win/loss, below the margin"; a non-significant one is "equivalent" only
    when the two one-sided tests (adjusted over their family) reject both ends."""
    if result in ("win", "loss") and margin == margin and abs(diff) < margin:
        return f"{result}, {BELOW_MARGIN}"
    if result == "n.s." and tost_p_adj == tost_p_adj and tost_p_adj < alpha:
        return EQUIVALENT
    return result


def comparisons(df: pd.DataFrame, baseline: str, correction: str = "holm", margins: dict[str, float] | None = None) -> pd.DataFrame:
    """Per (task, split, method, student): the exact paired sign-flip test against
    ``baseline`` (a method name) on the same task, student and seed, done runs only. Every
    test of the table is one family: ``p_adj`` is the ``correction`` (holm or bh) of ``p``
    and the result (win / loss / n.s.) is decided on ``p_adj``. Each row also carries the
    difference's interval (the exact test inverted), the power of this procedure (``mdd``,
    ``least_n``, ``possible``: see :func:`kdbench.stats.procedure_mdd`) and the practical
    verdict against the task's margin (``margins``, else the metric's default; TOST
    p-values corrected as a family of their own)."""
    out = []
    if df.empty:
        return pd.DataFrame(columns=COMP_COLS)
    done = df[df["status"] == DONE]
    for (task, method, student), g in done.groupby(["task", "method", "student"], sort=True):
        base_all = done[(done["task"] == task) & (done["student"] == student) & baseline_runs(done, baseline)]
        margin = task_margin(task, g["metric"].iloc[0], margins, group_info(g))
        for split in _splits(g):
            row = {"task": task, "split": split, "method": method, "student": student, "margin": margin}
            if bool(baseline_runs(g, baseline).iloc[0]):
                out.append(_no_test(row, "baseline", method, np.nan))
            else:
                out.append(_compare(row, g, base_all, split))
    comp = pd.DataFrame.from_records(out, columns=[*COMP_COLS, "higher_is_better"])
    tested = comp["p"].notna()
    comp.loc[tested, "p_adj"] = stats.adjust(comp.loc[tested, "p"].tolist(), correction)
    comp.loc[tested, "result"] = [oriented_verdict(p, d, h) for p, d, h in
                                  zip(comp.loc[tested, "p_adj"], comp.loc[tested, "diff"], comp.loc[tested, "higher_is_better"])]
    m = int(tested.sum())
    comp.loc[tested, "mdd"] = [stats.procedure_mdd(sd, int(n), m) for sd, n in zip(comp.loc[tested, "sd"], comp.loc[tested, "pairs"])]
    comp.loc[tested, "least_n"] = stats.least_n(m) if m else np.nan
    comp["possible"] = comp["possible"].astype(object)
    comp.loc[tested, "possible"] = [bool(n >= stats.least_n(m)) for n in comp.loc[tested, "pairs"]]
    tost = comp["tost_p"].notna()
    if tost.any():
        comp.loc[tost, "tost_p_adj"] = stats.adjust(comp.loc[tost, "tost_p"].tolist(), correction)
    comp["practical"] = [practical(r, d, mg, t) for r, d, mg, t in zip(comp["result"], comp["diff"], comp["margin"], comp["tost_p_adj"])]
    comp = comp.drop(columns="higher_is_better")  # the board has it
    return comp


def family(board: pd.DataFrame) -> int:
    """How many tests the report's correction counts."""
    return int(board["p"].notna().sum()) if "p" in board else 0
