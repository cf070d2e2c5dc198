"""A method entry's grid point chosen per task on the validation split (``grid_selection``).

For a method entry with ``grid_selection: validation`` whose params sweep, the report
takes, for each task and student, the entry's setting with the best mean *validation*
main metric over its finished seeds (the highest, or the lowest where the runs' stored
metric info says lower is better); ties (within ``TIE_TOL`` on the x100 scale) go to
the first setting in suite order (the order :func:`kdbench.spec.expand_grid` writes).
Test scores are never read to choose. The leaderboard and the paired comparisons then
read that setting's runs under one row, "<entry> (selected on validation from N
settings)"; the sensitivity, sweep and cost sections, and the table of every setting
searched, keep the whole sweep. A run that also belongs to an entry without
``grid_selection`` keeps its own row as well.

The chosen setting's test score carries no selection optimism only because the choice
never sees test; with one seed per setting the choice itself is noisy, which the runner-up
gap and the pooled seed std on validation let a reader judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kdbench.api import KDBenchError
from kdbench.report.aggregate import group_info, summ
from kdbench.report.frame import param_text
from kdbench.report.tables import cell, fmt_num
from kdbench.spec import entry_settings, selected_label
from kdbench.store import DONE

#: validation means closer than this (x100 scale) are a tie: the first setting in suite order wins
TIE_TOL = 1e-9
CHOSEN_COLS = ["entry", "row", "task", "student", "setting", "params", "settings", "searched", "val_mean", "val_std", "val_n",
               "test_mean", "test_std", "test_n", "runner_up", "gap", "seed_std"]
SETTING_COLS = ["entry", "task", "student", "setting", "params", "order", "rank", "selected", "val_mean", "val_std", "val_n",
                "test_mean", "test_std", "test_n"]


class SelectionError(KDBenchError):
    """Grid selection asked for where the runs recorded no validation split."""


@dataclass
class GridSelection:
    """``runs``: the runs frame the leaderboard and comparisons read (each selecting entry
    reduced to its chosen setting per task and student); ``chosen``: one row per entry,
    task and student; ``settings``: every setting searched, with its rank on validation."""

    runs: pd.DataFrame
    chosen: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CHOSEN_COLS))
    settings: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SETTING_COLS))


def swept_label(params: dict[str, Any], swept: list[str], method_name: str = "") -> str:
    """A setting as the values of the swept parameters (all of them when none varies); a
    null value reads as ``method_name`` declares (:func:`kdbench.report.frame.param_text`)."""
    keys = swept or sorted(params)
    return ", ".join(param_text(method_name, k, params.get(k)) for k in keys)


def members(df: pd.DataFrame, entry: Any, keys: list[str]) -> pd.Series:
    """Which runs of ``df`` a method entry produces: its method, a setting among ``keys``
    (JSON of the settings it sweeps), and one of its students when it names them."""
    mask = (df["method_name"] == entry.name) & df["params"].isin(keys)
    return mask & df["student"].isin(entry.students) if entry.students else mask


def _has_validation(runs: pd.DataFrame) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("validation"), dict) for m in runs["_metrics"])


def _candidates(g: pd.DataFrame, order: list[str]) -> list[dict[str, Any]]:
    """Per setting with finished runs, in suite order: validation and test over seeds."""
    done = g[g["status"] == DONE]
    out = []
    for pos, key in enumerate(order):
        runs = done[done["params"] == key]
        if runs.empty:
            continue
        metric, info = runs["metric"].iloc[0], group_info(runs)
        val, test = summ(runs["validation"].dropna(), metric, info), summ(runs["test"].dropna(), metric, info)
        out.append({"params": key, "order": pos, "val_mean": val.mean, "val_std": val.std, "val_n": val.n,
                    "test_mean": test.mean, "test_std": test.std, "test_n": test.n, "higher_is_better": info.higher_is_better})
    return out


def rank_on_validation(cands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidates with a validation score, best first; a later setting passes an
    earlier one only when its mean is better (higher; lower for a lower-is-better metric,
    ``higher_is_better`` False on the candidates) by more than ``TIE_TOL``."""
    ranked: list[dict[str, Any]] = []
    for c in sorted((c for c in cands if c["val_n"] > 0), key=lambda c: c["order"]):
        sign = -1.0 if c.get("higher_is_better", True) is False else 1.0
        at = next((i for i, r in enumerate(ranked) if sign * c["val_mean"] > sign * r["val_mean"] + TIE_TOL), len(ranked))
        ranked.insert(at, c)
    return ranked


