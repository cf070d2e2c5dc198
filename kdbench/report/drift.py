"""Teacher drift and validation/test disagreement, for methods that update their teacher.

A run of a teacher-updating method (``Method.updates_teacher``) records at every
evaluation the live teacher's validation metrics and its divergence from the teacher it
started from (history key ``teacher``, see :class:`kdbench.train.evaluation.TeacherDrift`).
:func:`drift_table` averages them over seeds per task, method label, student and step,
beside the fixed fine-tuned teacher's validation score from its store row.

:func:`disagreements` finds where such a method's mean paired difference from the
suite's baseline has one sign on validation and the other on test: the method trains its
teacher on training data, so a choice made on validation can mislead there.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

from kdbench.api import MetricInfo
from kdbench.report.aggregate import pick_baseline_config
from kdbench.report.frame import SCALE, baseline_runs, evaluations, stored_info
from kdbench.report.tables import DAMAGED, cell
from kdbench.store import DONE

TEACHER = "teacher"  # the history key kdbench.train.evaluation.TEACHER writes
DRIFT_COLS = ["task", "method", "method_name", "student", "step", "metric", "n", "teacher_mean", "teacher_std", "start_mean",
              "fine_tuned", "divergence_kind", "divergence_mean", "divergence_std"]
DISAGREE_COLS = ["task", "method", "student", "pairs", "validation_diff", "test_diff"]
#: a run's live teacher is flagged (DAMAGED) when its last validation score is worse than its
#: score at the start by more than this, on the scale the report shows the metric at (points
#: for accuracies and correlations, x100): past the seed noise of a few points on the
#: 1,000-example validation splits of the CPU suites (binomial std 1.3 points at 80% accuracy)
TEACHER_DROP = 5.0


def teacher_loss(start: float, end: float, info: MetricInfo) -> float:
    """How much worse the live teacher ended than it started, on the shown scale (``x
    info.scale``): start - end for a higher-is-better metric, end - start for a
    lower-is-better one (an error or a perplexity that rose). Negative: it improved."""
    worse = (start - end) if info.higher_is_better else (end - start)
    return float(worse) * info.scale


def _mean_std(values: list[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=float)
    if not len(x):
        return np.nan, np.nan
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else np.nan


def _fine_tuned(teacher_hashes: Iterable[Any], teachers: dict[str, dict[str, Any]], metric: str) -> float:
    """The fixed fine-tuned teacher's validation score (x100); the mean if the runs used several."""
    found = [(teachers.get(h) or {}).get("metrics") or {} for h in set(teacher_hashes)]
    vals = [float(v) * stored_info(m, metric)[0].scale for m in found if (v := m.get("validation", {}).get(metric)) is not None]
    return float(np.mean(vals)) if vals else np.nan


def _entries(rows: list[dict[str, Any]], df: pd.DataFrame) -> list[dict[str, Any]]:
    """One record per (finished run, evaluation step) that holds a live-teacher entry (a
    step recorded twice by a resumed run: its last entry)."""
    runs = df.drop_duplicates("hash").set_index("hash") if not df.empty else df
    done = [r["hash"] for r in rows if r["status"] == DONE and r["hash"] in runs.index]
    out = []
    for h, step, entry in evaluations(rows, done):
        t = entry.get(TEACHER)
        if not isinstance(t, dict):
            continue
        run = runs.loc[h]
        metric = run["metric"]
        out.append({"hash": h, "task": run["task"], "method": run["method"], "method_name": run["method_name"], "student": run["student"],
                    "step": step, "metric": metric, "teacher_hash": run["teacher_hash"],
                    "score": (t.get("validation") or {}).get(metric), "start": (t.get("start_validation") or {}).get(metric),
                    "divergence": t.get("divergence"), "kind": t.get("divergence_kind"), "scale": run.get("scale", SCALE),
                    "higher_is_better": run.get("higher_is_better", True)})
    return out


