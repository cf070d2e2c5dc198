"""Reports from the results store (and nothing else but the task data of the chance row).

Every number in a report is recomputed from the stored run rows. The package is laid out
by concern, each module importing only the ones above it:

* :mod:`.frame`: one row per run (identity, status, scores, cost, provenance) and subsets.
* :mod:`.aggregate`: the leaderboard per (task, split, method, student), every teacher in
  its own row, a chance row per task; the paired comparisons with the suite's baseline
  (exact sign-flip test over matched seeds, Holm or Benjamini-Hochberg over the report's
  family of comparisons; :mod:`kdbench.stats`).
* :mod:`.references`, :mod:`.sweeps`, :mod:`.cost`, :mod:`.provenance`, :mod:`.chance`:
  published numbers, sensitivity (with a one-way ANOVA against seed noise), cost with
  spreads relative to the baseline, commits / data fingerprints / runs outside the
  suite, and the constant-prediction scores.
* :mod:`.drift`: the live teacher's drift per evaluation step and the validation/test
  disagreement notes, for methods that update their teacher.
* :mod:`.curves`: the students' validation score per evaluation step and whether each
  leaderboard row's curve has flattened.
* :mod:`.model`: :class:`Report` and :func:`build_report`.
* :mod:`.tables`, :mod:`.sections`: display tables and the legend; :mod:`.text`,
  :mod:`.html`, :mod:`.plots`: renderers; :mod:`.formats`: one writer per format in one
  table, extended by plugins through the ``kdbench_report_formats`` hook.

Scores are shown x100. A task's score for the average over tasks is its ``main_metric``
on the test split, averaged with the same metric on any further test splits the task
evaluates (splits named ``test_*``); the core knows no task by name.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from kdbench.report.aggregate import comparisons, leaderboard
from kdbench.report.cost import cost_table, teacher_cost
from kdbench.report.formats import ReportFormat, report_formats, write_outputs
from kdbench.report.frame import LOSS, SCALE, TEST, WIN, filter_runs, runs_frame, task_score
from kdbench.report.model import Report, build_report
from kdbench.report.references import references_table
from kdbench.report.sections import legend, sections
from kdbench.report.sweeps import sensitivity
from kdbench.report.tables import cell, wide_table
from kdbench.report.text import latex_escape, latex_table, render, render_report, report_json

__all__ = ["LOSS", "SCALE", "TEST", "WIN", "Report", "ReportFormat", "build_report", "cell", "comparisons", "cost_table",
           "filter_runs", "latex_escape", "latex_table", "leaderboard", "legend", "references_table", "render", "render_report",
           "report_formats", "report_json", "runs_frame", "sections", "sensitivity", "suite_report", "task_score", "teacher_cost",
           "wide_table", "write_outputs"]


def suite_report(store: Any, hashes: list[str] | None, teacher_hashes: set[str] | None = None, tasks: list[str] | None = None,
                 methods: list[str] | None = None, baseline: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-run frame, wide leaderboard without marks) for the runs of a suite (or the store)."""
    rep = build_report(store, hashes, teacher_hashes, tasks=tasks, methods=methods, baseline=baseline)
    return rep.runs, rep.wide(marks=False)