def pooled_std(cands: list[dict[str, Any]]) -> float:
    """The within-setting seed std on validation, pooled over settings with >= 2 seeds."""
    dof = sum(c["val_n"] - 1 for c in cands if c["val_n"] >= 2)
    if dof == 0:
        return np.nan
    return float(np.sqrt(sum((c["val_n"] - 1) * c["val_std"] ** 2 for c in cands if c["val_n"] >= 2) / dof))


def _select_one(names: tuple[str, str], task: str, student: str, g: pd.DataFrame, order: list[str], swept: list[str],
                n_settings: int) -> tuple[dict[str, Any], list[dict[str, Any]], str | None]:
    """(the chosen row, a row per setting searched, the chosen params key or None)."""
    cands = _candidates(g, order)
    ranked = rank_on_validation(cands)
    rank = {c["params"]: i + 1 for i, c in enumerate(ranked)}
    method_name = str(g["method_name"].iloc[0]) if not g.empty else ""
    label = {c["params"]: swept_label(json.loads(c["params"]), swept, method_name) for c in cands}
    rows = [{"entry": names[0], "task": task, "student": student, "setting": label[c["params"]], "rank": rank.get(c["params"], np.nan),
             "selected": rank.get(c["params"]) == 1, **c} for c in cands]
    best, second = (ranked + [None, None])[:2]
    chosen = {"entry": names[0], "row": names[1], "task": task, "student": student, "settings": n_settings, "searched": len(ranked),
              "seed_std": pooled_std(cands), "setting": "-", "params": None, "runner_up": "-", "gap": np.nan}
    chosen |= {k: (best or {}).get(k, np.nan) for k in ("val_mean", "val_std", "val_n", "test_mean", "test_std", "test_n")}
    if best is not None:
        chosen |= {"setting": label[best["params"]], "params": best["params"]}
    if second is not None:
        chosen |= {"runner_up": label[second["params"]], "gap": (best["val_mean"] - second["val_mean"]) * (-1.0 if best.get("higher_is_better", True) is False else 1.0)}
    return chosen, rows, best["params"] if best else None


def _select_entry(df: pd.DataFrame, index: int, entry: Any, settings: list[dict[str, Any]], members: pd.Series,
                  ) -> tuple[list[dict], list[dict], list[pd.DataFrame]]:
    order = [json.dumps(s, sort_keys=True) for s in settings]
    swept = sorted(k for k in set().union(*settings) if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1)
    runs = df[members]
    n_settings = int(runs["params"].nunique())
    name = f"{selected_label(entry)} (selected on validation from {n_settings} settings)"
    chosen, rows, picked = [], [], []
    for (task, student), g in runs.groupby(["task", "student"], sort=True):
        if (g["status"] == DONE).any() and not _has_validation(g[g["status"] == DONE]):
            raise SelectionError(f"methods[{index}].grid_selection: validation, but the finished runs of '{entry.name}' on "
                                 f"task '{task}' recorded no validation split: there is nothing to choose on (never test)")
        row, setting_rows, key = _select_one((selected_label(entry), name), task, student, g, order, swept, n_settings)
        chosen.append(row)
        rows += setting_rows
        if key is not None:
            picked.append(g[g["params"] == key].assign(method=name))
    return chosen, rows, picked


def _any(masks: list[pd.Series], index: pd.Index) -> pd.Series:
    out = pd.Series(False, index=index)
    for m in masks:
        out |= m
    return out


