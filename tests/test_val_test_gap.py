"""benchmarks/val_test_gap.py against a store whose histories are known exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from test_teacher_drift import drift_store  # noqa: E402  (none, kd, metadistil x 3 seeds; known val/test offsets)

ROOT = Path(__file__).resolve().parents[1]


def module():
    spec = importlib.util.spec_from_file_location("val_test_gap", ROOT / "benchmarks" / "val_test_gap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gaps_and_paired_differences_are_the_stored_offsets(tmp_path):
    drift_store(tmp_path / "store.sqlite", {"metadistil": (0.02, -0.01), "kd": (0.005, 0.005)})
    lines = module().table(tmp_path, "kd")
    header = next(line for line in lines if line.startswith("| step"))
    assert header.split(" | ")[1:4] == ["kd val / test (gap)", "metadistil val / test (gap)", "none val / test (gap)"]
    rows = [line for line in lines if line.startswith("| 10 ") or line.startswith("| 20 ")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # base 70 + seed (0, 1, 2): mean 71; kd +0.5 on both splits; metadistil +2 val, -1 test
        assert cells[1] == "71.50 / 71.50 (+0.00, n=3)"
        assert cells[2] == "73.00 / 70.00 (+3.00, n=3)"
        assert cells[3] == "71.00 / 71.00 (+0.00, n=3)"
        assert cells[4] == "+1.50 (+1.5, +1.5, +1.5); -1.50 (-1.5, -1.5, -1.5)"
        assert cells[5] == "-0.50 (-0.5, -0.5, -0.5); -0.50 (-0.5, -0.5, -0.5)"


def test_a_missing_baseline_or_store_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="holds no results store"):
        module().table(tmp_path, "kd")
    drift_store(tmp_path / "store.sqlite", {})
    with pytest.raises(SystemExit, match="no finished 'dkd' runs"):
        module().table(tmp_path, "dkd")