def drift_table(rows: list[dict[str, Any]], df: pd.DataFrame, teachers: list[dict[str, Any]]) -> pd.DataFrame:
    """Per task, method label, student and evaluation step, over the finished runs (seeds)
    that recorded the live teacher: the mean and std (ddof=1) of its validation main
    metric (x100), the starting teacher's (mean), the fixed fine-tuned teacher's validation
    score (x100), and the mean and std of the divergence from the start (its kind)."""
    entries = _entries(rows, df)
    if not entries:
        return pd.DataFrame(columns=DRIFT_COLS)
    by_hash = {t["hash"]: t for t in teachers}
    out = []
    for (task, method, student, step), g in pd.DataFrame.from_records(entries).groupby(["task", "method", "student", "step"], sort=True):
        scale = float(g["scale"].iloc[0])  # the run's stored scale (x100 for stores from before metric info)
        scores = [float(v) * scale for v in g["score"] if v is not None and v == v]
        divs = [float(v) for v in g["divergence"] if v is not None and v == v]
        starts = [float(v) * scale for v in g["start"] if v is not None and v == v]
        (t_mean, t_std), (d_mean, d_std) = _mean_std(scores), _mean_std(divs)
        out.append({"task": task, "method": method, "method_name": g["method_name"].iloc[0], "student": student, "step": int(step),
                    "metric": g["metric"].iloc[0], "n": len(scores), "teacher_mean": t_mean, "teacher_std": t_std,
                    "start_mean": _mean_std(starts)[0], "fine_tuned": _fine_tuned(g["teacher_hash"].dropna(), by_hash, g["metric"].iloc[0]),
                    "divergence_kind": "/".join(sorted({str(k) for k in g["kind"] if k})), "divergence_mean": d_mean, "divergence_std": d_std})
    return pd.DataFrame.from_records(out, columns=DRIFT_COLS)


def damaged_teachers(rows: list[dict[str, Any]], df: pd.DataFrame) -> dict[tuple[str, str, str], tuple[int, int]]:
    """Per (task, method label, student) of a method that updates its teacher: (k, n), k of the
    n finished runs that recorded their live teacher ending with it more than
    :data:`TEACHER_DROP` worse than its start (validation, main metric, last evaluation), read
    in the direction and at the scale each run stored for its metric (:func:`kdbench.report.frame.stored_info`,
    carried by the runs frame): lower for accuracy, higher for an error or a perplexity."""
    last: dict[str, dict[str, Any]] = {}
    for e in _entries(rows, df):
        if e["score"] is not None and e["start"] is not None and (e["hash"] not in last or e["step"] >= last[e["hash"]]["step"]):
            last[e["hash"]] = e
    out: dict[tuple[str, str, str], tuple[int, int]] = {}
    for e in last.values():
        k, n = out.get((e["task"], e["method"], e["student"]), (0, 0))
        info = MetricInfo(bool(e["higher_is_better"]), float(e["scale"]))
        out[(e["task"], e["method"], e["student"])] = (k + int(teacher_loss(float(e["start"]), float(e["score"]), info) > TEACHER_DROP), n + 1)
    return out


def with_damage_flags(board: pd.DataFrame, damaged: dict[tuple[str, str, str], tuple[int, int]]) -> pd.DataFrame:
    """The leaderboard with a ``teacher_damaged`` column: 'k/n' on the rows (every split) whose
    method damaged its live teacher in k of n seeds (k > 0), else ''."""
    board = board.copy()
    board["teacher_damaged"] = [f"{damaged[key][0]}/{damaged[key][1]}" if damaged.get(key, (0, 0))[0] else ""
                                for key in zip(board["task"], board["method"], board["student"])] if not board.empty else []
    return board


def damage_note() -> str:
    """What the mark means (leaderboard line and legend)."""
    return (f"{DAMAGED} k/n: in k of the n seeds the method's live teacher ended more than {TEACHER_DROP:g} points (x100) below "
            "where it started on the validation split (the teacher-drift table has the steps); for a lower-is-better metric, "
            f"more than {TEACHER_DROP:g} above it, on the scale the table shows.")


def _sci(mean: float, std: float) -> str:
    if mean != mean:
        return "n/a"
    return f"{mean:.4g}" + (f" ± {std:.2g}" if std == std else "")


def drift_display(drift: pd.DataFrame) -> pd.DataFrame:
    """The drift table as text cells."""
    return pd.DataFrame.from_records([{
        "task": r.task, "method": r.method, "student": r.student, "step": str(r.step), "metric": r.metric,
        "live teacher (validation)": cell(r.teacher_mean, r.teacher_std, r.n),
        "starting teacher": "n/a" if r.start_mean != r.start_mean else f"{r.start_mean:.2f}",
        "fine-tuned teacher (validation)": "n/a" if r.fine_tuned != r.fine_tuned else f"{r.fine_tuned:.2f}",
        "divergence from start": f"{r.divergence_kind or '?'} {_sci(r.divergence_mean, r.divergence_std)}",
    } for r in drift.itertuples()])


