"""Display tables: the numeric report turned into columns of text, shared by every format."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from kdbench import stats
from kdbench.api import TEACHER_TOPK
from kdbench.report.frame import LOSS, OFF_CPU, TEST, WIN, direction_word
from kdbench.report.truncation import TRUNCATED_COLUMN, any_truncated, truncation_flag

SMALL_N, TIE = "†", "≈"
#: significant but smaller than the task's practical margin (win / loss); equivalent by TOST
WIN_SMALL, LOSS_SMALL, EQUIV = "△", "▽", "≡"
FLAGGED = "[flagged]"
DAMAGED = "‡"  # the method's live teacher ended clearly worse than it started (kdbench.report.drift.TEACHER_DROP)
SPECIAL_ROWS = ("teacher", "chance")


def fmt_num(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"
    return str(v)


def fmt_p(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if v >= 1e-4 else f"{v:.1e}"


def spread_text(mean: Any, std: Any, digits: int = 2, scale: float = 1.0) -> str:
    if mean is None or mean != mean:
        return "n/a"
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if std == std and std is not None else "")


def cell(mean: float, std: float, n: int) -> str:
    if n == 0 or np.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f} (n={n})" if not np.isnan(std) else f"{mean:.2f} (n={n})"


def _cell_text(r: pd.Series) -> str:
    if r["method"] == "chance":
        return "n/a (chance: undefined for a constant)" if np.isnan(r["mean"]) else f"{r['mean']:.2f} (chance)"
    if r["method"] == "teacher":
        return "-" if np.isnan(r["mean"]) else f"{r['mean']:.2f} (n=1)"
    if r.get("data_flag"):
        return r["data_flag"]
    return cell(r["mean"], r["std"], r["n"])


def column_name(task: str, split: str, metric: Any, higher_is_better: Any = True, flagged: bool = False) -> str:
    """A leaderboard column: task (and split) with its metric; a lower-is-better metric is
    marked "↓ better" so no reader takes its smallest value for the worst; a task that
    cannot separate methods (:func:`kdbench.report.aggregate.task_flags`) is marked FLAGGED."""
    shown = f"{metric}, ↓ better" if direction_word(higher_is_better) == "lower" else f"{metric}"
    name = f"{task} ({shown})" if split == TEST else f"{task} {split} ({shown})"
    return f"{name} {FLAGGED}" if flagged else name


def marker(practical: Any) -> str:
    """The leaderboard's mark for a practical verdict (kdbench.report.aggregate.practical)."""
    if not isinstance(practical, str):
        return ""
    if practical.endswith("below the margin"):
        return WIN_SMALL if practical.startswith("win") else LOSS_SMALL
    return {"win": WIN, "loss": LOSS, "equivalent": EQUIV}.get(practical, "")


def _lower_is_better(g: pd.DataFrame) -> bool:
    return "higher_is_better" in g and direction_word(g["higher_is_better"].iloc[0]) == "lower"


def row_names(board: pd.DataFrame) -> list[str]:
    """Method (with the student when several), one row per teacher, and the chance row."""
    students = board.loc[~board["method"].isin(SPECIAL_ROWS), "student"].nunique() > 1
    teachers = board.loc[board["method"] == "teacher", "student"].nunique() > 1
    out = []
    for m, s in zip(board["method"], board["student"]):
        if m == "teacher":
            out.append(f"teacher [{s}]" if teachers else "teacher")
        else:
            out.append(f"{m} [{s}]" if students and m != "chance" else m)
    return out


def best_marks(board: pd.DataFrame) -> dict[int, str]:
    """Per board index: "best" when the column's best mean (the highest, or the lowest for
    a lower-is-better metric) has an interval that does not overlap the runner-up's, else
    "tie" for the best and every row whose interval overlaps it, except a row significantly
    worse than the baseline (result "loss"): a cell is never tied for best and significantly
    worse at once."""
    out: dict[int, str] = {}
    rows = board[~board["method"].isin(SPECIAL_ROWS) & board["mean"].notna() & (board["data_flag"] == "")]
    for _, g in rows.groupby("col"):
        lower = _lower_is_better(g)  # best is the smallest mean; the intervals mirror
        g = g.sort_values("mean", ascending=lower)
        top = g.iloc[0]
        if len(g) == 1:
            out[g.index[0]] = "best"
            continue
        if lower:
            overlap = [i for i, r in g.iloc[1:].iterrows()
                       if np.isnan(top["ci_high"]) or np.isnan(r["ci_low"]) or r["ci_low"] <= top["ci_high"]]
        else:
            overlap = [i for i, r in g.iloc[1:].iterrows()
                       if np.isnan(top["ci_low"]) or np.isnan(r["ci_high"]) or r["ci_high"] >= top["ci_low"]]
        if not overlap:
            out[g.index[0]] = "best"
        else:
            out.update({i: "tie" for i in [g.index[0], *overlap] if board.loc[i].get("result") != "loss"})
    return out


