"""The GPU path where a GPU is present (skipped otherwise; CI has none): MetaDistil's exact
meta-gradient with the pilot forward's dropout masks replayed from the CUDA generator, and a
run trained twice on the GPU giving the same history. Run on a GPU machine with
``python -m pytest tests/test_gpu.py``; the CPU tests cover the same code on the CPU."""

from __future__ import annotations

import pytest
import torch

from kdbench.executors.phases import open_store
from kdbench.spec import build_suite
from kdbench.train import Runner
from kdbench.train.teachers import provide_teacher
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from support.helpers_models import CLASSIFICATION, make_ctx, text_batch
from support.suites import smoke_data
from test_metadistil import flat, ref_meta_gradient, registry  # noqa: F401 (registry: the module fixture)
from test_metadistil_jvp import dropout_bert

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def on(batch, device):
    return type(batch)(inputs={k: v.to(device) for k, v in batch.inputs.items()}, labels=batch.labels.to(device), index=batch.index)


def meta_gradient_against_reference(device: torch.device) -> None:
    """float64 tiny BERTs with dropout 0.2: the method's meta-gradient on ``device`` against
    the unrolled reference drawing the same masks; other masks give another gradient."""
    student, teacher = dropout_bert(1, 1).to(device).train(), dropout_bert(2, 2).to(device).eval().requires_grad_(True)
    batch, quiz = on(text_batch(seed=3), device), on(text_batch(seed=4), device)
    params = {"virtual_lr": 0.5, "teacher_lr": 0.1, "teacher_optimizer": "sgd", "teacher_momentum": 0.0, "teacher_grad_clip": None,
              "alpha": 0.5, "temperature": 2.0}
    method = MetaDistil(MetaDistilParams(**params), CLASSIFICATION)
    ctx = make_ctx(student, teacher, torch.optim.AdamW(student.parameters(), lr=1e-2), quiz=quiz, device=device)
    method.setup(ctx)
    torch.manual_seed(123)  # seeds the CUDA generators too: the student's train-mode forward is the first draw in both
    ref = flat(ref_meta_gradient(student, teacher, batch, quiz, 0.5))
    torch.manual_seed(124)
    other = flat(ref_meta_gradient(student, teacher, batch, quiz, 0.5))
    torch.manual_seed(123)
    grads, _, _ = method.meta_gradient(ctx, batch)
    assert ref.device.type == device.type and ref.abs().max() > 1e-4
    torch.testing.assert_close(flat(grads), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert not torch.allclose(ref, other, rtol=1e-3)  # the replay matters
    assert "jvp_fallback" not in ctx.state  # forward mode ran on this device


def same_history_twice(tmp_path, device: str) -> None:
    """KD and MetaDistil on the smoke suite's tiny BERTs, each trained twice on ``device``
    (bf16 autocast and TF32 on a GPU): the same history, evaluation for evaluation."""
    suite = build_suite(smoke_data(methods=[{"name": "kd"}, {"name": "metadistil", "params": {"quiz_batches": 1}}], seeds=[0],
                                   budget={"steps": 12, "batch_size": 16, "eval_every": 6, "log_every": 3}))
    runner = Runner(tmp_path, device=device, progress=False)
    teacher = provide_teacher(suite.runs[0], tmp_path, open_store(tmp_path), runner.registry, runner.device)
    for spec in suite.runs:
        first, again = runner.run(spec, teacher), runner.run(spec, teacher)
        assert first.status == again.status == "done", first.error
        assert first.env["device"] == device
        assert first.history == again.history and first.metrics == again.metrics


def test_metadistil_meta_gradient_on_the_gpu_is_exact_with_dropout_replayed() -> None:
    meta_gradient_against_reference(torch.device("cuda"))


def test_a_run_trained_twice_on_the_gpu_gives_the_same_history(tmp_path) -> None:
    same_history_twice(tmp_path, "cuda")
