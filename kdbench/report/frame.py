"""The runs frame: one row per stored run (identity, status, scores, cost, provenance),
and the subsets a report can be asked for. Everything downstream reads this frame."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from kdbench.api import NULL_READS, MetricInfo, null_reads
from kdbench.registry import get_registry

SCALE = 100.0  # the scale of stores that predate per-run metric info: every score x100, as KD papers report them
TEST = "test"
WIN, LOSS = "▲", "▼"
NOT_RECORDED = "not recorded"
STEP = "step"  # the history key of an evaluation's step (kdbench.train.evaluation writes it)

# Metrics on a known scale (x100): intervals are clipped to it. Others are not clipped.
_PROPORTIONS = ("accuracy", "f1", "precision", "recall", "exact_match", "auc")
_CORRELATIONS = ("mcc", "matthews", "pearson", "spearman", "corr", "score")


def metric_bounds(metric: Any) -> tuple[float, float] | None:
    """The range of a metric on the x100 scale: [0, 100] for proportions, [-100, 100] for
    correlations (and combined "score" metrics, which may average one), else unbounded."""
    name = str(metric or "").lower()
    if any(name == p or name.startswith(p + "_") for p in _PROPORTIONS):
        return (0.0, SCALE)
    if any(c in name for c in _CORRELATIONS):
        return (-SCALE, SCALE)
    return None


#: A run's metrics key holding each metric's MetricInfo (written by kdbench.train.evaluation).
METRIC_INFO = "metric_info"


def legacy_info(metric: Any) -> MetricInfo:
    """How a store from before per-run metric info is read (all its runs are
    classification or regression): higher is better, x100, bounds by the metric's name
    (:func:`metric_bounds`)."""
    b = metric_bounds(metric)
    return MetricInfo(True, SCALE, (b[0] / SCALE, b[1] / SCALE) if b else (None, None))


def stored_info(metrics: dict[str, Any] | None, metric: Any) -> tuple[MetricInfo, bool]:
    """The one place a report learns how to read a metric: (its MetricInfo as the run
    stored it, True), or (:func:`legacy_info`, False) for runs stored without it. Reports
    never ask a plugin: a store is read the same wherever the report is made."""
    recorded = ((metrics or {}).get(METRIC_INFO) or {}).get(metric) if metric else None
    if isinstance(recorded, dict):
        return MetricInfo.from_dict(recorded), True
    return legacy_info(metric), False


def row_info(r: Any) -> MetricInfo:
    """The MetricInfo a runs-frame row carries (its ``higher_is_better``, ``scale``,
    ``bound_low``/``bound_high`` columns; NaN bounds are open)."""
    lo, hi = r["bound_low"], r["bound_high"]
    return MetricInfo(bool(r["higher_is_better"]), float(r["scale"]), (None if lo != lo else float(lo), None if hi != hi else float(hi)))


def scaled_bounds(info: MetricInfo) -> tuple[float, float] | None:
    """``info.bounds`` on the shown scale (x ``info.scale``); open ends infinite; None when
    unbounded."""
    lo, hi = info.bounds
    if lo is None and hi is None:
        return None
    return (-math.inf if lo is None else lo * info.scale, math.inf if hi is None else hi * info.scale)


def direction_word(higher_is_better: Any) -> str:
    """"higher" or "lower" (is better), for notes and column names."""
    return "lower" if higher_is_better is False or higher_is_better == 0 else "higher"


def _task_row(runs: pd.DataFrame, task: str) -> pd.Series | None:
    cols = {"task", "metric", "scale", "higher_is_better"}
    sub = runs[runs["task"] == task].dropna(subset=["metric"]) if not runs.empty and cols <= set(runs) else None
    return None if sub is None or sub.empty else sub.iloc[0]


def task_higher_is_better(runs: pd.DataFrame, task: str) -> bool:
    """Whether ``task``'s main metric is read higher-is-better (True when unknown)."""
    r = _task_row(runs, task)
    return r is None or direction_word(r["higher_is_better"]) == "higher"


def metric_reading(runs: pd.DataFrame, task: str) -> str:
    """How a figure's score axis names ``task``'s main metric, as the tables do: the
    metric, the scale it is shown on and its direction (``mse x1, lower is better``);
    ``score x100, higher is better`` when the runs carry no reading of the task."""
    r = _task_row(runs, task)
    if r is None:
        return f"score x{SCALE:g}, higher is better"
    return f"{r['metric']} x{float(r['scale']):g}, {direction_word(r['higher_is_better'])} is better"


