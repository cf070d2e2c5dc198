"""kdbench.losses against hand computations and the official codes' reductions; plugin
options refuse infinite values through a suite file; a rehearsed loss leaves no trace."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.api import Problem, SetupInfo
from kdbench.losses import probability_mse, soft_cross_entropy, soft_loss, softened_kl
from kdbench.teacher_updates import teacher_lr_factor
from kdbench.spec import SuiteError, build_suite
from support.helpers_models import LinearNet, image_batch, make_ctx

S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
T = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)


def probs(x: torch.Tensor, temp: float) -> list[list[float]]:
    return [[math.exp(v / temp) / sum(math.exp(w / temp) for w in row) for v in row] for row in x.tolist()]


def test_softened_kl_batchmean_and_the_official_mean() -> None:
    ps, pt = probs(S, 2.0), probs(T, 2.0)
    kl = sum(b * math.log(b / a) for rs, rt in zip(ps, pt) for a, b in zip(rs, rt))
    assert softened_kl(S, T, 2.0).item() == pytest.approx(kl / 2 * 4)
    assert softened_kl(S, T, 2.0, "mean").item() == pytest.approx(kl / 6 * 4)  # / (batch x classes)


def test_probability_mse_and_soft_cross_entropy_by_hand() -> None:
    ps, pt = probs(S, 3.0), probs(T, 3.0)
    assert probability_mse(S, T, 3.0).item() == pytest.approx(sum((a - b) ** 2 for rs, rt in zip(ps, pt) for a, b in zip(rs, rt)) / 6 * 9)
    ce = -sum(b * math.log(a) for rs, rt in zip(ps, pt) for a, b in zip(rs, rt))
    assert soft_cross_entropy(S, T, 3.0).item() == pytest.approx(ce / 6)
    assert soft_cross_entropy(S, T, 3.0, "sum").item() == pytest.approx(ce / 2)


def test_soft_loss_picks_the_term_and_uses_mse_for_regression() -> None:
    cls = Problem("classification", 3)
    assert soft_loss(S, T, 2.0, cls).item() == pytest.approx(softened_kl(S, T, 2.0).item())
    assert soft_loss(S, T, 2.0, cls, kind="mse").item() == pytest.approx(probability_mse(S, T, 2.0).item())
    reg = soft_loss(S[:, :1], T[:, :1], 2.0, Problem("regression", 1))
    assert reg.item() == pytest.approx(((1 - 2) ** 2 + (0 - 1) ** 2) / 2)


def test_half_precision_logits_are_computed_in_float32() -> None:
    assert softened_kl(S.half(), T.half(), 2.0).dtype == torch.float32
    assert probability_mse(S.bfloat16(), T.bfloat16(), 2.0).dtype == torch.float32


def test_teacher_lr_factor_before_and_after_the_start() -> None:
    student = LinearNet(2, 2)
    ctx = make_ctx(student, None, torch.optim.SGD(student.parameters(), lr=0.1), total_steps=10, step=0)
    assert [teacher_lr_factor(ctx, "constant", 0.0) for ctx.step in range(3)] == [0.0, 1.0, 1.0]  # step 0 is always plain
    assert [teacher_lr_factor(ctx, "constant", 0.3) for ctx.step in range(2, 5)] == [0.0, 1.0, 1.0]


def test_a_suite_with_an_infinite_plugin_option_is_refused() -> None:
    data = {"name": "x", "tasks": [{"name": "mnist5k"}], "teacher": {"model": "cnn"}, "students": [{"model": "cnn"}],
            "methods": [{"name": "kd", "params": {"temperature": float("inf")}}, {"name": "dkd", "params": {"beta": float("nan")}}],
            "seeds": [0], "budget": {"steps": 1}}
    with pytest.raises(SuiteError) as err:
        build_suite(data)
    text = "\n".join(err.value.problems)
    assert "methods[0].params.temperature" in text and "methods[1].params.beta" in text and "finite number" in text


def test_rehearsal_restores_streams_and_extra_buffers() -> None:
    from kdbench_plugins.methods.crd import CRD, CRDParams

    from support.helpers_models import tiny_cnn

    student, teacher = tiny_cnn((3,), seed=1), tiny_cnn((4,), seed=2)
    batch = image_batch(n=4)
    method = CRD(CRDParams(nce_k=2, feat_dim=4), Problem("classification", 2))
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1))
    ctx.extra = method.extra_modules(student, teacher, SetupInfo(sample=batch, train_size=6, device=torch.device("cpu"))).double()
    s_out, t_out = student(batch.inputs, need=method.student_needs), teacher(batch.inputs, need=method.teacher_needs)
    banks = {n: b.clone() for n, b in ctx.extra.named_buffers()}
    with ctx.rehearsal():
        first, _ = method.loss(s_out, t_out, batch, ctx)
    assert all(torch.equal(b, banks[n]) for n, b in ctx.extra.named_buffers())
    again, _ = method.loss(s_out, t_out, batch, ctx)  # same negatives, same banks
    assert again.item() == pytest.approx(first.item(), rel=1e-12)
    assert not all(torch.equal(b, banks[n]) for n, b in ctx.extra.named_buffers())  # outside a rehearsal the banks move
