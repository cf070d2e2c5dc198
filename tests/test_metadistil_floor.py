"""benchmarks/metadistil_floor.py --tiny --json: its structure and its arithmetic (the floor
is the bare step plus the parts, over the bare step); nothing here times anything."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_tiny_json_has_every_part_and_a_floor_made_of_them(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))  # it imports step_cost, as when run from benchmarks/
    spec = importlib.util.spec_from_file_location("metadistil_floor", BENCH / "metadistil_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()  # main() sets the process's thread count: give it back
    assert module.main(["--tiny", "--json", "--rounds", "1", "--reps", "1", "--threads", str(threads)]) == 0
    assert torch.get_num_threads() == threads
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    parts = out["parts_s"]
    assert set(parts) == {"bare KD step", "teacher forward with graph", "teacher backward", "teacher AdamW (fused)",
                          "student forward (eval)", "student backward", "quiz forward + backward"}
    assert all(v > 0 for v in parts.values())
    # one round: the floor is that round's (bare + parts, J g as two eval forwards) / bare
    extra = sum(v for k, v in parts.items() if k != "bare KD step") + parts["student forward (eval)"]
    assert out["floor_over_bare"]["median"] == pytest.approx((parts["bare KD step"] + extra) / parts["bare KD step"], rel=1e-9)
