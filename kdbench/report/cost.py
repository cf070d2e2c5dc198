"""Cost per (task, method, student) over finished runs, each figure with its spread over
seeds, relative to the suite's baseline; and each teacher's fine-tuning cost, once, with
its share per student run that used it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kdbench.report.aggregate import teacher_label
from kdbench.report.frame import PASS_COLUMNS, SCALE, baseline_runs, cost_fields, off_cpu
from kdbench.store import DONE

SPREAD = ("train_s", "prep_s", "eval_s", "wall_s", "device_s", "mem_mb", "active_train_s")
#: training time split into sampling inside the steps (``generation_s``, recorded by the
#: methods that sample: gkd, rkl, ...) and the rest (``update_s`` = train - generation);
#: NaN for runs that recorded no sampling time (methods that never sample, older stores)
GENERATION = ("generation_s", "update_s")
#: relative to the reference: the active training time (steps x median step, which a pause
#: cannot inflate, though load that slows every step does) and the CPU time, never the wall time
RELATIVE = {"active_train_s": "train_rel", "cpu_s": "cpu_rel", "step_s_median": "step_rel", "mem_mb": "mem_rel",
            "params_training": "params_rel", "train_flops": "flops_rel"}
#: counted compute (kdbench.compute): a group's figure only where every run recorded it
FLOPS = ("train_flops", "teacher_flops", "student_flops")
COST_COLS = (["task", "method", "student", "n", "score"] + [c for k in SPREAD for c in (k, f"{k}_std")]
             + [c for k in GENERATION for c in (k, f"{k}_std")] + ["step_s_median", "step_s_q25", "step_s_q75", "mem_kind",
                "device_time_kind", "shared_teacher_outputs", "params_deployed", "params_training", "cpu_s", "wall_cpu_max", "off_cpu"] + list(FLOPS) + ["passes_per_step"]
             + list(RELATIVE.values()))
TEACHER_COLS = ["task", "teacher", "hash", "train_s", "prep_s", "eval_s", "wall_s", "mem_mb", "mem_kind", "runs", "amortised_train_s"]


def _kinds(values: pd.Series) -> str | None:
    kinds = sorted({str(v) for v in values.dropna()})
    return ", ".join(kinds) if kinds else None


def _cached(values: pd.Series) -> str:
    """Whether the runs read cached teacher outputs: yes, no, mixed, or n/a (not recorded)."""
    known = {bool(v) for v in values if v is not None and v == v}
    return "n/a" if not known else ("mixed" if len(known) > 1 else ("yes" if known.pop() else "no"))


def _recorded_mean(values: pd.Series) -> float:
    """The mean, or NaN unless every run recorded the figure (older runs did not)."""
    values = pd.to_numeric(values, errors="coerce")
    return float(values.mean()) if len(values) and values.notna().all() else np.nan


def passes_per_step(g: pd.DataFrame) -> str | None:
    """The counted passes per step, mean over runs, e.g. ``T 1F; S 1F 1B`` (F forward, B
    backward, J forward-mode jvp, D decode step); None unless every run recorded them."""
    if g[list(PASS_COLUMNS)].isna().any().any() or g["steps"].isna().any():
        return None
    parts = []
    for role, letter in (("teacher", "T"), ("student", "S")):
        counts = [(kind[0].upper() if kind != "jvp" else "J", float((g[f"{role}_{kind}_passes"] / g["steps"]).mean()))
                  for kind in ("fwd", "bwd", "jvp", "decode")]
        shown = " ".join(f"{round(v, 2):g}{k}" for k, v in counts if v)
        parts.append(f"{letter} {shown or '0'}")
    return "; ".join(parts)


def with_active(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with ``active_train_s`` (steps x median step time: a pause lands in one
    step and moves the median by nothing, while load that starves every step raises it;
    the train time where no median was stored) and ``cpu_s`` (process CPU time; NaN on GPU)."""
    return runs.assign(active_train_s=(runs["steps"] * runs["step_s_median"]).fillna(runs["train_s"]),
                       cpu_s=runs["device_s"].where(runs["device_time_kind"] == "process_cpu"))


