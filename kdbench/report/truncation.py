"""Which leaderboard rows learnt from a truncated teacher.

A method that reads its teacher from a cache of the teacher's top-k log-probabilities
(option :data:`kdbench.api.TEACHER_TOPK`, :func:`kdbench.generation.use_topk_teacher`)
trains against the teacher's distribution renormalised over its k most likely tokens, not
the teacher itself. The report reads that option from each run's stored parameters (what
the store holds; nothing is recomputed) and says so on every row it concerns: a
``teacher_topk`` column of the leaderboard ("top-16"; several values joined when a row's
runs differ), a "truncated teacher" column of the wide table, a flag in the statistics
table, a line in the legend and the summary's row names. Reports without such runs are
unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from kdbench.api import TEACHER_TOPK

TRUNCATED_COLUMN = "truncated teacher"


def truncated_teachers(df: pd.DataFrame) -> dict[tuple[str, str, str], str]:
    """Per (task, method label, student) of the runs frame ``df`` whose runs stored a
    ``teacher_topk`` parameter: "top-k" (the distinct k of its runs, ascending, joined
    by "/")."""
    found: dict[tuple[str, str, str], set[int]] = {}
    if df.empty:
        return {}
    for task, method, student, params in zip(df["task"], df["method"], df["student"], df["params"]):
        k = json.loads(params).get(TEACHER_TOPK) if isinstance(params, str) else None
        if k is not None:
            found.setdefault((task, method, student), set()).add(int(k))
    return {key: "top-" + "/".join(str(k) for k in sorted(ks)) for key, ks in found.items()}


def with_truncation(board: pd.DataFrame, truncated: dict[tuple[str, str, str], str]) -> pd.DataFrame:
    """The leaderboard with a ``teacher_topk`` column ("top-k" on the rows, every split,
    whose runs read a truncated teacher, else ""), only when some row did."""
    if board.empty or not truncated:
        return board
    board = board.copy()
    board[TEACHER_TOPK] = [truncated.get(key, "") for key in zip(board["task"], board["method"], board["student"])]
    return board


def any_truncated(board: pd.DataFrame) -> bool:
    return TEACHER_TOPK in board and bool((board[TEACHER_TOPK].fillna("") != "").any())


def truncation_note() -> str:
    """What the marking means (legend line and the wide table's column)."""
    return (f"{TRUNCATED_COLUMN} top-k: the row's runs learnt from the teacher's top-k next-token log-probabilities, cached once and "
            "renormalised over those k tokens (0 elsewhere), not from its full distribution.")


def truncation_flag(value: Any) -> str:
    """The statistics table's flag for a row with ``teacher_topk`` ``value``."""
    return f"truncated teacher ({value}, renormalised)" if isinstance(value, str) and value else ""


def row_suffix(value: Any) -> str:
    """What the summary appends to a row's name."""
    return f" [truncated teacher: {value}]" if isinstance(value, str) and value else ""
