"""Leaderboard row names from the suite's method entries (``MethodEntry.label``).

Without labels a row is named by its method and the parameters that vary among that
method's runs (:func:`kdbench.report.frame.label`). A method entry with a ``label`` names
its runs' rows instead: the label alone, or with the values of the parameters that its
own sweep varies. The method's other runs are then named by what varies among them alone.
Names only: the runs, their grouping into seeds and every number stay as they were.
Entries with ``grid_selection`` are named by :mod:`kdbench.report.selection`.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from kdbench.report.frame import label
from kdbench.report.selection import members
from kdbench.spec import entry_settings


def _varying(params: list[dict[str, Any]]) -> set[str]:
    keys = set().union(*params) if params else set()
    return {k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in params}) > 1}


def _rename(df: pd.DataFrame, mask: pd.Series, name: str) -> None:
    params = [json.loads(p) for p in df.loc[mask, "params"]]
    varying = _varying(params)
    df.loc[mask, "method"] = [label(name, p, varying, m) for p, m in zip(params, df.loc[mask, "method_name"])]


def entry_runs(df: pd.DataFrame, suite_spec: Any, index: int, registry: Any = None) -> pd.Series:
    """Which runs of ``df`` method entry ``index`` of ``suite_spec`` produces: its method,
    one of the settings it sweeps, and one of its students when it names them."""
    keys = [json.dumps(s, sort_keys=True) for s in entry_settings(suite_spec, index, registry)]
    return members(df, suite_spec.methods[index], keys)


def entry_rows(df: pd.DataFrame, suite_spec: Any, registry: Any = None) -> pd.DataFrame:
    """``df`` (a runs frame) with the ``method`` column (the row name) taken from the
    labels of ``suite_spec``'s method entries, and the ``entry`` column (what a sweep is
    analysed and named by) set to the label for every labelled entry's runs, grid-selected
    ones included (their rows are named by :mod:`kdbench.report.selection`); unchanged when
    no entry has a label. A run that two labelled entries produce takes the first one's,
    in suite order."""
    methods = list(getattr(suite_spec, "methods", None) or [])
    labelled = [i for i, m in enumerate(methods) if m.label]
    if df.empty or not labelled:
        return df
    df = df.copy()
    claimed = pd.Series(False, index=df.index)  # runs named by a label here
    entered = pd.Series(False, index=df.index)  # runs whose entry is a label
    for i in sorted(labelled, key=lambda i: bool(methods[i].grid_selection)):  # a run named here keeps that label as its entry
        entry = methods[i]
        mask = entry_runs(df, suite_spec, i, registry) & ~entered
        df.loc[mask, "entry"] = entry.label
        entered |= mask
        if not entry.grid_selection and mask.any():
            _rename(df, mask, entry.label)
            claimed |= mask
    for name in sorted(set(df.loc[claimed, "method_name"])):
        rest = ~claimed & (df["method_name"] == name)
        if rest.any():
            _rename(df, rest, name)
    return df


def mark_baseline(df: pd.DataFrame, suite_spec: Any, baseline: str | None, registry: Any = None) -> pd.DataFrame:
    """``df`` with a boolean ``is_baseline`` column: the runs every comparison, the cost
    ratios and the drift table are paired with. The suite's ``baseline`` names a row: the
    runs of an entry labelled with it, or of the unlabelled entries of the method it names.
    A labelled entry of that method (``kd`` labelled ``kd+ls``, or a grid-selected one) is
    another row, compared with the baseline like any method, never pooled into it. Without
    entries (no suite, or no entry matches a run) every run of the method named ``baseline``."""
    df = df.copy()
    by_name = df["method_name"] == baseline if not df.empty else pd.Series(False, index=df.index)
    methods = list(getattr(suite_spec, "methods", None) or [])
    if df.empty or not baseline or not methods:
        df["is_baseline"] = by_name
        return df
    mask = pd.Series(False, index=df.index)
    for i, entry in enumerate(methods):
        if not (entry.label == baseline or (entry.name == baseline and not entry.label)):
            continue
        mask |= entry_runs(df, suite_spec, i, registry)
    df["is_baseline"] = mask if mask.any() else by_name
    return df