DRIFT_NOTE = (
    "Methods that update their teacher: at each evaluation step, the run's live teacher scored on the validation split "
    "(x100, mean ± std over seeds, n seeds), the teacher it started from (after the method's setup: the fine-tuned "
    "teacher, or the re-initialised one of a method that starts elsewhere), the fixed fine-tuned teacher's validation "
    "score, and how far the live teacher's validation predictions moved from the start: kl = mean over examples of "
    "KL(p_start || p_now) at temperature 1, mse = mean squared difference of the regression predictions (mean ± std over "
    "seeds). How to read it: a teacher score that falls while the divergence grows early means the teacher moves away "
    "from what it knew (a recipe problem: its learning rate or schedule); a flat score with a divergence near 0 means "
    "the budget is too short for the teacher to change, so the method is KD with a fixed teacher at this budget.")


def disagreements(df: pd.DataFrame, baseline: str, updating: set[str]) -> pd.DataFrame:
    """Per task, method label and student of a teacher-updating method: the mean over
    matched seeds of its difference from the baseline (x100) on validation and on test,
    kept only where the two have opposite signs and each is larger than its standard error
    (std of the paired differences / sqrt(n)): a flip inside seed noise is not reported."""
    if df.empty or not updating:
        return pd.DataFrame(columns=DISAGREE_COLS)
    done = df[df["status"] == DONE]
    out = []
    is_base = baseline_runs(done, baseline)
    for (task, method, student), g in done[done["method_name"].isin(updating) & ~is_base].groupby(["task", "method", "student"], sort=True):
        base_all = done[(done["task"] == task) & (done["student"] == student) & is_base]
        cfg = pick_baseline_config(base_all, g["params"].iloc[0])[0] if not base_all.empty else None
        if cfg is None:
            continue
        base = base_all[base_all["params"] == cfg].set_index("seed")
        pairs = [(r.validation - base.loc[r.seed, "validation"], r.test - base.loc[r.seed, "test"]) for r in g.itertuples()
                 if r.seed in base.index and np.isfinite([r.validation, r.test, base.loc[r.seed, "validation"], base.loc[r.seed, "test"]]).all()]
        if not pairs:
            continue
        (v, t), (sv, st) = _mean_and_se(pairs)
        if v * t < 0 and abs(v) > sv and abs(t) > st:  # opposite signs, each beyond one standard error
            out.append({"task": task, "method": method, "student": student, "pairs": len(pairs), "validation_diff": v, "test_diff": t})
    return pd.DataFrame.from_records(out, columns=DISAGREE_COLS)


def _mean_and_se(pairs: list[tuple[float, float]]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Means (x100) of the validation and test differences, and their standard errors (0 for one pair)."""
    arr = np.asarray(pairs, dtype=float) * SCALE
    se = arr.std(axis=0, ddof=1) / np.sqrt(len(arr)) if len(arr) > 1 else np.zeros(2)
    return (float(arr[:, 0].mean()), float(arr[:, 1].mean())), (float(se[0]), float(se[1]))


def disagreement_notes(dis: pd.DataFrame, several_students: bool = False) -> list[str]:
    """One sentence per disagreement, to sit beside the comparison with the baseline."""
    return [f"validation and test disagree for {r.method}{f' [{r.student}]' if several_students else ''} on {r.task} "
            f"(validation {r.validation_diff:+.2f}, test {r.test_diff:+.2f}, each beyond one standard error); it trains its teacher on training data, so "
            "validation-based selection (and model selection on validation) may mislead here." for r in dis.itertuples()]


def updating_methods(df: pd.DataFrame, rows: list[dict[str, Any]], registry: Any = None) -> set[str]:
    """Method names whose runs update their teacher: the registry's ``updates_teacher``,
    or, for a method the registry does not know, a recorded live-teacher entry."""
    if df.empty:
        return set()
    names = set(df["method_name"])
    recorded = {r["method"] for r in rows if any(isinstance(h, dict) and TEACHER in h for h in r.get("history") or [])}
    if registry is None:
        from kdbench.registry import get_registry

        registry = get_registry()
    out = set()
    for name in names:
        try:
            flag = bool(registry.method(name).updates_teacher)
        except Exception:  # not installed here (a store from elsewhere): fall back on what the runs recorded
            flag = name in recorded
        if flag:
            out.add(name)
    return out
