"""Report figures (matplotlib, headless Agg backend), returned as PNG bytes.

Every score axis names the task's main metric, the scale it is shown on and its direction
(``mse x1, lower is better``), as the tables do.

* ``sensitivity-<task>``: per swept factor, each method's mean score at every level
  of the sweep, with ± one standard deviation over seeds as error bars.
* ``pareto-<task>``: score against the mean active training time per run (steps x median
  step time: a pause does not move it, unlike the wall time, which a stopped or
  load-starved run inflates), one point per method and student; the Pareto front (nothing
  both cheaper and better, "better" by the metric's direction) is joined and circled.
* ``curves-<task>``: the validation score against the step, one line per method
  (and student) at the mean over seeds, shaded ± one standard deviation; only for tasks
  whose curves have at least two evaluation steps.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kdbench import stats  # noqa: E402
from kdbench.report.frame import metric_reading, task_higher_is_better  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def _png(fig: "plt.Figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "task"


def sensitivity_figure(levels: "pd.DataFrame", task: str, reading: str = "score x100, higher is better") -> bytes:
    """``reading``: the task's metric, scale and direction (:func:`kdbench.report.frame.metric_reading`)."""
    sub = levels[levels["task"] == task]
    factors = list(dict.fromkeys(sub["factor"]))
    fig, axes = plt.subplots(1, len(factors), figsize=(4.2 * len(factors), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        g = sub[sub["factor"] == factor]
        ticks = list(dict.fromkeys(str(v) for v in g["level"]))
        for method, h in g.groupby("method", sort=True):
            x = [ticks.index(str(v)) for v in h["level"]]
            ax.errorbar(x, h["mean"], yerr=np.nan_to_num(h["std"].to_numpy(dtype=float)), marker="o", capsize=3, label=method)
        ax.set_xticks(range(len(ticks)), ticks, rotation=20 if factor == "student" else 0)
        ax.set_xlabel(factor)
        ax.set_ylabel(f"test {reading} ({task})")
        ax.set_title(f"{factor}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Sensitivity on {task} (mean ± std over seeds)")
    return _png(fig)


#: the cost a Pareto figure ranks by, and its axis label
PARETO_COST = ("active_train_s", "mean active training time per run (s): steps x median step")


def pareto_figure(cost: "pd.DataFrame", task: str, x: str = PARETO_COST[0], reading: str = "score x100, higher is better",
                  higher_is_better: bool = True) -> bytes:
    """``reading``: the task's metric, scale and direction (:func:`kdbench.report.frame.metric_reading`).
    The front keeps the points nothing beats on both cost and score; for a lower-is-better
    metric (an error) the better score is the smaller one."""
    sub = cost[(cost["task"] == task)].dropna(subset=[x, "score"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sign = 1.0 if higher_is_better else -1.0
    front = stats.pareto_front(sub[x].tolist(), (sign * sub["score"]).tolist())
    labels = [f"{m} [{s}]" if sub["student"].nunique() > 1 else m for m, s in zip(sub["method"], sub["student"])]
    ax.scatter(sub[x], sub["score"], color="tab:blue", zorder=3, label="method")
    pts = sorted((c, s) for c, s, f in zip(sub[x], sub["score"], front) if f)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="tab:red", zorder=2, label="Pareto front")
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=160, facecolors="none", edgecolors="tab:red", zorder=4)
    for c, s, lab in zip(sub[x], sub["score"], labels):
        ax.annotate(lab, (c, s), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(PARETO_COST[1] if x == PARETO_COST[0] else x)
    ax.set_ylabel(f"test {reading} ({task})")
    ax.set_title(f"Score vs cost on {task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def shared_lr(curves: "pd.DataFrame") -> list[tuple[int, float]] | None:
    """``[(step, learning rate over the interval ending there, as a share of the peak)]``
    when every row of ``curves`` (one task's) trained on the same known schedule, else
    None: the curves plot draws it on a second axis only then."""
    if "lr" not in curves or curves.empty or curves["lr"].isna().any():
        return None
    series = {tuple(g.sort_values("step")[["step", "lr"]].itertuples(index=False, name=None)) for _, g in curves.groupby(["method", "student"])}
    return [(int(a), float(b)) for a, b in next(iter(series))] if len(series) == 1 else None


def curves_figure(curves: "pd.DataFrame", task: str, reading: str | None = None) -> bytes:
    """``reading``: the task's metric, scale and direction (default: the metric, x100)."""
    sub = curves[curves["task"] == task]
    several = sub["student"].nunique() > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (method, student), g in sub.groupby(["method", "student"], sort=True):
        g = g.sort_values("step")
        std = np.nan_to_num(g["std"].to_numpy(dtype=float))  # one seed: no band
        line, = ax.plot(g["step"], g["mean"], marker="o", markersize=3, label=f"{method} [{student}]" if several else method)
        ax.fill_between(g["step"], g["mean"] - std, g["mean"] + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {reading or str(sub['metric'].iloc[0]) + ' x100'}")
    ax.set_title(f"Learning curves on {task} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    series = shared_lr(sub)
    if series is not None:
        steps, shares = zip(*series)
        right = ax.twinx()
        right.step([0, *steps], [shares[0], *shares], where="pre", color="grey", linestyle="--", linewidth=1)
        right.set_ylim(0, 1.05)
        right.set_ylabel("learning rate over the interval (share of peak, dashed)", fontsize=8)
    return _png(fig)


def report_plots(report: Any) -> dict[str, bytes]:
    """Every figure of a report: name -> PNG bytes."""
    out: dict[str, bytes] = {}
    if not report.sens_levels.empty:
        for task in dict.fromkeys(report.sens_levels["task"]):
            out[f"sensitivity-{_slug(task)}"] = sensitivity_figure(report.sens_levels, task, metric_reading(report.runs, task))
    if not report.cost.empty:
        for task in dict.fromkeys(report.cost["task"]):
            if report.cost.loc[report.cost["task"] == task, PARETO_COST[0]].notna().any():
                out[f"pareto-{_slug(task)}"] = pareto_figure(report.cost, task, reading=metric_reading(report.runs, task),
                                                                  higher_is_better=task_higher_is_better(report.runs, task))
    curves = getattr(report, "curves", None)
    if curves is not None and not curves.empty:
        for task in dict.fromkeys(curves["task"]):
            if curves.loc[curves["task"] == task, "step"].nunique() > 1:
                out[f"curves-{_slug(task)}"] = curves_figure(curves, task, metric_reading(report.runs, task))
    return out
