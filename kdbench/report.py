"""Leaderboards from the results store (and nothing else).

Every number in a report is recomputed here from the stored run rows:

* ``runs_frame``: one row per run (identity, status, scores, cost).
* ``leaderboard``: per (task, method, student), the finished (``done``) runs aggregated
  over seeds: mean, std (ddof=1), n and a Student-t 95% interval (:mod:`kdbench.stats`).
  Failed, diverged and still-running runs are counted in their own columns and never
  averaged.
* ``comparisons``: each method against the baseline (suite field ``baseline``, default
  ``kd``) on matched seeds: mean difference, paired t-test p-value, win/loss at p < 0.05.
* ``references``: published numbers of the suite beside the reproduced mean.
* ``sensitivity``: the score of each method across each swept hyper-parameter and across
  students, with its spread.
* ``cost``: wall time, device time, time per step, peak memory and parameters, relative
  to ``kd`` on the same task.

Scores are shown x100. A task's score for the average over tasks is its ``main_metric``
on the test split, averaged with the same metric on any further test splits the task
evaluates (splits named ``test_*``, e.g. MNLI's ``test_mismatched``); a task that wants
an official multi-metric average (GLUE's MRPC F1/accuracy mean, STS-B Pearson/Spearman
mean) exposes it as its main metric. The core knows no task by name.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import yaml
from tabulate import tabulate

from kdbench import stats
from kdbench.store import DIVERGED, DONE, FAILED, RUNNING, ResultsStore

SCALE = 100.0  # scores are shown x100, as KD papers report them
FORMATS = ("terminal", "md", "csv", "json", "latex", "html")
WIN, LOSS = "▲", "▼"
TEST = "test"


def _label(method: str, params: dict[str, Any], varying: set[str]) -> str:
    shown = {k: v for k, v in sorted(params.items()) if k in varying}
    return method if not shown else f"{method}({', '.join(f'{k}={v}' for k, v in shown.items())})"


def _test_splits(metrics: dict[str, Any]) -> list[str]:
    """The test split first, then any further test splits (``test_*``), sorted."""
    extra = sorted(k for k in metrics if k.startswith(TEST + "_") and isinstance(metrics[k], dict))
    return ([TEST] if isinstance(metrics.get(TEST), dict) else []) + extra


def task_score(metrics: dict[str, Any] | None) -> float:
    """The number a task contributes to the average over tasks: its main metric on the
    test split, averaged with the same metric on further ``test_*`` splits."""
    if not metrics or not metrics.get("main_metric"):
        return np.nan
    main = metrics["main_metric"]
    vals = [metrics[s].get(main) for s in _test_splits(metrics)]
    vals = [float(v) for v in vals if v is not None]
    return float(np.mean(vals)) if vals else np.nan


def runs_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: identity, status, the reported test/validation scores, cost."""
    rows = list(rows)
    varying: dict[str, set[str]] = {}
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["params"])
    for method, plist in by_method.items():
        keys = set().union(*(p.keys() for p in plist))
        varying[method] = {k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in plist}) > 1}
    records = []
    for r in rows:
        m = r["metrics"] or {}
        main = m.get("main_metric")
        cost = r["cost"] or {}
        env = r.get("env") or {}
        records.append({
            "hash": r["hash"], "task": r["task"], "method": _label(r["method"], r["params"], varying[r["method"]]),
            "method_name": r["method"], "params": json.dumps(r["params"], sort_keys=True), "student": r["student"],
            "seed": r["seed"], "status": r["status"], "metric": main,
            "test": m.get("test", {}).get(main) if main else np.nan,
            "validation": m.get("validation", {}).get(main) if main else np.nan,
            "score": task_score(m),
            "splits": {s: m[s].get(main) for s in _test_splits(m)} if main else {},
            "step": m.get("step"), "wall_s": cost.get("wall_s"), "step_s": cost.get("step_s"),
            "device_s": cost.get("device_s"), "peak_mem_mb": cost.get("peak_mem_mb"),
            "train_s": cost.get("train_s"), "steps": cost.get("steps"), "student_params": cost.get("student_params"),
            "device_time_kind": cost.get("device_time_kind"), "peak_mem_kind": cost.get("peak_mem_kind"),
            "device_name": env.get("device_name"), "_metrics": m,
            "diverged_step": r.get("diverged_step"), "error": (r.get("error") or "").strip().splitlines()[-1:] or None,
        })
    df = pd.DataFrame.from_records(records)
    if not df.empty:
        df["error"] = df["error"].map(lambda e: e[0] if isinstance(e, list) and e else None)
        for col in ("test", "validation", "score", "wall_s", "step_s", "device_s", "peak_mem_mb", "train_s", "steps", "student_params"):
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def filter_runs(df: pd.DataFrame, tasks: list[str] | None = None, methods: list[str] | None = None,
                students: list[str] | None = None, where: dict[str, Any] | None = None) -> pd.DataFrame:
    """A subset of the runs: tasks, method names (or labels), students, and ``where``
    (parameter or ``seed``/``status`` = value). Runs of a method that has no such parameter
    are kept, so ``temperature=4`` keeps the label-only baseline beside kd at T = 4."""
    if df.empty:
        return df
    keep = pd.Series(True, index=df.index)
    if tasks:
        keep &= df["task"].isin(tasks)
    if methods:
        keep &= df["method_name"].isin(methods) | df["method"].isin(methods)
    if students:
        keep &= df["student"].isin(students)
    for key, value in (where or {}).items():
        if key in ("seed", "status", "student", "task"):
            keep &= df[key].map(lambda v: _same(v, value))
        else:
            keep &= df["params"].map(lambda p: key not in json.loads(p) or _same(json.loads(p)[key], value))
    return df[keep]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return str(a) == str(b)


