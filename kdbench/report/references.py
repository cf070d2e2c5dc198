"""Published numbers beside the reproduced ones, matched on task, method, teacher and
student (never a cross join), with whether the reference lies inside the reproduced 95%
interval, the published spread and n where the reference gives them, and its protocol."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kdbench.report.aggregate import summ, teacher_label, teacher_names
from kdbench.report.frame import TEST, stored_info
from kdbench.store import DONE

REF_COLS = ["task", "method", "student", "teacher", "metric", "reference", "ref_std", "ref_n", "reproduced", "std", "n",
            "ci_low", "ci_high", "difference", "inside_ci", "protocol", "citation"]


def _inside(value: float, low: float, high: float) -> str:
    return "n/a" if low != low or high != high else ("yes" if low <= value <= high else "no")


def _base(ref: Any) -> dict[str, Any]:
    return {"task": ref.task, "method": ref.method, "reference": ref.value, "ref_std": getattr(ref, "std", None),
            "ref_n": getattr(ref, "n", None), "protocol": getattr(ref, "protocol", None) or "", "citation": ref.citation}


def _teacher_refs(ref: Any, teachers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in teachers:
        m = t["metrics"] or {}
        metric = ref.metric or m.get("main_metric")
        if t["task"] != ref.task or metric not in m.get(TEST, {}) or (ref.teacher and ref.teacher not in teacher_names(t)):
            continue
        v = float(m[TEST][metric]) * stored_info(m, metric)[0].scale
        out.append(_base(ref) | {"student": "-", "teacher": teacher_label(t), "metric": metric, "reproduced": v, "std": np.nan,
                                 "n": 1, "ci_low": np.nan, "ci_high": np.nan, "difference": v - ref.value, "inside_ci": "n/a"})
    return out


def _student_refs(ref: Any, done: pd.DataFrame, teachers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sel = done[(done["task"] == ref.task) & ((done["method_name"] == ref.method) | (done["method"] == ref.method))] if not done.empty else done
    if ref.student and not sel.empty:
        sel = sel[sel["student"] == ref.student]
    if ref.teacher and not sel.empty:
        ok = {t["hash"] for t in teachers if ref.teacher in teacher_names(t)}
        sel = sel[sel["teacher_hash"].isin(ok) | sel["teacher_hash"].isna()] if ref.method == "none" else sel[sel["teacher_hash"].isin(ok)]
    if sel.empty:
        return [_base(ref) | {"student": ref.student or "-", "teacher": ref.teacher or "-", "metric": ref.metric or "-",
                              "reproduced": np.nan, "std": np.nan, "n": 0, "ci_low": np.nan, "ci_high": np.nan,
                              "difference": np.nan, "inside_ci": "n/a"}]
    out = []
    for (method, student), g in sel.groupby(["method", "student"], sort=True):
        metric = ref.metric or g["metric"].iloc[0]
        s = summ((float(v) for v in g["_metrics"].map(lambda m: m.get(TEST, {}).get(metric)) if v is not None), metric,
                 stored_info(g["_metrics"].iloc[0], metric)[0])
        out.append(_base(ref) | {"method": method, "student": student, "teacher": ref.teacher or "-", "metric": metric,
                                 "reproduced": s.mean, "std": s.std, "n": s.n, "ci_low": s.ci_low, "ci_high": s.ci_high,
                                 "difference": s.mean - ref.value, "inside_ci": _inside(ref.value, s.ci_low, s.ci_high)})
    return out


def references_table(df: pd.DataFrame, refs: list[Any], teachers: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """Each published number beside the reproduced mean (x100) of the matching runs: same
    task, method name (or label) and, when the reference names them, student and teacher
    (a teacher reference matches only the teachers it names)."""
    out: list[dict[str, Any]] = []
    done = df[df["status"] == DONE] if not df.empty else df
    for ref in refs:
        out += _teacher_refs(ref, teachers or []) if ref.method == "teacher" else _student_refs(ref, done, teachers or [])
    return pd.DataFrame.from_records(out, columns=REF_COLS)