def reading_note(runs: pd.DataFrame) -> str:
    """How the report reads each task's main metric, for the legend: "x100, higher is
    better" when every task is read so, else per task; and which runs stored no metric
    info (read with :func:`legacy_info`, said so)."""
    if runs.empty or "scale" not in runs:
        return "Scores are test-split values x100 of each task's main metric (higher is better)"
    per_task = runs.drop_duplicates("task").set_index("task")
    readings = {t: (r["metric"], float(r["scale"]), direction_word(r["higher_is_better"])) for t, r in per_task.iterrows()}
    if all(sc == SCALE and d == "higher" for _, sc, d in readings.values()):
        text = "Scores are test-split values x100 of each task's main metric (higher is better)"
    else:
        parts = [f"{t}: {m} x{sc:g}, {d} is better" for t, (m, sc, d) in sorted(readings.items())]
        text = "Scores are test-split values of each task's main metric, shown as " + "; ".join(parts)
    legacy = sorted(set(runs.loc[~runs["info_recorded"].astype(bool), "task"])) if "info_recorded" in runs else []
    if legacy:
        text += (f" (runs of {', '.join(legacy)} were stored without metric directions and scales, before they were recorded: "
                 "read with the classification/regression defaults, higher is better and x100)")
    return text


#: The smallest difference that matters (x100 scale) when a suite declares no ``margins``
#: entry for a task: one point for proportions and correlations (one percentage point of
#: accuracy, 0.01 of a correlation); none for metrics on an unknown scale (declare one).
DEFAULT_MARGIN = 1.0


def default_margin(metric: Any, info: MetricInfo | None = None) -> float:
    """The practical margin of ``metric`` when the suite gives none: DEFAULT_MARGIN for a
    metric bounded at both ends (a proportion or a correlation; on ``info``'s scale, so one
    point of an x100 accuracy is 1.0 and of an x1 one 0.01); NaN for an unbounded metric
    (an error or a loss: its scale is unknown, the suite must declare one). ``info`` is the
    runs' stored MetricInfo, else the pre-metric-info reading of ``metric``."""
    info = info or legacy_info(metric)
    lo, hi = info.bounds
    return DEFAULT_MARGIN * info.scale / SCALE if lo is not None and hi is not None else math.nan


def task_margin(task: str, metric: Any, margins: dict[str, float] | None, info: MetricInfo | None = None) -> float:
    """The task's practical margin: the suite's ``margins`` entry, else the metric's default."""
    value = (margins or {}).get(task)
    return float(value) if value is not None else default_margin(metric, info)


#: A run whose wall time is more than this many times its process CPU time spent most of
#: it off the CPU: stopped (a pause), waiting for a core that other processes held (more
#: busy processes than cores), or waiting on I/O. The ratio cannot tell these apart, so
#: reports call such a run "off-CPU", never "paused": its wall time is not its cost.
OFF_CPU_RATIO = 3.0
#: How reports name such a run (leaderboard time column, cost table, legend, summary).
OFF_CPU = "off-CPU"
OFF_CPU_WHY = "stopped, or waiting for a core under other load, or on I/O"


def off_cpu(runs: pd.DataFrame) -> pd.Series:
    """True per run (CPU runs only: ``device_time_kind`` process_cpu) whose wall time is more
    than OFF_CPU_RATIO times its process CPU time."""
    if runs.empty or "device_s" not in runs:
        return pd.Series(False, index=runs.index)
    cpu = runs["device_s"].where(runs["device_time_kind"] == "process_cpu")
    return (runs["wall_s"] > OFF_CPU_RATIO * cpu).fillna(False).astype(bool)



def param_text(method_name: str, key: str, value: Any) -> str:
    """``key=value`` as row names and settings show it. A null value (the parameter left
    unset) reads as the word its method's field declares (:func:`kdbench.api.nullable`:
    ``teacher_topk=full``), else ``off``; "None" tells a reader nothing. A method that is
    not registered (a store read without its plugin) gets ``off``."""
    return f"{key}={param_value(method_name, key, value)}"


def param_value(method_name: str, key: str, value: Any) -> Any:
    """``value``, or for a null the word ``method_name``'s field ``key`` reads as
    (:func:`null_text`): what row names, settings and sweep levels show."""
    return value if value is not None else null_text(method_name, key)