# --------------------------------------------------------------------------- aggregation


def _summ(values: Iterable[float]) -> stats.Summary:
    return stats.summarize([float(v) * SCALE for v in values])


def leaderboard(df: pd.DataFrame, teachers: list[dict[str, Any]] | None = None, baseline: str | None = None) -> pd.DataFrame:
    """Aggregate finished runs per (task, split, method, student): mean, std (ddof=1), n,
    95% t interval; counts of failed / diverged / running runs; mean cost per run. With
    ``baseline``, also the paired comparison against it (see :func:`comparisons`)."""
    cols = ["task", "split", "method", "method_name", "params", "student", "metric", "mean", "std", "n", "ci_low", "ci_high",
            "failed", "diverged", "running", "not_done", "time_per_run_s"]
    out = []
    if not df.empty:
        for (task, method, student), g in df.groupby(["task", "method", "student"], sort=True):
            ok = g[g["status"] == DONE]
            splits = sorted({s for d in ok["splits"] for s in d}, key=lambda s: (s != TEST, s)) or [TEST]
            metric = ok["metric"].iloc[0] if len(ok) else g["metric"].iloc[0]
            for split in splits:
                s = _summ(d.get(split) for d in ok["splits"] if d.get(split) is not None)
                out.append({
                    "task": task, "split": split, "method": method, "method_name": g["method_name"].iloc[0],
                    "params": g["params"].iloc[0], "student": student, "metric": metric,
                    "mean": s.mean, "std": s.std, "n": s.n, "ci_low": s.ci_low, "ci_high": s.ci_high,
                    "failed": int((g["status"] == FAILED).sum()), "diverged": int((g["status"] == DIVERGED).sum()),
                    "running": int((g["status"] == RUNNING).sum()), "not_done": int(len(g) - len(ok)),
                    "time_per_run_s": ok["wall_s"].mean() if len(ok) else np.nan,
                })
    for t in teachers or []:
        m = t["metrics"] or {}
        main = m.get("main_metric")
        for split in _test_splits(m) or [TEST]:
            value = m.get(split, {}).get(main, np.nan)
            out.append({"task": t["task"], "split": split, "method": "teacher", "method_name": "teacher", "params": "{}",
                        "student": "-", "metric": main, "mean": float(value) * SCALE, "std": np.nan, "n": 1,
                        "ci_low": np.nan, "ci_high": np.nan, "failed": 0, "diverged": 0, "running": 0, "not_done": 0,
                        "time_per_run_s": (t["cost"] or {}).get("wall_s", np.nan)})
    board = pd.DataFrame.from_records(out, columns=cols)
    if baseline is not None and not board.empty:
        comp = comparisons(df, baseline)
        board = board.merge(comp, on=["task", "split", "method", "student"], how="left")
    return board


def _pick_baseline_config(base: pd.DataFrame, params: str) -> tuple[str | None, str]:
    """Which baseline configuration a method is paired with: the only one, else the one
    that agrees on every parameter the two share (e.g. alpha, temperature)."""
    configs = sorted(base["params"].unique())
    if len(configs) == 1:
        return configs[0], ""
    mine = json.loads(params)
    matches = [c for c in configs if all(_same(mine[k], v) for k, v in json.loads(c).items() if k in mine)
               and any(k in mine for k in json.loads(c))]
    if len(matches) == 1:
        return matches[0], ""
    return None, f"{len(configs)} baseline configurations and {len(matches)} agree on the shared parameters"


