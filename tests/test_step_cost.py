"""benchmarks/step_cost.py runs end to end in its tiny mode and prints the JSON the
performance checks read; its step pairing puts the bare step between the runner's steps,
outside their recorded time. No timing is asserted: the figures are for idle machines."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kdbench.train.loop as loop_module
import kdbench.train.runner as runner_module
from kdbench.train import CostMeter
from kdbench.train.loop import train_loop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def step_cost(monkeypatch):
    spec = importlib.util.spec_from_file_location("step_cost", ROOT / "benchmarks" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "step_cost", module)  # it registers itself as a plugin
    spec.loader.exec_module(module)
    return module


def test_step_cost_tiny_json_has_the_ratios_and_the_noise_check(capsys, step_cost):
    module = step_cost
    assert module.main(["--tiny", "--json", "--core", "--steps", "2", "--no-warmup"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rounds"] >= 3
    for name in ("metadistil_over_kd", "metadistil_over_bare", "framework_overhead", "shared_teacher_kd_over_kd", "metadistil_peak_mem_over_kd"):
        assert isinstance(out["ratios"][name], float)
    for name in ("metadistil_over_kd", "metadistil_over_bare", "shared_teacher_kd_over_kd", "kd_over_bare"):
        s = out["spread"][name]
        assert s["min"] <= s["median"] <= s["max"]
    assert set(out["seconds"]) == {"bare", "kd", "kd_shared_teacher", "metadistil"}
    assert all(math.isfinite(v["peak_mem_increase_mb"]) for v in out["seconds"].values())  # bare's from its unpaired run
    assert isinstance(out["noise"]["reliable"], bool) and out["noise"]["limit"] == 0.03
    # on a CPU every kdbench step was paired with a bare step: 2 steps x 3 rounds per variant
    assert out["paired"] is True and out["pairs"] == {"kd": 6, "kd_shared_teacher": 6, "metadistil": 6}
    assert runner_module.CostMeter is CostMeter  # the pairing is undone


def test_a_paired_step_runs_after_each_runner_step_outside_its_recorded_time(step_cost, monkeypatch):
    """Under paired_with the runner's meter (a CostMeter made through kdbench.train.runner)
    runs the partner's step after recording each step's time: with a clock that a step moves
    by 1 s and the partner's step by 100 s, the recorded times are 1 s each and the pairs
    are (1, 100), so neither side's time contains the other's."""
    clock = [0.0]
    monkeypatch.setattr(loop_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    class Partner:
        def step(self) -> float:
            clock[0] += 100.0
            return 100.0

    def step_fn(batch, step):
        clock[0] += 1.0
        return {"loss": torch.tensor(0.5)}

    pairs: list[tuple[float, float]] = []
    with step_cost.paired_with(Partner(), pairs):
        meter = runner_module.CostMeter(torch.device("cpu"))
        train_loop(model=torch.nn.Linear(1, 1), step_fn=step_fn, batches=iter(range(10)), steps=3,
                   budget=SimpleNamespace(eval_every=None, log_every=1), evaluate_fn=lambda step, last: {}, meter=meter)
    assert runner_module.CostMeter is CostMeter
    assert meter.step_times == [1.0, 1.0, 1.0] and pairs == [(1.0, 100.0)] * 3


def test_paired_figures_leave_out_a_runs_first_steps_and_take_the_median_of_per_step_ratios(step_cost):
    # 7 pairs: the first two (warm-up) are left out; per-step ratios of the rest 2, 1.5, 3, 2, 1
    pairs = [(9.0, 1.0), (9.0, 1.0), (2.0, 1.0), (3.0, 2.0), (3.0, 1.0), (4.0, 2.0), (2.0, 2.0)]
    got = step_cost._paired_figures(pairs)
    assert got == {"step_s_median": 3.0, "bare_s_median": 2.0, "over_bare": 2.0, "pairs": 5}
    # too few pairs to leave any out: all count
    assert step_cost._paired_figures([(2.0, 1.0), (6.0, 2.0)]) == {"step_s_median": 4.0, "bare_s_median": 1.5, "over_bare": 2.5, "pairs": 2}