def select_on_validation(df: pd.DataFrame, suite_spec: Any, registry: Any = None) -> GridSelection:
    """The grid selection of every method entry of ``suite_spec`` that asks for it (see
    the module docstring); the frame unchanged when none does."""
    methods = list(getattr(suite_spec, "methods", None) or [])
    if df.empty or not any(getattr(m, "grid_selection", None) for m in methods):
        return GridSelection(df)
    settings = [entry_settings(suite_spec, i, registry) for i in range(len(methods))]
    produced = [members(df, m, [json.dumps(s, sort_keys=True) for s in settings[i]]) for i, m in enumerate(methods)]
    selecting = [i for i, m in enumerate(methods) if m.grid_selection]
    chosen, rows, picked = [], [], []
    for i in selecting:
        c, r, p = _select_entry(df, i, methods[i], settings[i], produced[i])
        chosen, rows, picked = chosen + c, rows + r, picked + p
    grid_only = _any([produced[i] for i in selecting], df.index)
    elsewhere = _any([produced[i] for i in range(len(methods)) if i not in selecting], df.index)
    runs = pd.concat([df[~grid_only | elsewhere], *picked], ignore_index=True)
    return GridSelection(runs, pd.DataFrame.from_records(chosen, columns=CHOSEN_COLS),
                         pd.DataFrame.from_records(rows, columns=SETTING_COLS))


# ----------------------------------------------------------------- display


def _gap_text(r: Any) -> str:
    return "n/a (one setting)" if r.gap != r.gap else fmt_num(r.gap)


def chosen_display(chosen: pd.DataFrame) -> pd.DataFrame:
    """The "Selected on validation" table: one row per entry, task and student."""
    return pd.DataFrame.from_records([{
        "task": r.task, "student": r.student, "entry": r.entry, "chosen setting": r.setting,
        "validation": cell(r.val_mean, r.val_std, int(r.val_n) if r.val_n == r.val_n else 0),
        "test": cell(r.test_mean, r.test_std, int(r.test_n) if r.test_n == r.test_n else 0),
        "settings searched": f"{r.searched} of {r.settings}" if r.searched != r.settings else str(r.searched),
        "runner-up": r.runner_up, "gap to runner-up (validation)": _gap_text(r),
        "validation seed std (pooled)": "n/a (1 seed per setting)" if r.seed_std != r.seed_std else fmt_num(r.seed_std),
    } for r in chosen.itertuples()])


def settings_display(settings: pd.DataFrame) -> pd.DataFrame:
    """Every setting searched: validation and test, rank on validation, the chosen one marked."""
    return pd.DataFrame.from_records([{
        "task": r.task, "student": r.student, "entry": r.entry, "setting": r.setting,
        "validation": cell(r.val_mean, r.val_std, int(r.val_n)), "test": cell(r.test_mean, r.test_std, int(r.test_n)),
        "rank on validation": "-" if r.rank != r.rank else str(int(r.rank)), "selected": "yes" if r.selected else "",
    } for r in settings.itertuples()])


NOTE = ("For each task (and student), the setting with the best mean validation score over seeds is chosen (ties: the "
        "first in suite order); test scores are never read to choose, so the test column carries no selection optimism. "
        "The leaderboard and the comparisons use the chosen setting's runs in the row '... (selected on validation from N "
        "settings)'; the sweep, sensitivity and cost sections keep every setting. With one seed per setting (as the "
        "official PKD grid runs) the choice itself is noisy: a gap to the runner-up within the seed noise means another "
        "setting could as well have been chosen.")


def selection_sections(report: Any) -> list[tuple[str, pd.DataFrame | None, str]]:
    """The "Selected on validation" and "Every setting searched" sections (none when no
    entry of the suite asks for grid selection)."""
    sel = getattr(report, "selection", None)
    if sel is None or sel.chosen.empty:
        return []
    missing = [f"{r.task}/{r.student}" for r in sel.chosen.itertuples() if r.params is None]
    note = NOTE + (f" Nothing chosen (no setting has a validation score): {', '.join(missing)}." if missing else "")
    one_seed = " Every setting here has one seed." if (sel.settings["val_n"] <= 1).all() else ""
    return [("Selected on validation", chosen_display(sel.chosen), note + one_seed),
            ("Every setting searched (validation and test)", settings_display(sel.settings), "")]
