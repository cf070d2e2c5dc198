"""The report model: every table of a suite's report, numeric (scores x100), built from
the results store alone (plus the task data for the chance row)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from kdbench.api import KDBenchError
from kdbench.report.aggregate import family, leaderboard
from kdbench.report.chance import chance_scores
from kdbench.report.cost import cost_table, teacher_cost, teacher_free_methods, with_teacher_share
from kdbench.report.curves import curve_table, flatness
from kdbench.report.drift import damaged_teachers, disagreements, drift_table, updating_methods, with_damage_flags
from kdbench.report.frame import filter_runs, runs_frame
from kdbench.report.integrity import StoreIntegrity, store_integrity
from kdbench.report.labels import entry_rows, mark_baseline
from kdbench.report.provenance import commits, data_fingerprints, environments, outside_runs, report_date
from kdbench.report.references import references_table
from kdbench.report.selection import GridSelection, select_on_validation
from kdbench.report.sweeps import interactions, sensitivity
from kdbench.report.truncation import truncated_teachers, with_truncation
from kdbench.store import CORRUPT, DONE, ResultsStore

PROBLEM_COLS = ["hash", "task", "method", "student", "seed", "status", "diverged_step", "error"]


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
    correction: str = "holm"
    date: str = ""
    teacher_cost: pd.DataFrame = field(default_factory=pd.DataFrame)
    commits: pd.DataFrame = field(default_factory=pd.DataFrame)
    data: pd.DataFrame = field(default_factory=pd.DataFrame)
    outside: pd.DataFrame = field(default_factory=pd.DataFrame)
    chance: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: method entries with ``grid_selection``: the setting chosen per task on validation
    selection: GridSelection | None = None
    drift: pd.DataFrame = field(default_factory=pd.DataFrame)  # teacher drift per step (kdbench.report.drift)
    disagreements: pd.DataFrame = field(default_factory=pd.DataFrame)  # validation/test sign flips vs the baseline
    updating: list[str] = field(default_factory=list)  # methods that update their teacher
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)  # validation score per step (kdbench.report.curves)
    flatness: pd.DataFrame = field(default_factory=pd.DataFrame)  # per row: has its curve flattened
    margins: dict[str, float] = field(default_factory=dict)  # the suite's declared practical margins (others: defaults)
    #: per task, factor and pair of methods: is one less sensitive (kdbench.report.sweeps.interactions)
    interactions: pd.DataFrame = field(default_factory=pd.DataFrame)
    integrity: StoreIntegrity | None = None  # verified / unverified / corrupt / missing runs of the suite

    @property
    def flagged(self) -> dict[str, str]:
        """Tasks that cannot separate methods (teacher not above chance by the margin): why."""
        if self.board.empty or "task_flag" not in self.board:
            return {}
        return {t: f for t, f in zip(self.board["task"], self.board["task_flag"]) if f}

    @property
    def family(self) -> int:
        """How many comparisons the correction counts (every test of the report)."""
        return family(self.board)

    @property
    def problems(self) -> pd.DataFrame:
        """Runs that did not finish: shown, never averaged."""
        if self.runs.empty:
            return pd.DataFrame(columns=PROBLEM_COLS)
        return self.runs[self.runs["status"] != DONE][PROBLEM_COLS].reset_index(drop=True)

    @property
    def mixed(self) -> pd.DataFrame:
        """Rows whose runs read different data: flagged, not averaged."""
        if self.board.empty:
            return self.board
        return self.board[self.board["data_flag"] != ""][["task", "split", "method", "student", "data_flag"]]

    def wide(self, marks: bool = True, bold: str | None = None) -> pd.DataFrame:
        from kdbench.report.tables import wide_table

        return wide_table(self.board, marks=marks, bold=bold)


def _subset(tasks, methods, students, where) -> str:
    return "; ".join(x for x in [f"tasks {tasks}" if tasks else "", f"methods {methods}" if methods else "",
                                 f"students {students}" if students else "", f"where {where}" if where else ""] if x)


def check_filters(df: pd.DataFrame, tasks: list[str] | None, methods: list[str] | None, students: list[str] | None,
                  where: dict[str, Any] | None) -> pd.DataFrame:
    """``df`` filtered (:func:`filter_runs`); a :class:`KDBenchError` naming the filter
    and what the runs hold when a ``where`` key is no run's parameter (nor seed, status,
    student, task), or when runs exist but none passes the filter."""
    if df.empty or not (tasks or methods or students or where):
        return filter_runs(df, tasks, methods, students, where)
    params = set().union(*(json.loads(p) for p in df["params"]))
    unknown = [k for k in where or {} if k not in params | {"seed", "status", "student", "task"}]
    if unknown:
        raise KDBenchError(f"--where {unknown[0]!r}: no run has such a parameter; parameters: {', '.join(sorted(params)) or 'none'}, "
                           "or seed, status, student, task")
    out = filter_runs(df, tasks, methods, students, where)
    if out.empty:
        raise KDBenchError(f"no stored run matches the filter ({_subset(tasks, methods, students, where)}); the runs have "
                           f"tasks {sorted(set(df['task']))}, methods {sorted(set(df['method_name']))}, "
                           f"students {sorted(set(df['student']))}")
    return out


def build_report(store: ResultsStore, hashes: list[str] | None = None, teacher_hashes: set[str] | None = None, *,
                 suite_spec: Any = None, title: str = "", tasks: list[str] | None = None, methods: list[str] | None = None,
                 students: list[str] | None = None, where: dict[str, Any] | None = None, baseline: str | None = None,
                 correction: str = "holm", chance: bool | dict[str, dict[str, Any]] = True, strict_filters: bool = False) -> Report:
    """Collect and compute every table for the runs ``hashes`` (a suite, or the store).

    ``baseline``: the method compared with and the cost reference; default the suite's
    ``baseline`` (else the first method of the store). ``correction``: holm or bh over
    every comparison of the report. ``chance``: True computes the chance rows from the
    runs' task data, a dict gives them, False leaves them out. ``strict_filters`` (the
    command line): a filter that matches no stored run, or a ``where`` key no run has, is
    a :class:`KDBenchError` (:func:`check_filters`) instead of an empty report."""
    checked = store.runs(include_corrupt=True)  # corrupt rows: counted and named, never read
    wanted = set(hashes) if hashes is not None else None
    integrity = store_integrity(checked, wanted)
    all_rows = [r for r in checked if r["integrity"] != CORRUPT]
    rows = [r for r in all_rows if wanted is None or r["hash"] in wanted]
    df = (check_filters if strict_filters else filter_runs)(entry_rows(runs_frame(rows), suite_spec), tasks, methods, students,
                                                            where)  # rows named by labels
    kept = set(df["hash"]) if not df.empty else set()
    teachers = [t for t in store.teachers() if teacher_hashes is None or t["hash"] in teacher_hashes]
    teachers = [t for t in teachers if (not tasks or t["task"] in tasks) and (not methods or "teacher" in methods)]
    baseline = baseline or getattr(suite_spec, "baseline", None) or (sorted(df["method_name"])[0] if not df.empty else "")
    df = mark_baseline(df, suite_spec, baseline)  # the baseline row's runs, not every run of its method
    if chance is True and (not methods or "chance" in methods):
        chance = chance_scores([r for r in rows if r["hash"] in kept and r["status"] == DONE])
    elif chance is True:
        chance = {}
    selection = select_on_validation(df, suite_spec)  # the board reads each such entry's chosen setting only
    margins = dict(getattr(suite_spec, "margins", None) or {})
    board = leaderboard(selection.runs, teachers, baseline=baseline, chance=chance or {}, correction=correction, margins=margins)
    board = with_damage_flags(board, damaged_teachers([r for r in rows if r["hash"] in kept], df))
    board = with_truncation(board, truncated_teachers(selection.runs))  # rows that learnt from a top-k teacher cache
    refs = [r for r in getattr(suite_spec, "references", []) if (not tasks or r.task in tasks) and (not methods or r.method in methods)]
    free = teacher_free_methods(set(df["method_name"]) if not df.empty else set())
    tcost = teacher_cost(teachers, df, free)
    levels, scores = sensitivity(df, [s.label or s.model for s in getattr(suite_spec, "students", [])], correction)
    inter = interactions(df, [s.label or s.model for s in getattr(suite_spec, "students", [])], correction, baseline)
    updating = updating_methods(df, rows)
    curves = curve_table([r for r in rows if r["hash"] in kept], selection.runs)  # the leaderboard's rows and labels
    return Report(
        title=title, baseline=baseline, runs=df, board=board, references=references_table(df, refs, teachers),
        sens_levels=levels, sens_scores=scores, cost=with_teacher_share(cost_table(df, baseline), df, tcost, free), cost_reference=baseline,
        env=environments([r for r in rows if r["hash"] in kept]),
        config=suite_spec.model_dump(mode="json") if suite_spec is not None else None, subset=_subset(tasks, methods, students, where),
        missing=integrity.missing, correction=correction, date=report_date(), integrity=integrity,
        teacher_cost=tcost, commits=commits(df), data=data_fingerprints(df),
        outside=outside_runs(all_rows, hashes), chance=chance or {}, selection=selection,
        drift=drift_table([r for r in rows if r["hash"] in kept], df, teachers), disagreements=disagreements(df, baseline, updating),
        updating=sorted(updating), curves=curves, flatness=flatness(curves), margins=margins, interactions=inter)
