"""Reports from the results store (and nothing else but the task data of the chance row).

Every number in a report is recomputed from the stored run rows. The package is laid out
by concern, each module importing only the ones above it:

* :mod:`.frame`: one row per run (identity, status, scores, cost, provenance) and subsets.
* :mod:`.aggregate`: the leaderboard per (task, split, method, student), every teacher in
  its own row, a chance row per task; the paired comparisons with the suite's baseline
  (exact sign-flip test over matched seeds, Holm or Benjamini-Hochberg over the report's
  family of comparisons; the difference's interval from the same test inverted, the
  procedure's power, the practical verdict against each task's margin with TOST
  equivalence; :mod:`kdbench.stats`), and the tasks whose teacher is not above chance by
  the margin (flagged, left out of averages).
* :mod:`.references`, :mod:`.sweeps`, :mod:`.cost`, :mod:`.provenance`, :mod:`.chance`:
  published numbers, sensitivity (an ANOVA against seed noise, blocked by seed where the
  levels share seeds, and the method x factor interaction against the baseline), cost
  with spreads relative to the baseline (CPU and active training time, runs mostly
  off the CPU counted), commits / data fingerprints / runs outside the suite, and the
  constant-prediction scores.
* :mod:`.drift`: the live teacher's drift per evaluation step and the validation/test
  disagreement notes, for methods that update their teacher.
* :mod:`.curves`: the students' validation score per evaluation step and whether each
  leaderboard row's curve has flattened.
* :mod:`.model`: :class:`Report` and :func:`build_report`.
* :mod:`.tables`, :mod:`.sections`: display tables and the legend; :mod:`.text`,
  :mod:`.html`, :mod:`.plots`: renderers; :mod:`.formats`: one writer per format in one
  table, extended by plugins through the ``kdbench_report_formats`` hook; :mod:`.summary`:
  the report as plain sentences (``--format summary``), which results READMEs quote.

Scores are shown x100. A task's score for the average over tasks is its ``main_metric``
on the test split, averaged with the same metric on any further test splits the task
evaluates (splits named ``test_*``); the core knows no task by name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are loaded on first use (PEP 562): the plugin registry imports
# :mod:`kdbench.report.formats` to register the built-in formats, and that must not pull
# pandas and every report module into each ``kdbench`` start.
_EXPORTS = {
    "comparisons": "aggregate", "leaderboard": "aggregate",
    "cost_table": "cost", "teacher_cost": "cost",
    "ReportFormat": "formats", "report_formats": "formats", "write_outputs": "formats",
    "LOSS": "frame", "SCALE": "frame", "TEST": "frame", "WIN": "frame", "filter_runs": "frame", "runs_frame": "frame",
    "task_score": "frame",
    "Report": "model", "build_report": "model",
    "references_table": "references",
    "legend": "sections", "sections": "sections",
    "sensitivity": "sweeps",
    "cell": "tables", "wide_table": "tables",
    "latex_escape": "text", "latex_table": "text", "render": "text", "render_report": "text", "report_json": "text",
}

__all__ = sorted([*_EXPORTS, "suite_report"])

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdbench.report' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kdbench.report.{module}"), name)
    globals()[name] = value
    return value


def suite_report(store: Any, hashes: list[str] | None, teacher_hashes: set[str] | None = None, tasks: list[str] | None = None,
                 methods: list[str] | None = None, baseline: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-run frame, wide leaderboard without marks) for the runs of a suite (or the store)."""
    from kdbench.report.model import build_report

    rep = build_report(store, hashes, teacher_hashes, tasks=tasks, methods=methods, baseline=baseline)
    return rep.runs, rep.wide(marks=False)