def _decorate(text: str, r: pd.Series, mark: str | None, marks: bool, bold: str | None) -> str:
    if text == "-":
        return text
    if (marks or bold) and bool(r.get("small_n")):
        text += f" {SMALL_N}"
    if (marks or bold) and r.get("teacher_damaged"):
        text += f" {DAMAGED} {r['teacher_damaged']}"
    if mark == "best" and bold:
        text = {"md": f"**{text}**", "latex": f"\x01{text}\x02", "html": f"<b>{text}</b>"}[bold]
    elif mark == "tie" and (marks or bold):
        text += f" {TIE}"
    if marks and isinstance(r.get("result"), str) and r.get("p_adj") == r.get("p_adj") and r.get("p_adj") is not None:
        mark = marker(r.get("practical", r["result"]))
        text += f" p_adj={fmt_p(r['p_adj'])}" + (f" {mark}" if mark else "")
    return text


def wide_table(board: pd.DataFrame, marks: bool = False, bold: str | None = None) -> pd.DataFrame:
    """Methods (and students), one row per teacher and a chance row; task (split) columns:
    'mean ± std (n=k)'; an average over tasks when there are several; time
    per run; runs that did not finish.

    ``marks``: † when n < 3, the adjusted p-value of the comparison with the baseline, and
    ▲/▼ where it is significant (the plain table, without marks, is for programs: its
    flags are columns of the board). ``bold``: 'md', 'latex' or 'html' to mark a column's best mean when its
    interval does not overlap the runner-up's (otherwise every tied cell gets ≈)."""
    if board.empty:
        return pd.DataFrame()
    board = board.copy()
    board["row"] = row_names(board)
    flags = board["task_flag"] if "task_flag" in board else pd.Series("", index=board.index)
    hib = board["higher_is_better"] if "higher_is_better" in board else [True] * len(board)
    board["col"] = [column_name(t, s, m, h, bool(f))
                    for t, s, m, h, f in zip(board["task"], board["split"], board["metric"], hib, flags)]
    best = best_marks(board)
    board["cell"] = [_decorate(_cell_text(r), r, best.get(i), marks, bold) for i, r in board.iterrows()]
    order_key = board.drop_duplicates("col").set_index("col")
    cols = sorted(board["col"].unique(), key=lambda c: (order_key.loc[c, "task"], order_key.loc[c, "split"] != TEST, c))
    wide = board.pivot_table(index="row", columns="col", values="cell", aggfunc="first").reindex(columns=cols)
    students = board[~board["method"].isin(SPECIAL_ROWS)]
    avgs = averages(students)
    if avgs:
        left_out = sorted({t for t, f in zip(board["task"], flags) if f})
        header = f"avg over {next(iter(avgs.values()))[1]} tasks" + (f" (without flagged {', '.join(left_out)})" if left_out else "")
        wide[header] = pd.Series({r: f"{v:.2f}" for r, (v, _) in avgs.items()})
    if any_truncated(board):
        wide[TRUNCATED_COLUMN] = pd.Series({row: v or "no" for row, v in board[~board["method"].isin(SPECIAL_ROWS)].groupby("row")[TEACHER_TOPK].first().items()})
    off = board.groupby("row")["off_cpu"].sum() if "off_cpu" in board else pd.Series(dtype=float)
    wide["time/run (s)"] = pd.Series({row: "-" if np.isnan(v) else f"{v:.1f}" + (f" ({int(off[row])} {OFF_CPU})" if off.get(row, 0) else "")
                                      for row, v in board.groupby("row")["time_per_run_s"].mean().items()})
    nd = students[students["split"] == TEST].groupby("row")[["failed", "diverged", "running"]].sum()
    wide["not done"] = pd.Series({row: ", ".join(f"{int(r[k])} {k}" for k in ("failed", "diverged", "running") if r[k]) or "0"
                                  for row, r in nd.iterrows()}, dtype=object)  # no student rows (only teachers): empty, not a crash
    order = sorted(wide.index, key=lambda r: (0 if r.startswith("teacher") else 1 if r == "chance" else 2, r))
    return wide.reindex(order).fillna("-").rename_axis("method").reset_index()