def comparisons(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per (task, split, method, student): the paired comparison with ``baseline`` (method
    name) on the same task, student and seed, done runs only."""
    cols = ["task", "split", "method", "student", "baseline_method", "pairs", "diff", "p", "result"]
    out = []
    if df.empty:
        return pd.DataFrame(columns=cols)
    done = df[df["status"] == DONE]
    for (task, method, student), g in done.groupby(["task", "method", "student"], sort=True):
        name = g["method_name"].iloc[0]
        base_all = done[(done["task"] == task) & (done["student"] == student) & (done["method_name"] == baseline)]
        splits = sorted({s for d in g["splits"] for s in d}, key=lambda s: (s != TEST, s))
        for split in splits:
            row = {"task": task, "split": split, "method": method, "student": student}
            if name == baseline:
                out.append(row | {"baseline_method": method, "pairs": np.nan, "diff": np.nan, "p": np.nan, "result": "baseline"})
                continue
            if base_all.empty:
                out.append(row | {"baseline_method": None, "pairs": 0, "diff": np.nan, "p": np.nan, "result": "n/a"})
                continue
            cfg, _ = _pick_baseline_config(base_all, g["params"].iloc[0])
            if cfg is None:
                out.append(row | {"baseline_method": None, "pairs": 0, "diff": np.nan, "p": np.nan, "result": "n/a"})
                continue
            base = base_all[base_all["params"] == cfg]
            a = {r.seed: r.splits[split] * SCALE for r in g.itertuples() if r.splits.get(split) is not None}
            b = {r.seed: r.splits[split] * SCALE for r in base.itertuples() if r.splits.get(split) is not None}
            res = stats.paired_test(a, b)
            out.append(row | {"baseline_method": base["method"].iloc[0], "pairs": res.n, "diff": res.diff, "p": res.p,
                              "result": res.result})
    return pd.DataFrame.from_records(out, columns=cols)


def cell(mean: float, std: float, n: int) -> str:
    if n == 0 or np.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f} (n={n})" if not np.isnan(std) else f"{mean:.2f} (n={n})"


def _column_name(task: str, split: str, metric: Any) -> str:
    return f"{task} ({metric})" if split == TEST else f"{task} {split} ({metric})"


def _row_name(method: str, student: str, multi_student: bool) -> str:
    return f"{method} [{student}]" if multi_student and method != "teacher" else method


def _averages(board: pd.DataFrame) -> dict[str, tuple[float, int]]:
    """Per leaderboard row: mean over tasks of the per-task mean score (a task's score
    averages its test splits), only for rows with a score on every task."""
    tasks = sorted(board["task"].unique())
    out = {}
    for row, g in board.groupby("row"):
        per_task = g.groupby("task")["mean"].mean()  # mean over a task's test splits
        if len(tasks) > 1 and all(t in per_task.index and not np.isnan(per_task[t]) for t in tasks):
            out[row] = (float(per_task[tasks].mean()), len(tasks))
    return out


def wide_table(board: pd.DataFrame, marks: bool = False, bold: str | None = None) -> pd.DataFrame:
    """Methods (and students) as rows, task (split) columns: 'mean ± std (n=k)'; an
    average over tasks when there are several; time per run; runs that did not finish.

    ``marks``: append ▲/▼ to cells that differ significantly from the baseline.
    ``bold``: 'md', 'latex' or 'html' to mark the best mean of each column (teacher excluded)."""
    if board.empty:
        return pd.DataFrame()
    board = board.copy()
    multi_student = board.loc[board["method"] != "teacher", "student"].nunique() > 1
    board["row"] = [_row_name(m, s, multi_student) for m, s in zip(board["method"], board["student"])]
    board["col"] = [_column_name(t, s, m) for t, s, m in zip(board["task"], board["split"], board["metric"])]
    best: dict[str, float] = {}
    for col, g in board[board["method"] != "teacher"].groupby("col"):
        if g["mean"].notna().any():
            best[col] = g["mean"].max()

    def fmt(r: pd.Series) -> str:
        text = cell(r["mean"], r["std"], r["n"])
        if bold and text != "-" and r["method"] != "teacher" and r["col"] in best and r["mean"] == best[r["col"]]:
            text = {"md": f"**{text}**", "latex": f"\x01{text}\x02", "html": f"<b>{text}</b>"}[bold]
        if marks and "result" in r and r["result"] in ("win", "loss"):
            text += " " + (WIN if r["result"] == "win" else LOSS)
        return text

    board["cell"] = board.apply(fmt, axis=1)
    cols = sorted(board["col"].unique(), key=lambda c: (board.loc[board["col"] == c, "task"].iloc[0], board.loc[board["col"] == c, "split"].iloc[0] != TEST, c))
    wide = board.pivot_table(index="row", columns="col", values="cell", aggfunc="first").reindex(columns=cols)
    avgs = _averages(board)
    if avgs:
        wide[f"avg over {next(iter(avgs.values()))[1]} tasks"] = pd.Series({r: f"{v:.2f}" for r, (v, _) in avgs.items()})
    wide["time/run (s)"] = board.groupby("row")["time_per_run_s"].mean().map(lambda v: "-" if np.isnan(v) else f"{v:.1f}")
    nd = board[board["split"] == TEST].groupby("row")[["failed", "diverged", "running"]].sum()
    wide["not done"] = nd.apply(lambda r: ", ".join(f"{int(r[k])} {k}" for k in ("failed", "diverged", "running") if r[k]) or "0", axis=1)
    order = sorted(wide.index, key=lambda r: (r != "teacher", r))
    return wide.reindex(order).fillna("-").rename_axis("method").reset_index()


# --------------------------------------------------------------------------- references


def references_table(df: pd.DataFrame, refs: list[Any], teachers: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """Each published number beside the reproduced mean (x100) of the matching runs: same
    task, method name (or label) and, when the reference names one, student."""
    cols = ["task", "method", "student", "metric", "reference", "reproduced", "std", "n", "ci_low", "ci_high", "difference", "citation"]
    out = []
    done = df[df["status"] == DONE] if not df.empty else df
    for ref in refs:
        if ref.method == "teacher":
            for t in teachers or []:
                m = t["metrics"] or {}
                metric = ref.metric or m.get("main_metric")
                if t["task"] == ref.task and metric in m.get(TEST, {}):
                    v = float(m[TEST][metric]) * SCALE
                    out.append({"task": ref.task, "method": "teacher", "student": "-", "metric": metric, "reference": ref.value,
                                "reproduced": v, "std": np.nan, "n": 1, "ci_low": np.nan, "ci_high": np.nan,
                                "difference": v - ref.value, "citation": ref.citation})
            continue
        sel = done[(done["task"] == ref.task) & ((done["method_name"] == ref.method) | (done["method"] == ref.method))] if not done.empty else done
        if ref.student and not sel.empty:
            sel = sel[sel["student"] == ref.student]
        if sel.empty:
            out.append({"task": ref.task, "method": ref.method, "student": ref.student or "-", "metric": ref.metric or "-",
                        "reference": ref.value, "reproduced": np.nan, "std": np.nan, "n": 0, "ci_low": np.nan, "ci_high": np.nan,
                        "difference": np.nan, "citation": ref.citation})
            continue
        for (method, student), g in sel.groupby(["method", "student"], sort=True):
            metric = ref.metric or g["metric"].iloc[0]
            s = _summ(float(v) for v in g["_metrics"].map(lambda m: m.get(TEST, {}).get(metric)) if v is not None)
            out.append({"task": ref.task, "method": method, "student": student, "metric": metric, "reference": ref.value,
                        "reproduced": s.mean, "std": s.std, "n": s.n, "ci_low": s.ci_low, "ci_high": s.ci_high,
                        "difference": s.mean - ref.value, "citation": ref.citation})
    return pd.DataFrame.from_records(out, columns=cols)


# --------------------------------------------------------------------------- sensitivity


def _level_key(v: Any) -> tuple:
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def sensitivity(df: pd.DataFrame, student_order: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(levels, scores). For each task and method name, every factor that varies among its
    runs (a parameter, or ``student``) is a sweep. Its line through the grid is the set of
    configurations that hold every other factor fixed, chosen as the one with the most
    levels (ties: the one shared by most configurations, i.e. the centre of a
    one-factor-at-a-time design). ``levels``: mean/std/n over seeds at each level;
    ``scores``: spread of the level means (std ddof=1, max - min, drop from best)."""
    lcols = ["task", "method", "factor", "level", "at", "mean", "std", "n", "ci_low", "ci_high"]
    scols = ["task", "method", "factor", "levels", "at", "std", "range", "drop_from_best", "best_level", "worst_level"]
    levels, scores = [], []
    if df.empty:
        return pd.DataFrame(columns=lcols), pd.DataFrame(columns=scols)
    order = {s: i for i, s in enumerate(student_order or [])}
    done = df[df["status"] == DONE]
    for (task, name), g in done.groupby(["task", "method_name"], sort=True):
        configs = g.assign(p=g["params"].map(json.loads))
        settings = [dict(p) | {"student": s} for p, s in zip(configs["p"], configs["student"])]
        keys = sorted(set().union(*(s.keys() for s in settings)))
        factors = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
        for f in factors:
            others = [k for k in keys if k != f]
            groups: dict[str, set[str]] = {}
            cfg_count: dict[str, set[str]] = {}
            for s in settings:
                o = json.dumps({k: s.get(k) for k in others}, sort_keys=True)
                groups.setdefault(o, set()).add(json.dumps(s.get(f)))
                cfg_count.setdefault(o, set()).add(json.dumps(s, sort_keys=True))
            # most levels; then the most common setting of each other factor (the centre)
            common = {k: pd.Series([json.dumps(s.get(k)) for s in settings]).value_counts().index[0] for k in others}
            center_hits = {o: sum(json.dumps(json.loads(o).get(k)) == common[k] for k in others) for o in groups}
            line = max(groups, key=lambda o: (len(groups[o]), center_hits[o], len(cfg_count[o])))
            if len(groups[line]) < 2:
                continue
            fixed = json.loads(line)
            at = ", ".join(f"{k}={fixed.get(k)}" for k in factors if k != f)
            mask = [all(json.dumps(s.get(k)) == json.dumps(fixed.get(k)) for k in others) for s in settings]
            sub = configs[mask].assign(level=[s.get(f) for s, m in zip(settings, mask) if m])
            means = {}
            lv = sorted(sub["level"].map(json.dumps).unique(), key=lambda v: (order.get(json.loads(v), len(order)), _level_key(json.loads(v))))
            for key in lv:
                level = json.loads(key)
                s = _summ(sub.loc[sub["level"].map(json.dumps) == key, "score"].dropna())
                means[level if not isinstance(level, list) else key] = s.mean
                levels.append({"task": task, "method": name, "factor": f, "level": level, "at": at, "mean": s.mean, "std": s.std,
                               "n": s.n, "ci_low": s.ci_low, "ci_high": s.ci_high})
            sp = stats.spread(means)
            scores.append({"task": task, "method": name, "factor": f, "levels": sp.levels, "at": at, "std": sp.std, "range": sp.range,
                           "drop_from_best": sp.drop_from_best, "best_level": sp.best_level, "worst_level": sp.worst_level})
    return pd.DataFrame.from_records(levels, columns=lcols), pd.DataFrame.from_records(scores, columns=scols)


# --------------------------------------------------------------------------- cost


COST_COLS = [("wall_s", "wall (s)"), ("device_s", "device (s)"), ("step_s", "step (ms)"), ("peak_mem_mb", "peak mem (MB)")]


def cost_table(df: pd.DataFrame, reference: str = "kd") -> pd.DataFrame:
    """Mean cost per run of finished runs per (task, method, student), and each relative
    to ``reference`` (a method name) on the same task and student (same task when the
    reference was not run with that student)."""
    cols = ["task", "method", "student", "n", "score", "wall_s", "device_s", "step_s", "peak_mem_mb", "student_params",
            "wall_rel", "device_rel", "step_rel", "peak_mem_rel", "params_rel"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    done = df[df["status"] == DONE]
    out = []
    for (task, method, student), g in done.groupby(["task", "method", "student"], sort=True):
        ref = done[(done["task"] == task) & (done["method_name"] == reference) & (done["student"] == student)]
        if ref.empty:
            ref = done[(done["task"] == task) & (done["method_name"] == reference)]
        row = {"task": task, "method": method, "student": student, "n": len(g), "score": g["score"].mean() * SCALE}
        for key, rel in (("wall_s", "wall_rel"), ("device_s", "device_rel"), ("step_s", "step_rel"),
                         ("peak_mem_mb", "peak_mem_rel"), ("student_params", "params_rel")):
            row[key] = g[key].mean()
            base = ref[key].mean() if not ref.empty else np.nan
            row[rel] = row[key] / base if base and not np.isnan(base) else np.nan
        out.append(row)
    return pd.DataFrame.from_records(out, columns=cols)


def environments(rows: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Every distinct value of each environment field among the finished runs."""
    env: dict[str, set[str]] = {}
    for r in rows:
        if r["status"] in (DONE, DIVERGED):
            for k, v in (r.get("env") or {}).items():
                env.setdefault(k, set()).add(str(v))
    for r in rows:
        c = r.get("cost") or {}
        for k in ("device_time_kind", "peak_mem_kind"):
            if r["status"] == DONE and c.get(k):
                env.setdefault(k, set()).add(str(c[k]))
    return {k: sorted(v) for k, v in sorted(env.items())}


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """Every table of a suite's report, numeric (scores x100), before formatting."""

    title: str
    baseline: str
    runs: pd.DataFrame
    board: pd.DataFrame
    references: pd.DataFrame
    sens_levels: pd.DataFrame
    sens_scores: pd.DataFrame
    cost: pd.DataFrame
    cost_reference: str
    env: dict[str, list[str]]
    config: dict[str, Any] | None = None
    subset: str = ""
    missing: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> pd.DataFrame:
        """Runs that did not finish: shown, never averaged."""
        if self.runs.empty:
            return pd.DataFrame(columns=["hash", "task", "method", "student", "seed", "status", "diverged_step", "error"])
        bad = self.runs[self.runs["status"] != DONE]
        return bad[["hash", "task", "method", "student", "seed", "status", "diverged_step", "error"]].reset_index(drop=True)

    def wide(self, marks: bool = True, bold: str | None = None) -> pd.DataFrame:
        return wide_table(self.board, marks=marks, bold=bold)


def build_report(store: ResultsStore, hashes: list[str] | None = None, teacher_hashes: set[str] | None = None, *,
                 suite_spec: Any = None, title: str = "", tasks: list[str] | None = None, methods: list[str] | None = None,
                 students: list[str] | None = None, where: dict[str, Any] | None = None, baseline: str | None = None) -> Report:
    """Collect and compute every table for the runs ``hashes`` (a suite, or the store)."""
    rows = store.runs(hashes)
    df = runs_frame(rows)
    df = filter_runs(df, tasks, methods, students, where)
    kept = set(df["hash"]) if not df.empty else set()
    teachers = [t for t in store.teachers() if teacher_hashes is None or t["hash"] in teacher_hashes]
    if tasks:
        teachers = [t for t in teachers if t["task"] in tasks]
    if methods and "teacher" not in methods:
        teachers = []
    baseline = baseline or (getattr(suite_spec, "baseline", None) or "kd")
    board = leaderboard(df, teachers, baseline=baseline)
    refs = [r for r in getattr(suite_spec, "references", []) if (not tasks or r.task in tasks) and (not methods or r.method in methods)]
    student_order = [s.label or s.model for s in getattr(suite_spec, "students", [])]
    levels, scores = sensitivity(df, student_order)
    names = set(df["method_name"]) if not df.empty else set()
    cost_ref = "kd" if "kd" in names else baseline
    subset = "; ".join(x for x in [f"tasks {tasks}" if tasks else "", f"methods {methods}" if methods else "",
                                   f"students {students}" if students else "", f"where {where}" if where else ""] if x)
    missing = (len(set(hashes)) - len(store.runs(hashes))) if hashes is not None else 0
    config = suite_spec.model_dump(mode="json") if suite_spec is not None else None
    return Report(title=title, baseline=baseline, runs=df, board=board, references=references_table(df, refs, teachers),
                  sens_levels=levels, sens_scores=scores, cost=cost_table(df, cost_ref), cost_reference=cost_ref,
                  env=environments([r for r in rows if r["hash"] in kept]), config=config, subset=subset, missing=missing)


# --------------------------------------------------------------------------- formatting


def _f(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def _p(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if v >= 1e-4 else f"{v:.1e}"


def comparison_display(board: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """The statistics table: each task (split), method and student with its interval and
    the paired comparison with the baseline."""
    b = board[board["method"] != "teacher"] if not board.empty else board
    rows = []
    for r in b.itertuples():
        result = getattr(r, "result", "n/a")
        mark = {"win": f"win {WIN}", "loss": f"loss {LOSS}"}.get(result, result if isinstance(result, str) else "n/a")
        rows.append({
            "task": r.task if r.split == TEST else f"{r.task} {r.split}", "method": r.method, "student": r.student,
            "mean": _f(r.mean), "std": _f(r.std), "n": str(r.n), "95% CI": "-" if np.isnan(r.ci_low) else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]",
            f"Δ vs {baseline}": _f(getattr(r, "diff", np.nan)) if result != "baseline" else "-",
            "p": _p(getattr(r, "p", np.nan)) if result != "baseline" else "-",
            "pairs": _f(getattr(r, "pairs", np.nan), 0) if result != "baseline" else "-",
            "result": mark, "failed": str(r.failed), "diverged": str(r.diverged),
        })
    return pd.DataFrame.from_records(rows)


def references_display(refs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame.from_records([{
        "task": r.task, "method": r.method, "student": r.student, "metric": r.metric, "reference": _f(r.reference),
        "reproduced": _f(r.reproduced), "difference": _f(r.difference), "seeds": str(r.n),
        "95% CI": "-" if np.isnan(r.ci_low) else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]", "citation": r.citation} for r in refs.itertuples()])


def sensitivity_display(scores: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame.from_records([{
        "task": r.task, "method": r.method, "factor": r.factor, "levels": str(r.levels), "held at": r.at or "-",
        "std": _f(r.std), "max - min": _f(r.range), "drop from best": _f(r.drop_from_best), "best": str(r.best_level),
        "worst": str(r.worst_level)} for r in scores.itertuples()])


def sweep_display(levels: pd.DataFrame) -> pd.DataFrame:
    """Per task, factor and level (rows), each method's mean ± std (n) (columns)."""
    rows: dict[tuple, dict[str, str]] = {}
    for r in levels.itertuples():
        row = rows.setdefault((r.task, r.factor, str(r.level)), {"task": r.task, "factor": r.factor, "level": str(r.level)})
        row[r.method] = cell(r.mean, r.std, r.n)
    return pd.DataFrame.from_records(list(rows.values())).fillna("-")


def cost_display(cost: pd.DataFrame, reference: str) -> pd.DataFrame:
    def rel(v: float) -> str:
        return "-" if v is None or np.isnan(v) else f"{v:.2f}x"

    return pd.DataFrame.from_records([{
        "task": r.task, "method": r.method, "student": r.student, "runs": str(r.n), "score": _f(r.score),
        "wall (s)": _f(r.wall_s), f"wall vs {reference}": rel(r.wall_rel),
        "device (s)": _f(r.device_s), f"device vs {reference}": rel(r.device_rel),
        "step (ms)": _f(r.step_s * 1000 if r.step_s == r.step_s else np.nan), f"step vs {reference}": rel(r.step_rel),
        "peak mem (MB)": _f(r.peak_mem_mb, 0), f"mem vs {reference}": rel(r.peak_mem_rel),
        "params": _f(r.student_params, 0) if r.student_params == r.student_params else "-", f"params vs {reference}": rel(r.params_rel),
    } for r in cost.itertuples()])


def problems_display(problems: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame.from_records([{
        "hash": r.hash, "task": r.task, "method": r.method, "student": r.student, "seed": str(r.seed), "status": r.status,
        "diverged at step": _f(r.diverged_step, 0) if r.diverged_step == r.diverged_step and r.diverged_step is not None else "-",
        "error": (r.error or "")[:160]} for r in problems.itertuples()])


def env_display(env: dict[str, list[str]]) -> pd.DataFrame:
    return pd.DataFrame({"field": list(env), "value": [", ".join(v) for v in env.values()]})


def legend(report: Report) -> list[str]:
    """The sentences that say how every number was computed (in every format)."""
    return [
        "Scores are test-split values x100 of each task's main metric; cells are mean ± std (ddof=1) over seeds, n = finished seeds.",
        f"95% CI: {stats.CI_METHOD}.",
        f"Comparison with the baseline '{report.baseline}': {stats.TEST_METHOD} on the same task, student and seed; "
        f"{WIN} / {LOSS} mark a significant win / loss at p < {stats.ALPHA}; 'n/a' when fewer than 2 matched seeds.",
        "Failed, diverged and running runs are listed and counted, never averaged.",
        "Average over tasks: the unweighted mean of the per-task mean score; a task's score is its main metric "
        "averaged over its test splits (e.g. MNLI matched and mismatched); shown only for rows with every task.",
        "Sensitivity: spread of the per-level mean scores across a sweep (std ddof=1; max - min; drop from best = best - mean of the levels).",
        f"Cost: mean per finished run; relative columns divide by '{report.cost_reference}' on the same task (and student).",
        "Reference values are compared on the leaderboard's x100 scale.",
    ]


def sections(report: Report) -> list[tuple[str, pd.DataFrame | None, str]]:
    """(title, table, note) in report order; a None table is a text-only note."""
    out: list[tuple[str, pd.DataFrame | None, str]] = []
    out.append(("Leaderboard", report.wide(), ""))
    comp = comparison_display(report.board, report.baseline)
    out.append((f"Statistics and paired comparison vs {report.baseline}", comp, ""))
    if not report.references.empty:
        out.append(("Paper comparison", references_display(report.references), ""))
    if not report.sens_scores.empty:
        out.append(("Sensitivity", sensitivity_display(report.sens_scores), ""))
        out.append(("Sweeps", sweep_display(report.sens_levels), ""))
    if not report.cost.empty:
        out.append(("Cost", cost_display(report.cost, report.cost_reference), ""))
    if not report.problems.empty:
        out.append(("Runs that did not finish", problems_display(report.problems), ""))
    if report.env:
        out.append(("Environment", env_display(report.env), ""))
    return out


def render(table: pd.DataFrame, fmt: str = "terminal", title: str | None = None) -> str:
    """One table in one format (terminal, md, csv, json, latex)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return json.dumps(table.to_dict(orient="records"), indent=2, default=float)
    if fmt == "latex":
        return latex_table(table, title)
    body = tabulate(table, headers="keys", tablefmt="github" if fmt == "md" else "simple", showindex=False, disable_numparse=True)
    return (f"## {title}\n\n" if fmt == "md" and title else (f"{title}\n" if title else "")) + body + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", WIN: r"$\blacktriangle$",
                  LOSS: r"$\blacktriangledown$", "Δ": r"$\Delta$", "×": r"$\times$"}


def latex_escape(text: str) -> str:
    """Escape for LaTeX; the best-cell markers of ``wide_table(bold='latex')`` become \\textbf."""
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))
    return out.replace("\x01", "\\textbf{").replace("\x02", "}")


def latex_table(table: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs table (needs \\usepackage{booktabs} and amssymb for the win/loss marks)."""
    if table.empty:
        return f"% {caption}: empty\n"
    cols = list(table.columns)
    lines = ["\\begin{table}[t]", "\\centering", "\\small"]
    if caption:
        lines.append(f"\\caption{{{latex_escape(caption)}}}")
    lines += [f"\\begin{{tabular}}{{l{'r' * (len(cols) - 1)}}}", "\\toprule", " & ".join(latex_escape(str(c)) for c in cols) + " \\\\",
              "\\midrule"]
    for row in table.itertuples(index=False):
        lines.append(" & ".join(latex_escape(str(v)) for v in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def render_report(report: Report, fmt: str, plot_links: dict[str, str] | None = None) -> str:
    """The whole report as text: terminal, md or latex. ``plot_links`` (md): name -> path."""
    parts: list[str] = []
    if fmt == "md":
        parts.append(f"# {report.title}\n")
        if report.subset:
            parts.append(f"Subset: {report.subset}\n")
        parts.append("\n".join(f"- {line}" for line in legend(report)) + "\n")
    elif fmt == "latex":
        parts.append(f"% {report.title}\n% Requires \\usepackage{{booktabs,amssymb}}.\n% " + "\n% ".join(legend(report)) + "\n")
    else:
        parts.append(report.title + (f"  [subset: {report.subset}]" if report.subset else "") + "\n")
    for title, table, _ in sections(report):
        if title == "Leaderboard":
            table = report.wide(marks=True, bold="md" if fmt == "md" else "latex" if fmt == "latex" else None)
        if fmt == "latex" and title in ("Environment", "Runs that did not finish"):
            continue
        parts.append(render(table, fmt, title) if fmt != "terminal" else f"\n{title}\n" + render(table, "terminal"))
        if fmt == "md" and plot_links:
            for name, path in plot_links.items():
                if (title == "Sweeps" and name.startswith("sensitivity")) or (title == "Cost" and name.startswith("pareto")):
                    parts.append(f"![{name}]({path})\n")
    if report.missing:
        parts.append(f"({report.missing} runs of the suite not in the store yet)\n")
    if fmt == "terminal":
        parts.append("\n".join(legend(report)) + "\n")
    return "\n".join(parts)


def report_json(report: Report) -> dict[str, Any]:
    """Everything, numeric, for programs."""
    def rec(df: pd.DataFrame) -> list[dict[str, Any]]:
        return json.loads(df.drop(columns=[c for c in ("_metrics", "splits") if c in df.columns]).to_json(orient="records"))

    return {"title": report.title, "baseline": report.baseline, "subset": report.subset, "legend": legend(report),
            "leaderboard": rec(report.board), "references": rec(report.references), "sensitivity_levels": rec(report.sens_levels),
            "sensitivity_scores": rec(report.sens_scores), "cost": rec(report.cost), "cost_reference": report.cost_reference,
            "runs": rec(report.runs), "environment": report.env, "config": report.config}


def board_csv(report: Report) -> str:
    """The per (task, split, method, student) statistics, full precision."""
    buf = io.StringIO()
    report.board.to_csv(buf, index=False)
    return buf.getvalue()


def config_yaml(report: Report) -> str:
    return yaml.safe_dump(report.config, sort_keys=False) if report.config else ""


def suite_report(store: ResultsStore, hashes: list[str] | None, teacher_hashes: set[str] | None = None,
                 tasks: list[str] | None = None, methods: list[str] | None = None, baseline: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-run frame, wide leaderboard without marks) for the runs of a suite (or the store)."""
    rep = build_report(store, hashes, teacher_hashes, tasks=tasks, methods=methods, baseline=baseline)
    return rep.runs, rep.wide(marks=False)


def write_outputs(report: Report, formats: list[str], results_dir: Path, output: str | None = None,
                  plots: bool = True) -> list[Path]:
    """Write the report in each format under ``results_dir`` (or ``output`` when one
    format is asked for). Returns the files written."""
    written: list[Path] = []
    results_dir = Path(results_dir)

    def target(default: str) -> Path:
        p = Path(output) if output and len(formats) == 1 else results_dir / default
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    pngs: dict[str, bytes] = {}
    if plots and any(f in formats for f in ("md", "html", "latex")):
        from kdbench import plots as plotting

        pngs = plotting.report_plots(report)
    for fmt in formats:
        if fmt == "md":
            out = target("leaderboard.md")
            links = {}
            for name, data in pngs.items():
                p = out.parent / "plots" / f"{name}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
                written.append(p)
                links[name] = f"plots/{name}.png"
            out.write_text(render_report(report, "md", links), encoding="utf-8")
        elif fmt == "latex":
            out = target("leaderboard.tex")
            out.write_text(render_report(report, "latex"), encoding="utf-8")
        elif fmt == "csv":
            out = target("leaderboard.csv")
            out.write_text(board_csv(report), encoding="utf-8")
            for name, df in (("cost", report.cost), ("sensitivity", report.sens_levels), ("references", report.references)):
                if not df.empty:
                    side = out.with_name(f"{out.stem}.{name}.csv")
                    df.to_csv(side, index=False)
                    written.append(side)
        elif fmt == "json":
            out = target("leaderboard.json")  # the leaderboard rows, as before; report.json holds everything
            out.write_text(render(report.wide(marks=False), "json"), encoding="utf-8")
            full = out.with_name("report.json")
            full.write_text(json.dumps(report_json(report), indent=2, default=str), encoding="utf-8")
            written.append(full)
        elif fmt == "html":
            from kdbench.html_report import render_html

            out = target("report.html")
            out.write_text(render_html(report, pngs), encoding="utf-8")
        else:
            raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        written.append(out)
    return written
