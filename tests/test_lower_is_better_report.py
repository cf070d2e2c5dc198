"""The committed example report headed by a lower-is-better metric
(results/regression-mse-cpu: movie-rating ranked by MSE) against its own store: every mean
is the store's, the paired comparison with the baseline is recomputed here (exact sign-flip
test over the 8 seeds, Holm over the report's comparisons), ▲ marks exactly the rows whose
MSE is significantly *lower* than the baseline's and ▼ the significantly higher ones, the
best mark (bold, or ≈ when tied) sits on the lowest mean, and the title and column say the
metric is read lower-is-better, x1."""

from __future__ import annotations

import csv
import itertools
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from kdbench.spec import load_suite

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "results" / "regression-mse-cpu"
SUITE = ROOT / "benchmarks" / "regression-mse-cpu.yaml"
BASELINE = "none"


@pytest.fixture(scope="module")
def stored() -> dict[str, dict[int, float]]:
    """Per leaderboard row (method, or method(alpha=...)): seed -> test MSE, from the store."""
    suite = load_suite(SUITE)
    hashes = {r.hash: r for r in suite.runs}
    db = sqlite3.connect(f"file:{FOLDER / 'store.sqlite'}?mode=ro", uri=True)
    out: dict[str, dict[int, float]] = {}
    for h, status, metrics in db.execute("select hash, status, metrics from runs"):
        if h not in hashes:
            continue
        assert status == "done", h
        run = hashes[h]
        m = json.loads(metrics)
        assert m["main_metric"] == "mse" and m["metric_info"]["mse"]["higher_is_better"] is False
        row = run.method if run.method == "none" else f"kd(alpha={run.params['alpha']})"
        out.setdefault(row, {})[run.seed] = m["test"]["mse"]
    assert {k: len(v) for k, v in out.items()} == {"none": 8, "kd(alpha=0.5)": 8, "kd(alpha=1.0)": 8}
    return out


def sign_flip_p(diffs: np.ndarray) -> float:
    """The exact two-sided paired sign-flip test: the share of the 2^n sign assignments
    whose |mean| is at least the observed one."""
    observed = abs(diffs.mean())
    means = [abs((diffs * signs).mean()) for signs in itertools.product((1, -1), repeat=len(diffs))]
    return float(np.mean([m >= observed - 1e-12 for m in means]))


def holm(ps: dict[str, float]) -> dict[str, float]:
    order = sorted(ps, key=ps.get)
    out, running = {}, 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (len(ps) - i) * ps[k]))
        out[k] = running
    return out


@pytest.fixture(scope="module")
def expected(stored) -> dict[str, dict]:
    base = stored[BASELINE]
    rows = {row: {"mean": float(np.mean(list(v.values())))} for row, v in stored.items()}
    raw = {row: sign_flip_p(np.array([v[s] - base[s] for s in sorted(base)])) for row, v in stored.items() if row != BASELINE}
    for row, p in holm(raw).items():
        diff = rows[row]["mean"] - rows[BASELINE]["mean"]
        rows[row] |= {"diff": diff, "p_adj": p,
                      "result": ("win" if diff < 0 else "loss") if p < 0.05 else "n.s."}  # lower MSE is the win
    rows[BASELINE]["result"] = "baseline"
    return rows


def test_the_csv_holds_the_stores_means_and_the_direction_aware_verdicts(expected) -> None:
    with (FOLDER / "leaderboard.csv").open(encoding="utf-8") as fh:
        board = {r["method"]: r for r in csv.DictReader(fh) if r["split"] == "test"}  # rows named as the leaderboard names them
    for row, want in expected.items():
        got = board[row]
        assert got["metric"] == "mse" and float(got["mean"]) == pytest.approx(want["mean"], rel=1e-12)
        assert got["result"] == want["result"], row
        if row != BASELINE:
            assert float(got["diff"]) == pytest.approx(want["diff"], rel=1e-9)
            assert float(got["p_adj"]) == pytest.approx(want["p_adj"], rel=1e-9)


def _md_rows() -> tuple[str, str, dict[str, str]]:
    text = (FOLDER / "leaderboard.md").read_text(encoding="utf-8")
    title = text.splitlines()[0]
    table = text.split("## Leaderboard", 1)[1].strip().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = {}
    for line in table[2:]:
        if not line.startswith("|"):
            break
        parts = [c.strip() for c in line.strip("|").split("|")]
        cells[parts[0]] = parts[1]
    return title, header[1], cells


def test_the_markdown_marks_and_ranks_by_the_lower_is_better_reading(expected) -> None:
    title, column, cells = _md_rows()
    assert title.startswith("# regression-mse-cpu: test mse (x1, lower is better)")
    assert column == "movie-rating (mse, ↓ better)"
    for row, want in expected.items():
        cell = cells[row]
        assert cell.startswith(f"{want['mean']:.2f}".replace("**", "")) or cell.startswith(f"**{want['mean']:.2f}"), (row, cell)
        assert ("▲" in cell) == (want["result"] == "win") and ("▼" in cell) == (want["result"] == "loss"), (row, cell)
    best = min(expected, key=lambda r: expected[r]["mean"])
    assert cells[best].startswith("**") or "≈" in cells[best]  # the best is the lowest MSE
    worst = max(expected, key=lambda r: expected[r]["mean"])
    assert not cells[worst].startswith("**")


def test_the_chance_and_teacher_rows_stay_on_the_mse_scale() -> None:
    _, _, cells = _md_rows()
    chance, teacher = (float(re.match(r"\**([0-9.]+)", cells[k]).group(1)) for k in ("chance", "teacher"))
    assert 0 < chance < 16 and 0 < teacher < 64  # x1: ratings lie in -4..4, so no MSE of a sane prediction passes 64