def method_options(method_name: str) -> Any:
    """The options class (``Params``) of the registered method ``method_name``, or None for
    a method whose plugin is not installed (a store read without it): what reports ask
    when a stored run leaves a parameter unsaid (a null, or an added field at its default)."""
    entry = get_registry().entries["methods"].get(method_name)
    return entry.cls.Params if entry is not None else None


def null_text(method_name: str, key: str) -> str:
    """The word a null value of ``method_name``'s parameter ``key`` reads as (its field's
    :func:`kdbench.api.nullable` word, else ``off``; ``off`` for an unregistered method)."""
    options = method_options(method_name)
    return null_reads(options, key) if options is not None else NULL_READS


def label(method: str, params: dict[str, Any], varying: set[str], method_name: str | None = None) -> str:
    """A row name: ``method`` with the parameters in ``varying`` that ``params`` holds, in
    name order; ``method_name`` (default ``method``) is the registered method whose fields
    say how a null value reads (``method`` may be an entry's label)."""
    shown = [param_text(method_name or method, k, v) for k, v in sorted(params.items()) if k in varying]
    return method if not shown else f"{method}({', '.join(shown)})"


def test_splits(metrics: dict[str, Any]) -> list[str]:
    """The test split first, then any further test splits (``test_*``), sorted."""
    extra = sorted(k for k in metrics if k.startswith(TEST + "_") and isinstance(metrics[k], dict))
    return ([TEST] if isinstance(metrics.get(TEST), dict) else []) + extra


def task_score(metrics: dict[str, Any] | None) -> float:
    """The number a task contributes to the average over tasks: its main metric on the
    test split, averaged with the same metric on further ``test_*`` splits."""
    if not metrics or not metrics.get("main_metric"):
        return np.nan
    main = metrics["main_metric"]
    vals = [metrics[s].get(main) for s in test_splits(metrics)]
    vals = [float(v) for v in vals if v is not None]
    return float(np.mean(vals)) if vals else np.nan


def _varying(rows: list[dict[str, Any]]) -> dict[str, set[str]]:
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["params"])
    out = {}
    for method, plist in by_method.items():
        keys = set().union(*(p.keys() for p in plist))
        out[method] = {k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in plist}) > 1}
    return out


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def cost_fields(cost: dict[str, Any]) -> dict[str, Any]:
    """A run's cost figures, new fields first, falling back on what older stores recorded:
    memory = ``mem_mb`` (this run's own), else ``peak_mem_increase_mb``; training
    parameters = ``params_training``, else ``student_params``. Missing ones are None."""
    mem = _first(cost.get("mem_mb"), cost.get("peak_mem_increase_mb"))
    kind = cost.get("mem_kind") or (f"{cost.get('peak_mem_kind') or 'rss'} increase" if mem is not None else None)
    return {
        "wall_s": cost.get("wall_s"), "train_s": cost.get("train_s"), "eval_s": cost.get("eval_s"), "prep_s": cost.get("prep_s"),
        "device_s": cost.get("device_s"), "step_s": cost.get("step_s"), "step_s_median": cost.get("step_s_median"),
        "step_s_q25": cost.get("step_s_q25"), "step_s_q75": cost.get("step_s_q75"), "mem_mb": mem, "mem_kind": kind,
        "peak_mem_mb": cost.get("peak_mem_mb"), "steps": cost.get("steps"),
        "params_deployed": cost.get("params_deployed"), "params_training": _first(cost.get("params_training"), cost.get("student_params")),
        "student_params": cost.get("student_params"), "shared_teacher_outputs": cost.get("shared_teacher_outputs"),
        "device_time_kind": cost.get("device_time_kind"), "peak_mem_kind": cost.get("peak_mem_kind"),
        # sampling inside training steps (on-policy methods), timed apart from the update
        "generation_s": cost.get("generation_s"),
        **compute_fields(cost),
    }


#: the counted passes as run columns (``<role>_<kind>_passes``; None where not recorded)
PASS_COLUMNS = tuple(f"{role}_{kind}_passes" for role in ("teacher", "student") for kind in ("fwd", "bwd", "jvp", "decode"))


