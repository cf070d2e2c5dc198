"""benchmarks/step_cost.py runs end to end in its tiny mode and prints the JSON the
performance checks read. No timing is asserted: the figures are for idle machines."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_cost_tiny_json_has_the_ratios_and_the_noise_check(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("step_cost", ROOT / "benchmarks" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "step_cost", module)  # it registers itself as a plugin
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--json", "--core", "--steps", "2", "--no-warmup"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rounds"] >= 3
    for name in ("metadistil_over_kd", "metadistil_over_bare", "framework_overhead", "shared_teacher_kd_over_kd", "metadistil_peak_mem_over_kd"):
        assert isinstance(out["ratios"][name], float)
    for name in ("metadistil_over_kd", "metadistil_over_bare", "shared_teacher_kd_over_kd", "kd_over_bare"):
        s = out["spread"][name]
        assert s["min"] <= s["median"] <= s["max"]
    assert set(out["seconds"]) == {"bare", "kd", "kd_shared_teacher", "metadistil"}
    assert isinstance(out["noise"]["reliable"], bool) and out["noise"]["limit"] == 0.03