def _row(task: str, method: str, student: str, g: pd.DataFrame, ref: pd.DataFrame) -> dict[str, Any]:
    g, ref = with_active(g), with_active(ref)
    row: dict[str, Any] = {"task": task, "method": method, "student": student, "n": len(g),
                           "score": g["score"].mean() * (g["scale"].iloc[0] if "scale" in g else SCALE)}
    row["cpu_s"] = g["cpu_s"].mean()
    row["wall_cpu_max"] = (g["wall_s"] / g["cpu_s"]).max() if g["cpu_s"].notna().any() else np.nan
    row["off_cpu"] = int(off_cpu(g).sum())
    for key in SPREAD:
        row[key] = g[key].mean()
        row[f"{key}_std"] = g[key].std(ddof=1) if g[key].notna().sum() > 1 else np.nan
    gen = pd.to_numeric(g["generation_s"], errors="coerce") if "generation_s" in g else pd.Series(np.nan, index=g.index)
    for key, values in (("generation_s", gen), ("update_s", g["train_s"] - gen)):
        row[key] = _recorded_mean(values)
        row[f"{key}_std"] = values.std(ddof=1) if values.notna().all() and len(values) > 1 else np.nan
    for key in ("step_s_median", "step_s_q25", "step_s_q75", "params_deployed", "params_training"):
        row[key] = g[key].median() if key.startswith("step") else g[key].mean()
    row["mem_kind"], row["device_time_kind"] = _kinds(g["mem_kind"]), _kinds(g["device_time_kind"])
    row["shared_teacher_outputs"] = _cached(g["shared_teacher_outputs"])
    for key in FLOPS:
        row[key] = _recorded_mean(g[key])
    row["passes_per_step"] = passes_per_step(g)
    for key, rel in RELATIVE.items():
        if ref.empty:
            row[rel] = np.nan
            continue
        base = ref[key].median() if key.startswith("step") else ref[key].mean()
        row[rel] = row[key] / base if not ref.empty and base and not np.isnan(base) else np.nan
    return row


def cost_table(df: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    """Mean (and std over seeds) cost per finished run per (task, method, student); the
    median step time with the median quartiles of the runs' step times; the process CPU
    time and the active training time (steps x median step) beside the wall time, and how
    many runs spent most of their wall time off the CPU (``off_cpu``: wall > OFF_CPU_RATIO
    x CPU: stopped, or starved of a core by other load); relative columns (active training, CPU, step, memory, parameters) divide by ``reference`` (the suite's baseline method) on the same task and student
    (same task when the reference was not run with that student)."""
    if df.empty:
        return pd.DataFrame(columns=COST_COLS)
    done = df[df["status"] == DONE]
    out = []
    is_ref = baseline_runs(done, reference)
    for (task, method, student), g in done.groupby(["task", "method", "student"], sort=True):
        ref = done[(done["task"] == task) & is_ref & (done["student"] == student)]
        if ref.empty:
            ref = done[(done["task"] == task) & is_ref]
        out.append(_row(task, method, student, g, ref))
    return pd.DataFrame.from_records(out, columns=COST_COLS)


def teacher_free_methods(names: set[str]) -> set[str]:
    """The method names whose class declares ``uses_teacher = False`` (their runs carry a
    teacher hash but never read the teacher); unknown names count as using it."""
    from kdbench.registry import get_registry

    out = set()
    for name in names:
        try:
            if not getattr(get_registry().method(name), "uses_teacher", True):
                out.add(name)
        except Exception:  # a method no installed plugin provides: assume it used the teacher
            continue
    return out


def teacher_cost(teachers: list[dict[str, Any]], df: pd.DataFrame, teacher_free: set[str] | None = None) -> pd.DataFrame:
    """Each teacher's fine-tuning cost, once, and its training time amortised over the
    finished student runs that used it (what distillation cost in total per run); runs of
    ``teacher_free`` methods (labels only) do not count."""
    out = []
    for t in teachers:
        c = cost_fields(t.get("cost") or {})
        used = (df["teacher_hash"] == t["hash"]) & (df["status"] == DONE) & ~df["method_name"].isin(teacher_free or set()) if not df.empty else None
        runs = int(used.sum()) if used is not None else 0
        train = c["train_s"] if c["train_s"] is not None else c["wall_s"]
        out.append({"task": t["task"], "teacher": teacher_label(t), "hash": t["hash"], "train_s": train, "prep_s": c["prep_s"],
                    "eval_s": c["eval_s"], "wall_s": c["wall_s"], "mem_mb": c["mem_mb"], "mem_kind": c["mem_kind"], "runs": runs,
                    "amortised_train_s": train / runs if runs and train is not None else np.nan})
    return pd.DataFrame.from_records(out, columns=TEACHER_COLS)


def with_teacher_share(cost: pd.DataFrame, df: pd.DataFrame, tc: pd.DataFrame, teacher_free: set[str]) -> pd.DataFrame:
    """``cost`` plus ``train_with_teacher_s``: a run's training time plus its share of its
    teacher's fine-tuning (the teacher's training time over the runs that used it); equal to
    the training time for labels-only methods, NaN where the teacher's cost is unknown."""
    cost = cost.copy()
    share = dict(zip(tc["hash"], tc["amortised_train_s"])) if not tc.empty else {}
    done = df[df["status"] == DONE] if not df.empty else df
    totals = []
    for r in cost.itertuples():
        g = done[(done["task"] == r.task) & (done["method"] == r.method) & (done["student"] == r.student)]
        free = g.empty or g["method_name"].iloc[0] in teacher_free or g["teacher_hash"].isna().all()
        extra = 0.0 if free else float(np.mean([share.get(h, np.nan) for h in g["teacher_hash"]]))
        totals.append(r.train_s + extra)
    cost["train_with_teacher_s"] = totals
    return cost
