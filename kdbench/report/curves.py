"""Learning curves: the students' validation score at every evaluation step, and whether
the curve has flattened by the end of the budget, and at what learning rate.

Every evaluation of a run is stored in its ``history`` as ``{"step": s, "validation":
{metric: value}, ...}``. :func:`curve_table` averages the task's main metric on the
validation split (x100) over the finished runs (seeds) of each leaderboard row (task,
method label, student) at each step; :func:`flatness` compares the last mean with the one
before it (and that one with the one before) against the seed noise, by the rule in
:data:`CURVES_NOTE`. Validation only: the test split is never used to judge the budget.
Beside every mean stands the learning rate the row's runs trained at over the interval
that ends there (the mean of the schedule's factor over those updates, as a share of its
peak, from the run's stored optimizer spec): a decaying schedule flattens any curve at
its end, so a verdict of flat at a low rate says less than one at the full rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kdbench.report.aggregate import mixed_data
from kdbench.report.frame import SCALE, evaluations
from kdbench.spec import OptimizerSpec, lr_factor
from kdbench.store import DONE

VALIDATION = "validation"  # the history key kdbench.train.evaluation writes
KEYS = ["task", "method", "student"]
CURVE_COLS = ["task", "method", "method_name", "student", "step", "metric", "n", "mean", "std", "lr"]
FLAT_COLS = ["task", "method", "method_name", "student", "metric", "evaluations", "n", "last_step", "last_mean", "last_std",
             "last_se", "prev_step", "change", "earlier_change", "tolerance", "lr_last", "state", "verdict"]
#: a change of the mean between two evaluations up to this many points (x100) is flat, whatever the seed noise
MIN_TOLERANCE = 0.5
#: a curve flat while the learning rate over its last interval is below this share of the peak is said to be flat at a low rate
LOW_LR = 0.5


def schedule_of(row: dict[str, Any]) -> np.ndarray | None:
    """The learning-rate factor of a stored run at every update (``factor[k]``: the
    multiple of its lr used by the update after ``k`` updates), from its spec's optimizer
    over its steps (the cost's ``steps``, else the budget's); None where the spec does not
    say (an epoch budget without a recorded step count, an unreadable optimizer).
    Milestones in epochs are placed at ``steps / epochs`` updates per epoch, within a step
    of where the runner put them."""
    spec, cost = row.get("spec") or {}, row.get("cost") or {}
    budget = spec.get("budget") or {}
    steps = cost.get("steps") or budget.get("steps")
    try:
        opt = OptimizerSpec.model_validate(spec.get("optimizer") or {})
        steps = int(steps)
    except (ValueError, TypeError):
        return None
    epochs = budget.get("epochs")
    factor = lr_factor(opt, steps, steps / epochs if epochs else 1.0, bool(epochs))
    return np.array([factor(k) for k in range(steps)], dtype=float)


def interval_lr(schedule: np.ndarray | None, start: int, end: int) -> float:
    """Mean learning-rate factor of the updates ``start .. end-1`` (those between an
    evaluation after ``start`` updates and the next after ``end``), as a share of the
    schedule's peak over the run; NaN without a schedule, for an empty interval or one
    that ends past the run's steps."""
    if schedule is None or end <= start or end > len(schedule):  # past the run's own steps: the history and spec disagree
        return float("nan")
    peak = schedule.max()
    return float(schedule[start:end].mean() / peak) if peak > 0 else float("nan")


def _scale(run: Any) -> float:
    """The run's stored scale (x100 for stores from before metric info)."""
    return float(getattr(run, "scale", SCALE))