def compute_fields(cost: dict[str, Any]) -> dict[str, Any]:
    """A run's counted compute (:mod:`kdbench.compute`): FLOPs of teacher, student and
    both, and each counted pass; None where the store did not record them (older runs)."""
    passes = cost.get("passes")
    counts = {c: (passes.get(c.removesuffix("_passes"), 0) if isinstance(passes, dict) else None) for c in PASS_COLUMNS}
    return {"train_flops": cost.get("train_flops"), "teacher_flops": cost.get("teacher_flops"), "student_flops": cost.get("student_flops"), **counts}


NUMERIC = ("test", "validation", "score", "wall_s", "train_s", "eval_s", "prep_s", "device_s", "step_s", "step_s_median",
           "step_s_q25", "step_s_q75", "mem_mb", "peak_mem_mb", "steps", "params_deployed", "params_training", "student_params",
           "train_flops", "teacher_flops", "student_flops", *PASS_COLUMNS)


def _record(r: dict[str, Any], varying: set[str]) -> dict[str, Any]:
    m = r["metrics"] or {}
    main = m.get("main_metric")
    info, recorded = stored_info(m, main)
    env = r.get("env") or {}
    data = env.get("data")
    return {
        "hash": r["hash"], "task": r["task"], "method": label(r["method"], r["params"], varying),
        "method_name": r["method"], "entry": r["method"], "params": json.dumps(r["params"], sort_keys=True), "student": r["student"],
        "seed": r["seed"], "status": r["status"], "metric": main, "teacher_hash": r.get("teacher_hash"),
        "higher_is_better": info.higher_is_better, "scale": info.scale, "info_recorded": recorded,
        "bound_low": np.nan if info.bounds[0] is None else info.bounds[0], "bound_high": np.nan if info.bounds[1] is None else info.bounds[1],
        "test": m.get(TEST, {}).get(main) if main else np.nan,
        "validation": m.get("validation", {}).get(main) if main else np.nan,
        "score": task_score(m), "splits": {s: m[s].get(main) for s in test_splits(m)} if main else {},
        "step": m.get("step"), **cost_fields(r["cost"] or {}),
        "device_name": env.get("device_name"), "git_commit": env.get("git_commit") or NOT_RECORDED,
        "data": json.dumps(data, sort_keys=True) if data else None, "_metrics": m,
        "diverged_step": r.get("diverged_step"), "error": ((r.get("error") or "").strip().splitlines() or [None])[-1],
    }


def runs_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: identity, status, the reported test/validation scores, cost and
    provenance (commit, data fingerprints as JSON or None when not recorded). ``entry`` is
    the method's name here; :func:`kdbench.report.labels.entry_rows` sets it to a labelled
    method entry's label for that entry's runs (sweeps are analysed per entry)."""
    rows = list(rows)
    varying = _varying(rows)
    df = pd.DataFrame.from_records([_record(r, varying[r["method"]]) for r in rows])
    if not df.empty:
        for col in NUMERIC:
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
            keep &= df[key].map(lambda v: same(v, value))
        else:
            keep &= df["params"].map(lambda p: key not in json.loads(p) or same(json.loads(p)[key], value))
    return df[keep]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return str(a) == str(b)


def evaluations(rows: Iterable[dict[str, Any]], hashes: Iterable[str] | None = None) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(run hash, step, entry)`` for every evaluation in the stored runs' ``history``
    (the entries that hold a step), in step order, one per run and step: a step recorded
    twice (a run resumed and evaluated there again) gives its last entry. ``hashes``
    keeps only those runs. The learning-curve and teacher-drift sections both read
    histories through this."""
    keep = None if hashes is None else set(hashes)
    for r in rows:
        if keep is not None and r["hash"] not in keep:
            continue
        last: dict[int, dict[str, Any]] = {}
        for h in r.get("history") or []:
            if isinstance(h, dict) and isinstance(h.get(STEP), (int, float)):
                last[int(h[STEP])] = h
        for step in sorted(last):
            yield r["hash"], step, last[step]


def baseline_runs(df: pd.DataFrame, baseline: str | None) -> pd.Series:
    """Which runs of ``df`` are the baseline's: the ``is_baseline`` column where the
    report marked it from the suite's entries (:func:`kdbench.report.labels.mark_baseline`:
    a labelled entry of the baseline's method, e.g. ``kd+ls``, is a method of its own, not
    the baseline), else every run of the method named ``baseline``."""
    if "is_baseline" in df:
        return df["is_baseline"].astype(bool)
    return df["method_name"] == baseline

