"""Leaderboards from the results store (and nothing else).

``runs_frame`` flattens the store into one row per run; ``leaderboard`` aggregates the
finished runs over seeds (mean, standard deviation, count); failed and diverged runs are
counted in their own column and never averaged. ``render`` writes the table as an aligned
terminal table, Markdown, CSV or JSON.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np
import pandas as pd
from tabulate import tabulate

from kdbench.store import DONE, ResultsStore

SCALE = 100.0  # scores are shown x100, as KD papers report them
FORMATS = ("terminal", "md", "csv", "json")


def _label(method: str, params: dict[str, Any], varying: set[str]) -> str:
    shown = {k: v for k, v in sorted(params.items()) if k in varying}
    return method if not shown else f"{method}({', '.join(f'{k}={v}' for k, v in shown.items())})"


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
        records.append({
            "hash": r["hash"], "task": r["task"], "method": _label(r["method"], r["params"], varying[r["method"]]),
            "method_name": r["method"], "params": json.dumps(r["params"], sort_keys=True), "student": r["student"],
            "seed": r["seed"], "status": r["status"], "metric": main,
            "test": m.get("test", {}).get(main) if main else np.nan,
            "validation": m.get("validation", {}).get(main) if main else np.nan,
            "step": m.get("step"), "wall_s": cost.get("wall_s"), "step_s": cost.get("step_s"),
            "device_s": cost.get("device_s"), "peak_mem_mb": cost.get("peak_mem_mb"),
            "diverged_step": r.get("diverged_step"), "error": (r.get("error") or "").strip().splitlines()[-1:] or None,
        })
    df = pd.DataFrame.from_records(records)
    if not df.empty:
        df["error"] = df["error"].map(lambda e: e[0] if isinstance(e, list) and e else None)
    return df


def leaderboard(df: pd.DataFrame, teachers: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """Aggregate finished runs per (task, method, student): mean, std (ddof=1), n; plus the
    count of failed/diverged runs and the mean wall time per run."""
    if df.empty:
        return pd.DataFrame(columns=["task", "method", "student", "metric", "mean", "std", "n", "not_done", "time_per_run_s"])
    out = []
    for (task, method, student), g in df.groupby(["task", "method", "student"], sort=True):
        ok = g[g["status"] == DONE]
        scores = ok["test"].astype(float) * SCALE
        out.append({
            "task": task, "method": method, "student": student, "metric": ok["metric"].iloc[0] if len(ok) else g["metric"].iloc[0],
            "mean": scores.mean() if len(scores) else np.nan, "std": scores.std(ddof=1) if len(scores) > 1 else np.nan,
            "n": int(len(scores)), "not_done": int(len(g) - len(ok)),
            "time_per_run_s": ok["wall_s"].astype(float).mean() if len(ok) else np.nan,
        })
    for t in teachers or []:
        m = t["metrics"] or {}
        main = m.get("main_metric")
        out.append({"task": t["task"], "method": "teacher", "student": "-", "metric": main,
                    "mean": m.get("test", {}).get(main, np.nan) * SCALE, "std": np.nan, "n": 1, "not_done": 0,
                    "time_per_run_s": (t["cost"] or {}).get("wall_s", np.nan)})
    return pd.DataFrame.from_records(out)


def cell(mean: float, std: float, n: int) -> str:
    if n == 0 or np.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f} (n={n})" if not np.isnan(std) else f"{mean:.2f} (n={n})"


def wide_table(board: pd.DataFrame) -> pd.DataFrame:
    """Methods (and students) as rows, tasks as columns: 'mean ± std (n)'; plus time per
    run and the count of runs that did not finish."""
    if board.empty:
        return pd.DataFrame()
    board = board.copy()
    multi_student = board.loc[board["method"] != "teacher", "student"].nunique() > 1
    board["row"] = board.apply(lambda r: f"{r['method']} [{r['student']}]" if multi_student and r["method"] != "teacher" else r["method"], axis=1)
    board["cell"] = board.apply(lambda r: cell(r["mean"], r["std"], r["n"]), axis=1)
    tasks = sorted(board["task"].unique())
    metrics = board.groupby("task")["metric"].first()
    wide = board.pivot_table(index="row", columns="task", values="cell", aggfunc="first").reindex(columns=tasks)
    wide.columns = [f"{t} ({metrics[t]})" for t in tasks]
    wide["time/run (s)"] = board.groupby("row")["time_per_run_s"].mean().map(lambda v: "-" if np.isnan(v) else f"{v:.1f}")
    wide["not done"] = board.groupby("row")["not_done"].sum()
    order = sorted(wide.index, key=lambda r: (r != "teacher", r))
    return wide.reindex(order).fillna("-").rename_axis("method").reset_index()


def render(table: pd.DataFrame, fmt: str = "terminal", title: str | None = None) -> str:
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return json.dumps(table.to_dict(orient="records"), indent=2, default=float)
    body = tabulate(table, headers="keys", tablefmt="github" if fmt == "md" else "simple", showindex=False, disable_numparse=True)
    return (f"## {title}\n\n" if fmt == "md" and title else (f"{title}\n" if title else "")) + body + "\n"


def suite_report(store: ResultsStore, hashes: list[str] | None, teacher_hashes: set[str] | None = None,
                 tasks: list[str] | None = None, methods: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-run frame, wide leaderboard) for the runs of a suite (or the whole store)."""
    df = runs_frame(store.runs(hashes))
    if not df.empty:
        if tasks:
            df = df[df["task"].isin(tasks)]
        if methods:
            df = df[df["method_name"].isin(methods)]
    teachers = [t for t in store.teachers() if teacher_hashes is None or t["hash"] in teacher_hashes]
    if tasks:
        teachers = [t for t in teachers if t["task"] in tasks]
    return df, wide_table(leaderboard(df, teachers))
