"""The generation objective against a teacher: the teacher-student token KL of a student's
evaluation (by hand, and absent without a comparable teacher), a live teacher's streamed
drift per reference token (by hand), and MetaDistil around token-kd through the runner."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbench.api import Problem
from kdbench.executors.phases import open_store
from kdbench_plugins.models.causal_lm import CausalLMFactory, CausalLMOptions
from kdbench_plugins.objectives.generation import Generation, GenerationEvaluator

ROOT = Path(__file__).resolve().parents[1]
FACTORY = CausalLMFactory()
DATA = {"prompt": ["12+34=", "5+6=", "70+8=", "9+99="], "reference": ["46", "11", "78", "108"]}


def lm(layers: int, seed: int, tokenizer: str | None = None):
    torch.manual_seed(seed)
    opts = CausalLMOptions(tiny={"family": "llama", "layers": layers, "hidden": 16, "heads": 2, "intermediate": 32, "context": 32})
    return FACTORY.build(opts, Problem("generation", 1)).double().eval(), opts


def evaluator(student, teacher=None) -> GenerationEvaluator:
    ev = GenerationEvaluator(max_new_tokens=3)
    ev.model, ev.teacher = student, teacher
    return ev


def test_teacher_kl_by_hand_over_reference_tokens():
    student, opts = lm(1, seed=1)
    teacher, _ = lm(2, seed=2)
    inputs = FACTORY.collate(FACTORY.encode(opts, DATA, 24), torch.arange(4))
    from kdbench.api import Batch

    batch = Batch(inputs, torch.arange(4), torch.arange(4))
    ev = evaluator(student, teacher)
    with torch.no_grad():
        out = student(inputs)
        ev.update(out, batch)
        ls, lt = torch.log_softmax(out.logits, -1), torch.log_softmax(teacher(inputs).logits, -1)
    mask = inputs["response_mask"]
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if mask[b, i]:
                total += sum(math.exp(float(lt[b, i, v])) * float(lt[b, i, v] - ls[b, i, v]) for v in range(lt.shape[-1]))
                count += 1
    assert count < mask.numel()  # some positions are padding and must not count
    got = ev.finish()
    assert got["teacher_kl"] == pytest.approx(total / count, rel=1e-10)
    assert got["teacher_kl"] > 0
    objective = Generation(problem=Problem("generation", 1))
    info = objective.default_metric_info("teacher_kl")
    assert info.higher_is_better is False and info.scale == 1.0

    # the student against itself: 0; without a teacher, or one of another vocabulary: no such metric
    ev_self = evaluator(student, student)
    with torch.no_grad():
        ev_self.update(out, batch)
    assert ev_self.finish()["teacher_kl"] == pytest.approx(0.0, abs=1e-12)
    ev_none = evaluator(student)
    with torch.no_grad():
        ev_none.update(out, batch)
    assert "teacher_kl" not in ev_none.finish()

    class OtherVocabulary(torch.nn.Module):
        def forward(self, inputs, need=frozenset()):
            return type(out)(logits=torch.zeros(*out.logits.shape[:-1], out.logits.shape[-1] + 1, dtype=out.logits.dtype))

    ev_other = evaluator(student, OtherVocabulary())
    with torch.no_grad():
        ev_other.update(out, batch)
    assert "teacher_kl" not in ev_other.finish()


def test_batch_divergence_is_kl_from_the_start_per_reference_token():
    start, opts = lm(1, seed=1)
    now, _ = lm(1, seed=3)
    inputs = FACTORY.collate(FACTORY.encode(opts, DATA, 24), torch.arange(4))
    with torch.no_grad():
        a, b = start(inputs), now(inputs)
    total, weight, kind = Generation(problem=Problem("generation", 1)).batch_divergence(a, b)
    lp, lq = torch.log_softmax(a.logits, -1), torch.log_softmax(b.logits, -1)
    mask = inputs["response_mask"].bool()
    want = sum(float((lp[i, j].exp() * (lp[i, j] - lq[i, j])).sum()) for i in range(4) for j in range(mask.shape[1]) if mask[i, j])
    assert kind == "token_kl" and weight == int(mask.sum())
    assert total == pytest.approx(want, rel=1e-10)


SUITE = """
name: llm-metadistil
tasks:
  - name: algorithmic
    options: {kind: addition, train_size: 160, eval_size: 16, digits: [1, 2], long_digits: [3, 3]}
teacher:
  model: causal-lm
  options: {tiny: {family: llama, layers: 2, hidden: 32, heads: 4, intermediate: 64, context: 48}}
  train:
    budget: {steps: 20, batch_size: 32, eval_every: 20}
    optimizer: {name: adamw, lr: 0.003}
students:
  - model: causal-lm
    options: {tiny: {family: llama, layers: 1, hidden: 16, heads: 2, intermediate: 32, context: 48}}
methods:
  - name: sft
  - name: token-kd
  - name: metadistil
    params: {inner: token-kd, teacher_lr: 0.001, virtual_lr: 0.01}
seeds: [0]
budget: {steps: 4, batch_size: 16, eval_every: 4}
optimizer: {name: adamw, lr: 0.003}
quiz_fraction: 0.2
baseline: sft
"""


def test_metadistil_around_token_kd_runs_and_students_report_teacher_kl(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(suite), "--results", str(results)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["method"]: r for r in open_store(results).runs()}
    assert {m: r["status"] for m, r in rows.items()} == {"sft": "done", "token-kd": "done", "metadistil": "done"}
    for name in ("token-kd", "metadistil"):
        m = rows[name]["metrics"]
        assert all(m[split]["teacher_kl"] > 0 for split in ("validation", "test", "test_long"))
        assert m["metric_info"]["teacher_kl"]["higher_is_better"] is False
    assert "teacher_kl" not in rows["sft"]["metrics"]["test"]  # sft loads no teacher
    live = rows["metadistil"]["metrics"]["live_teacher"]
    assert live["divergence_kind"] == "token_kl" and live["divergence"] > 0  # the teacher moved, measured per reference token
    assert set(live["validation"]) >= {"exact_match", "nll"} and set(live["start_validation"]) >= {"exact_match", "nll"}
