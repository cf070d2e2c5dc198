"""Attention transfer: the loss against explicit loops, a training step, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from support.vision_test_models import FakeTransformer, LogitsOnly, TinyCNN, fixed_batch, hand_ce, hand_kd, make_ctx

from kdbench.api import Batch, IncompatibleModelError, ModelOutput, Problem
from kdbench.registry import Registry, make_plugin_manager
from kdbench_plugins.methods.at import ATParams, AttentionTransfer

PROBLEM = Problem("classification", 5)


def hand_attention(f: torch.Tensor) -> list[list[float]]:
    """a[b] = v / ||v||, v[hw] = (1/C) sum_c f[b, c, hw]^2, by explicit loops."""
    b_n, c_n, h_n, w_n = f.shape
    out = []
    for b in range(b_n):
        v = [sum(f[b, c, i, j].item() ** 2 for c in range(c_n)) / c_n for i in range(h_n) for j in range(w_n)]
        norm = math.sqrt(sum(x * x for x in v))
        out.append([x / norm for x in v])
    return out


def hand_pool2(f: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling by explicit sums (adaptive pooling to half the size)."""
    b_n, c_n, h_n, w_n = f.shape
    out = torch.zeros(b_n, c_n, h_n // 2, w_n // 2, dtype=f.dtype)
    for i in range(h_n // 2):
        for j in range(w_n // 2):
            out[:, :, i, j] = (f[:, :, 2 * i, 2 * j] + f[:, :, 2 * i + 1, 2 * j] + f[:, :, 2 * i, 2 * j + 1] + f[:, :, 2 * i + 1, 2 * j + 1]) / 4
    return out


def hand_layer(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    a_s, a_t = hand_attention(f_s), hand_attention(f_t)
    diffs = [(x - y) ** 2 for row_s, row_t in zip(a_s, a_t) for x, y in zip(row_s, row_t)]
    return sum(diffs) / len(diffs)


def test_loss_matches_explicit_loops():
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    feats_s = (r(2, 2, 4, 4), r(2, 3, 4, 4).relu(), r(2, 2, 4, 4).relu())  # stage 2: student larger, pooled
    feats_t = (r(2, 5, 4, 4), r(2, 4, 4, 4).relu(), r(2, 6, 2, 2).relu())
    s_logits, t_logits = r(2, 5), r(2, 5)
    labels = torch.tensor([4, 2])
    method = AttentionTransfer(ATParams(gamma=0.5, alpha=0.3, beta=7.0, temperature=3.0), PROBLEM)
    total, parts = method.loss(ModelOutput(s_logits, features=feats_s), ModelOutput(t_logits, features=feats_t), as_batch(labels), make_ctx(TinyCNN(), TinyCNN()))

    at = hand_layer(feats_s[1], feats_t[1]) + hand_layer(hand_pool2(feats_s[2]), feats_t[2])  # the stem (index 0) is skipped
    ce, kd = hand_ce(s_logits, labels).item(), hand_kd(s_logits, t_logits, 3.0).item()
    assert parts["at"].item() == pytest.approx(at, rel=1e-5)
    assert total.item() == pytest.approx(0.5 * ce + 0.3 * kd + 7.0 * at, rel=1e-5)

    # the teacher map is pooled when it is the larger one (roles swapped: same value)
    swapped, _ = method.loss(ModelOutput(s_logits, features=feats_t), ModelOutput(t_logits, features=feats_s), as_batch(labels), make_ctx(TinyCNN(), TinyCNN()))
    assert (swapped.item() - 0.5 * ce - 0.3 * kd) == pytest.approx(7.0 * at, rel=1e-4)


def test_attention_maps_are_scale_free_and_zero_for_identical_maps():
    f = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    method = AttentionTransfer(ATParams(gamma=0.0, alpha=0.0, beta=1.0), PROBLEM)
    logits = torch.zeros(2, 5, dtype=torch.float64)
    stem = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    ctx = make_ctx(TinyCNN(), TinyCNN())
    same, _ = method.loss(ModelOutput(logits, features=(stem, f)), ModelOutput(logits, features=(stem, 3 * f)), as_batch(torch.tensor([0, 1])), ctx)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    g = f.clone()
    g[0, :, 0, 0] += 1.0
    diff, _ = method.loss(ModelOutput(logits, features=(stem, f)), ModelOutput(logits, features=(stem, g)), as_batch(torch.tensor([0, 1])), ctx)
    assert diff.item() == pytest.approx(hand_layer(f, g), rel=1e-5) and diff.item() > 1e-4


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    student, teacher = TinyCNN(4, (4, 8, 8)), TinyCNN(6, (8, 12, 16)).eval()
    batch = fixed_batch()
    method = AttentionTransfer(ATParams(alpha=0.5), PROBLEM)
    method.check_models(student, teacher)
    assert method.extra_modules(student, teacher, None) is None  # type: ignore[arg-type]
    ctx = make_ctx(student, teacher, lr=0.02)
    parts = [method.train_step(ctx, batch) for _ in range(8)]
    assert parts[-1]["loss"].item() < 0.7 * parts[0]["loss"].item()
    assert parts[-1]["at"].item() < parts[0]["at"].item()


def test_refuses_models_without_features_not_cnn_or_unpaired():
    method = AttentionTransfer(ATParams(), PROBLEM)
    with pytest.raises(IncompatibleModelError, match=r"student to expose \['features'\]"):
        method.check_models(LogitsOnly(), TinyCNN())
    with pytest.raises(IncompatibleModelError, match="needs convolutional feature maps.*teacher model \\(FakeTransformer\\).*'transformer'"):
        method.check_models(TinyCNN(), FakeTransformer())
    with pytest.raises(IncompatibleModelError, match="student .* has 3 feature maps and the teacher .* 4"):
        method.check_models(TinyCNN(4, (4, 8)), TinyCNN(4, (4, 8, 8)))


def test_registered_through_the_hook():
    pm, broken = make_plugin_manager(extra_plugins=["kdbench_plugins.methods.at"])
    assert Registry(pm, broken).method("at") is AttentionTransfer
    assert ATParams() == ATParams(gamma=1.0, alpha=0.0, beta=1000.0, temperature=4.0, p=2.0)


def as_batch(labels: torch.Tensor) -> Batch:
    """The batch a loss receives, reduced to what these losses read: labels (and indices)."""
    return Batch(inputs={}, labels=labels, index=torch.arange(labels.shape[0]))