def averages(board: pd.DataFrame) -> dict[str, tuple[float, int]]:
    """Per leaderboard row: mean over tasks of the per-task mean score (a task's score
    averages its test splits), only for rows with a score on every task, and only when
    every task's metric reads the same way (one direction, one scale): an average of an
    accuracy x100 and an MSE means nothing, so then there is none. Tasks flagged as unable
    to separate methods (``task_flag``) are left out."""
    if "task_flag" in board:
        board = board[board["task_flag"].fillna("") == ""]
    tasks = sorted(board["task"].unique())
    if {"higher_is_better", "scale"} <= set(board.columns) and len(board[["higher_is_better", "scale"]].drop_duplicates()) > 1:
        return {}
    out = {}
    for row, g in board.groupby("row"):
        per_task = g.groupby("task")["mean"].mean()
        if len(tasks) > 1 and all(t in per_task.index and not np.isnan(per_task[t]) for t in tasks):
            out[row] = (float(per_task[tasks].mean()), len(tasks))
    return out


def small_n_note(n: Any) -> str:
    if n is None or n != n or n >= 3:
        return ""
    return f"n < 3: smallest attainable p {stats.min_p(int(n)):.2f}" if n >= 1 else ""


def diff_interval(r: Any) -> str:
    """The paired difference's interval (the exact test inverted), "unbounded" where no p
    below 0.05 is attainable at this n."""
    low, high = getattr(r, "diff_low", np.nan), getattr(r, "diff_high", np.nan)
    if low != low or high != high:
        return "-"
    if math.isinf(low) and math.isinf(high):
        return f"unbounded (n = {int(r.pairs)})"
    return f"[{low:.2f}, {high:.2f}]"


def mdd_text(r: Any) -> str:
    """The procedure's MDD, or in words why significance is impossible here."""
    possible, need = getattr(r, "possible", None), getattr(r, "least_n", np.nan)
    if possible is False and need == need:
        return f"impossible: n = {int(r.pairs)}, needs n ≥ {int(need)} in this family"
    return fmt_num(getattr(r, "mdd", np.nan))


def result_text(r: Any, result: str) -> str:
    """The practical verdict in words, with its mark."""
    practical = getattr(r, "practical", result)
    practical = practical if isinstance(practical, str) else result
    mark = marker(practical)
    if practical.endswith("below the margin"):
        return f"significant {practical.split(',')[0]}, below the margin {r.margin:.2f} {mark}"
    if practical == "equivalent":
        return f"equivalent within ±{r.margin:.2f} (TOST) {mark}"
    return f"{practical} {mark}" if mark else practical


def damaged_note(k_of_n: Any) -> str:
    """The flags-column text of a row whose live teacher was damaged in ``k_of_n`` seeds."""
    return f"{DAMAGED} live teacher ended clearly below its start in {k_of_n} seeds" if isinstance(k_of_n, str) and k_of_n else ""


def comparison_display(board: pd.DataFrame, baseline: str, correction: str = "holm") -> pd.DataFrame:
    """The statistics table: each task (split), method and student with its interval and
    the paired comparison with the baseline (raw and adjusted p, detectable difference)."""
    b = board[~board["method"].isin(SPECIAL_ROWS)] if not board.empty else board
    rows = []
    for r in b.itertuples():
        result = getattr(r, "result", "n/a")
        result = result if isinstance(result, str) else "n/a"
        tested = result != "baseline"
        rows.append({
            "task": r.task if r.split == TEST else f"{r.task} {r.split}", "method": r.method, "student": r.student,
            "mean": fmt_num(r.mean), "std": fmt_num(r.std), "n": str(r.n),
            "95% CI": "-" if np.isnan(r.ci_low) else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]",
            f"Δ vs {baseline}": fmt_num(getattr(r, "diff", np.nan)) if tested else "-",
            "Δ 95% CI (exact)": diff_interval(r) if tested else "-",
            "p": fmt_p(getattr(r, "p", np.nan)) if tested else "-",
            f"p ({correction})": fmt_p(getattr(r, "p_adj", np.nan)) if tested else "-",
            "pairs": fmt_num(getattr(r, "pairs", np.nan), 0) if tested else "-",
            f"MDD 80% ({correction})": mdd_text(r) if tested else "-",
            "margin": fmt_num(getattr(r, "margin", np.nan)) if tested else "-",
            f"TOST p ({correction})": fmt_p(getattr(r, "tost_p_adj", np.nan)) if tested else "-",
            "result": result_text(r, result),
            "flags": "; ".join(x for x in (small_n_note(r.n), r.data_flag, getattr(r, "task_flag", ""),
                                           damaged_note(getattr(r, "teacher_damaged", "")), truncation_flag(getattr(r, "teacher_topk", "")))
                               if isinstance(x, str) and x),
            "failed": str(r.failed), "diverged": str(r.diverged),
        })
    return pd.DataFrame.from_records(rows)
