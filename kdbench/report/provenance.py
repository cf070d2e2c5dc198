"""Where the numbers came from: the report's date, the commits of its runs (dirty ones
marked), each split's data fingerprint and size (``env["data"]``), the runs in the store
that the suite does not contain (listed, never averaged), and the environment."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Iterable

import pandas as pd

from kdbench.report.frame import NOT_RECORDED
from kdbench.store import DIVERGED, DONE

DIRTY = "+dirty"


def report_date() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def commits(df: pd.DataFrame) -> pd.DataFrame:
    """Per commit: whether the tree was dirty, how many runs (finished or not) used it, and
    which: each method (label and student) with its seeds."""
    cols = ["commit", "dirty", "runs", "which runs"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for commit, g in df.groupby("git_commit", sort=True):
        out.append({"commit": commit.removesuffix(DIRTY), "dirty": "n/a" if commit in (NOT_RECORDED, "unknown") else ("yes" if commit.endswith(DIRTY) else "no"),
                    "runs": len(g), "which runs": _which(g)})
    return pd.DataFrame.from_records(out, columns=cols)


def _which(g: pd.DataFrame) -> str:
    multi = g["student"].nunique() > 1
    parts = []
    for (method, student), h in g.groupby(["method", "student"], sort=True):
        name = f"{method} [{student}]" if multi else method
        parts.append(f"{name}: seeds {', '.join(str(s) for s in sorted(h['seed']))}")
    return "; ".join(parts)


def data_fingerprints(df: pd.DataFrame) -> pd.DataFrame:
    """Per task, split and fingerprint: its size and how many finished runs read it;
    "not recorded" for runs of stores older than data fingerprints."""
    cols = ["task", "split", "sha256", "size", "runs"]
    counts: dict[tuple, int] = {}
    if not df.empty:
        for task, data in zip(df["task"], df["data"].where(df["status"] == DONE, "skip")):
            if data == "skip":
                continue
            if not data:
                counts[(task, "-", NOT_RECORDED, "-")] = counts.get((task, "-", NOT_RECORDED, "-"), 0) + 1
                continue
            for split, fp in sorted(json.loads(data).items()):
                key = (task, split, str((fp or {}).get("sha256", NOT_RECORDED)), str((fp or {}).get("n", "-")))
                counts[key] = counts.get(key, 0) + 1
    return pd.DataFrame.from_records([dict(zip(cols, k + (n,))) for k, n in sorted(counts.items())], columns=cols)


def outside_runs(all_rows: Iterable[dict[str, Any]], hashes: list[str] | None) -> pd.DataFrame:
    """Runs in the store that the suite does not contain (e.g. of an edited suite)."""
    cols = ["hash", "task", "method", "student", "seed", "status"]
    if hashes is None:
        return pd.DataFrame(columns=cols)
    wanted = set(hashes)
    return pd.DataFrame.from_records([{k: r[k] for k in cols} for r in all_rows if r["hash"] not in wanted], columns=cols)


def environments(rows: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Every distinct value of each environment field among the finished runs (the data
    fingerprints have their own table); "not recorded" among them where some finished runs
    lack a field that others have (runs made before kdbench recorded it, e.g.
    ``host_allocator``, whose step times may not compare with the others')."""
    rows = list(rows)
    env: dict[str, set[str]] = {}
    finished = [r.get("env") or {} for r in rows if r["status"] in (DONE, DIVERGED)]
    for e in finished:
        for k, v in e.items():
            if k != "data":
                env.setdefault(k, set()).add(str(v))
    for k in env:
        if any(k not in e for e in finished):
            env[k].add(NOT_RECORDED)
    for r in rows:
        c = r.get("cost") or {}
        for k in ("device_time_kind", "peak_mem_kind", "mem_kind"):
            if r["status"] == DONE and c.get(k):
                env.setdefault(k, set()).add(str(c[k]))
    return {k: sorted(v) for k, v in sorted(env.items())}