def _evaluations(rows: list[dict[str, Any]], runs: pd.DataFrame) -> pd.DataFrame:
    """One record per (leaderboard row, run of ``runs``, evaluation step) with the validation
    main metric (x100); a step recorded twice (a resumed run) counts once, its last entry."""
    by_hash: dict[str, list[Any]] = {}
    for run in runs.drop_duplicates(["hash", *KEYS]).itertuples():
        by_hash.setdefault(run.hash, []).append(run)
    out = []
    for h, step, entry in evaluations(rows, by_hash):
        for run in by_hash[h]:
            value = (entry.get(VALIDATION) or {}).get(run.metric)
            if isinstance(value, (int, float)) and np.isfinite(value):
                out.append({"task": run.task, "method": run.method, "method_name": run.method_name, "student": run.student,
                            "hash": h, "step": step, "metric": run.metric, "score": float(value) * _scale(run)})
    cols = [*KEYS, "method_name", "hash", "step", "metric", "score"]
    return pd.DataFrame.from_records(out, columns=cols)


def curve_table(rows: list[dict[str, Any]], runs: pd.DataFrame) -> pd.DataFrame:
    """Per leaderboard row (task, method label, student; ``runs`` is the frame the
    leaderboard reads) and evaluation step, over the row's finished runs: n, the mean and
    std (ddof=1) of the validation main metric (x100). Rows whose runs read different data
    are left out (the leaderboard flags them); empty when no run evaluated more than once."""
    if runs.empty:
        return pd.DataFrame(columns=CURVE_COLS)
    done = runs[runs["status"] == DONE]
    done = pd.concat([g for _, g in done.groupby(KEYS, sort=False) if not mixed_data(g)] or [done.iloc[:0]])
    ev = _evaluations(rows, done)
    if ev.empty or ev.groupby("hash")["step"].nunique().max() < 2:
        return pd.DataFrame(columns=CURVE_COLS)
    out = (ev.groupby([*KEYS, "step"], sort=True)
           .agg(method_name=("method_name", "first"), metric=("metric", "first"), n=("score", "size"),
                mean=("score", "mean"), std=("score", "std"))  # pandas' std is ddof=1: NaN for one seed
           .reset_index())
    by_hash = {r["hash"]: r for r in rows}
    first = ev.groupby(KEYS, sort=False)["hash"].first()  # a row's seeds share their optimizer and budget
    lr = []
    for keys, g in out.groupby(KEYS, sort=False):
        schedule = schedule_of(by_hash.get(first[keys], {}))
        steps = [0, *g["step"].astype(int)]
        lr += [(i, interval_lr(schedule, a, b)) for i, a, b in zip(g.index, steps, steps[1:])]
    out["lr"] = pd.Series(dict(lr), dtype=float)
    return out[CURVE_COLS]


def share(x: float) -> str:
    """A share as a percentage: whole percents from 10% up, two significant digits below
    (0.1% after three decays by 10 is not 0%)."""
    return f"{x:.0%}" if x >= 0.1 or x == 0 else f"{100 * x:.2g}%"


def _verdict(change: float, earlier: float, tolerance: float, last_std: float, lr: float = float("nan")) -> tuple[str, str]:
    """(state, sentence) for the last change of the mean, the one before (NaN when the
    curve has two evaluations), the tolerance and the learning rate over the last
    interval as a share of its peak (NaN: unknown)."""
    noise = f"seed std {last_std:.2f}" if last_std == last_std else "one seed: no seed std"
    rate = "" if lr != lr or lr >= 1 else f"; learning rate {share(lr)} of its peak over that interval"
    if change > tolerance:
        return "rising", f"still rising: {change:+.2f} over the last interval (tolerance {tolerance:.2f}; {noise}){rate}"
    if change < -tolerance:
        return "falling", f"falling: {change:+.2f} over the last interval (tolerance {tolerance:.2f}; {noise}){rate}"
    head = f"flat within noise: last change {change:+.2f} (tolerance {tolerance:.2f}; {noise})"
    if earlier != earlier:
        head += "; only two evaluations"
    elif abs(earlier) <= tolerance:
        head += f", and {earlier:+.2f} over the interval before"
    else:
        head += f", but {earlier:+.2f} over the interval before: flat for one interval only"
    if lr == lr and lr < LOW_LR:
        return "flat", head + f"; at a learning rate {share(lr)} of its peak: the decaying schedule flattens the curve by itself, so more steps may still gain"
    return "flat", head + rate


