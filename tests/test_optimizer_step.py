"""benchmarks/optimizer_step.py --tiny --json: its structure (a benchmark prints ratios;
nothing here times anything). Run in this process: the script's imports are the tests'."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_step.py"


def test_tiny_json_has_both_variants_and_the_ratio(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("optimizer_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()  # main() sets the process's thread count: give it back
    monkeypatch.setattr(sys, "argv", ["optimizer_step.py", "--tiny", "--json", "--rounds", "2", "--steps", "2", "--threads", str(threads)])
    module.main()
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["ms_per_step"]) == {"default", "fused"} and result["rounds"] == 2 and result["parameters"] > 0
    ratio, spread = result["ratios"]["fused_over_default"], result["spread"]["fused_over_default"]
    assert spread["min"] <= ratio <= spread["max"]
    for v in result["ms_per_step"].values():
        assert 0 < v["min"] <= v["median"] <= v["max"]
    assert out.count("round ") == 2
