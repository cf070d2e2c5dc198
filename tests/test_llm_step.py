"""benchmarks/llm_step.py --tiny: the structure of its figures (no timing is asserted): every
method's step split into generation and update, generation only where a method samples
inside its step, and the KV-cache comparison."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llm_step  # noqa: E402


def test_tiny_run_reports_generation_apart_from_update(tmp_path):
    out = tmp_path / "llm_step.json"
    assert llm_step.main(["--tiny", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["methods"]) == set(llm_step.METHODS)
    for name, fig in figures["methods"].items():
        step, gen, update = (fig[k]["median"] for k in ("step_s", "generation_s", "update_s"))
        assert step > 0 and update > 0 and step == pytest.approx(gen + update)
        assert (gen > 0) == (name in ("gkd", "rkl")), name  # on-policy methods decode inside the step; seqkd did it once, before
    kv = figures["kv_cache"]
    assert kv["ratio"]["median"] == pytest.approx(kv["no_cache_s_per_token"]["median"] / kv["cache_s_per_token"]["median"])
    assert kv["cpu_ratio"]["median"] == pytest.approx(kv["no_cache_cpu_s_per_token"]["median"] / kv["cache_cpu_s_per_token"]["median"])
    assert figures["setup"]["tiny"] is True and figures["setup"]["gen_length"] == 8 and figures["setup"]["gen_width"] == 16
    prompt = figures["by_length"]["1"]["length"] - 1  # per new-token index: one cached step and one full forward
    assert {n: f["length"] for n, f in figures["by_length"].items()} == {"1": prompt + 1, "7": prompt + 7}


def test_kv_only_with_a_wider_student(tmp_path):
    """--kv-only --gen-width: no method steps, the KV figures from a student of that width."""
    out = tmp_path / "kv.json"
    assert llm_step.main(["--tiny", "--kv-only", "--gen-width", "32", "--threads", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert "methods" not in figures and figures["setup"]["gen_width"] == 32 and figures["setup"]["threads"] == 1
    assert figures["kv_cache"]["cache_s_per_token"]["median"] > 0
    with pytest.raises(SystemExit, match="multiple of 8"):
        llm_step.with_width(llm_step.TINY, 30)
    assert llm_step.with_width(llm_step.TINY, 32)["student"] == {**llm_step.TINY["student"], "hidden": 32, "intermediate": 96, "heads": 4}


def test_trl_comparison_checks_equal_losses_before_timing():
    """--trl at tiny size: kdbench's gkd loss and TRL's GKDTrainer.compute_loss agree on the
    same student samples (the run refuses to time otherwise); both steps are reported,
    the ratio is kdbench over TRL. No timing is asserted."""
    pytest.importorskip("trl.experimental.gkd", reason="trl is not installed (pip install 'kdbench[peers]')")
    out = llm_step.trl_comparison(llm_step.TINY, rounds=1, steps=1, new_tokens=4)
    equal = out["equal_loss"]
    assert equal["kdbench"] > 0 and equal["rel_diff"] <= 1e-5
    fig = out["figures"]
    assert fig["ratio"]["median"] == pytest.approx(fig["kdbench_step_s"]["median"] / fig["trl_step_s"]["median"])
    assert fig["cpu_ratio"]["median"] == pytest.approx(fig["kdbench_cpu_s"]["median"] / fig["trl_cpu_s"]["median"])
    assert 0 < fig["kdbench_generation_s"]["median"] < fig["kdbench_step_s"]["median"]
    assert 0 < fig["trl_generation_s"]["median"] < fig["trl_step_s"]["median"]  # TRL sampled inside its step (lambda 1)
    assert out["setup"]["lmbda"] == 1.0 and out["setup"]["versions"]["trl"]