def flatness(curves: pd.DataFrame) -> pd.DataFrame:
    """Per leaderboard row of ``curves``: the last change of the mean validation score
    (last evaluation minus the one before), the change before that, the tolerance
    max(MIN_TOLERANCE, standard error of the last mean) and the verdict: flat when
    |last change| <= tolerance, else rising or falling."""
    out = []
    for (task, method, student), g in curves.groupby(KEYS, sort=True):
        g = g.sort_values("step")
        last = g.iloc[-1]
        rec = {"task": task, "method": method, "method_name": last["method_name"], "student": student, "metric": last["metric"],
               "evaluations": len(g), "n": int(last["n"]), "last_step": int(last["step"]), "last_mean": last["mean"],
               "last_std": last["std"], "last_se": last["std"] / np.sqrt(last["n"]), "prev_step": np.nan, "change": np.nan,
               "earlier_change": np.nan, "tolerance": np.nan, "lr_last": last["lr"], "state": "one evaluation",
               "verdict": "one evaluation: no curve"}
        if len(g) > 1:
            diffs = g["mean"].diff().to_numpy()  # mean at each step minus the mean at the step before
            tolerance = max(MIN_TOLERANCE, float(np.nan_to_num(rec["last_se"])))
            earlier = float(diffs[-2]) if len(g) > 2 else np.nan
            state, verdict = _verdict(float(diffs[-1]), earlier, tolerance, float(last["std"]), float(last["lr"]))
            rec |= {"prev_step": int(g["step"].iloc[-2]), "change": float(diffs[-1]), "earlier_change": earlier,
                    "tolerance": tolerance, "state": state, "verdict": verdict}
        out.append(rec)
    return pd.DataFrame.from_records(out, columns=FLAT_COLS)


def _score(mean: float, std: float, n: int, row_n: int) -> str:
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std == std else "")
    return text + (f" (n={n})" if n != row_n else "")


def curves_display(curves: pd.DataFrame, flat: pd.DataFrame) -> pd.DataFrame:
    """One row per leaderboard row: its seeds (n at the last evaluation), the mean ± std at
    every step (n beside a cell only where it differs), the last change and the verdict."""
    steps = sorted({int(s) for s in curves["step"]})
    cells = {(r.task, r.method, r.student, int(r.step)): r for r in curves.itertuples()}
    out = []
    for f in flat.itertuples():
        row = {"task": f.task, "student": f.student, "method": f.method, "metric": f.metric, "seeds": str(f.n)}
        for s in steps:
            c = cells.get((f.task, f.method, f.student, s))
            row[f"step {s}"] = _score(c.mean, c.std, c.n, f.n) if c is not None else "-"
        row["last change"] = "-" if f.change != f.change else f"{f.change:+.2f} ({int(f.prev_step)} → {f.last_step})"
        row["lr over it"] = "-" if f.change != f.change or f.lr_last != f.lr_last else f"{share(f.lr_last)} of peak"
        row["verdict"] = f.verdict
        out.append(row)
    return pd.DataFrame.from_records(out)


CURVES_NOTE = (
    "Validation score (x100, the task's main metric) of the students at every evaluation step: mean ± std (ddof=1) over "
    "the row's finished seeds (n = seeds at the last evaluation; a cell shows its own n where it differs). Rows are the "
    "leaderboard's; rows whose runs read different data are left out. Last change = mean at the last evaluation minus "
    f"the mean at the one before. Rule: flat when |last change| <= max({MIN_TOLERANCE} points, standard error of the "
    "last mean = its seed std / sqrt(n)); still rising when it is above that, falling when below; the change over the "
    "interval before is shown, so a curve flat for one interval only is said to be. Flat is not converged: a curve "
    "that stops at a learning-rate decay step can look flat (the plateau before the decay) and rise again after it, "
    "and a schedule that decays the learning rate to zero flattens any curve at the end of any budget. So beside the "
    "last change stands the learning rate over that interval (the mean of the schedule's factor over its updates, as a "
    f"share of the run's peak, from the stored optimizer spec); a curve flat at under {LOW_LR:.0%} of the peak is said to "
    "be flat at a low rate: it shows the budget's end, not that more steps would not help. The test split is never used "
    "here.")
