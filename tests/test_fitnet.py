"""FitNet: the hint loss against a hand computation, the regressor shapes, a training step, refusals."""

from __future__ import annotations

import pytest
import torch
from support.vision_test_models import FakeTransformer, LogitsOnly, TinyCNN, fixed_batch, hand_ce, hand_kd, make_ctx

from kdbench.api import Batch, IncompatibleModelError, ModelOutput, Problem, SetupInfo
from kdbench.registry import Registry, make_plugin_manager
from kdbench_plugins.methods.fitnet import FitNet, FitNetParams, HintRegressor

PROBLEM = Problem("classification", 5)


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "kind", "kernel"),
    [
        ((2, 3, 8, 8), (2, 5, 4, 4), torch.nn.Conv2d, (3, 3)),  # student twice the size: stride-2 conv
        ((2, 3, 4, 4), (2, 5, 8, 8), torch.nn.ConvTranspose2d, (4, 4)),  # half the size: transposed conv
        ((2, 3, 6, 6), (2, 5, 4, 4), torch.nn.Conv2d, (3, 3)),  # larger: valid conv 1 + 6 - 4
        ((2, 3, 4, 4), (2, 5, 4, 4), torch.nn.Conv2d, (1, 1)),  # equal: 1x1 conv
    ],
)
def test_regressor_maps_student_shape_to_teacher_shape(s_shape, t_shape, kind, kernel):
    reg = HintRegressor(s_shape, t_shape)
    assert type(reg.conv) is kind and tuple(reg.conv.kernel_size) == kernel
    assert tuple(reg(torch.randn(s_shape)).shape) == t_shape


def test_regressor_refuses_a_smaller_student_map_it_cannot_upsample():
    with pytest.raises(IncompatibleModelError, match="4x4 onto the teacher's 6x6"):
        HintRegressor((2, 3, 4, 4), (2, 5, 6, 6))


def test_loss_matches_hand_computation_with_a_fixed_regressor():
    torch.manual_seed(0)
    b, c_s, c_t, hw, h = 3, 2, 3, 2, 1
    f_s = torch.randn(b, c_s, hw, hw, dtype=torch.float64)
    f_t = torch.randn(b, c_t, hw, hw, dtype=torch.float64).relu()
    s_logits, t_logits = torch.randn(b, 5, dtype=torch.float64), torch.randn(b, 5, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1])
    reg = HintRegressor((b, c_s, hw, hw), (b, c_t, hw, hw)).double()  # 1x1 conv, BN in training mode
    weight = torch.tensor([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype=torch.float64)
    bias = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    with torch.no_grad():
        reg.conv.weight.copy_(weight[:, :, None, None])
        reg.conv.bias.copy_(bias)
    method = FitNet(FitNetParams(gamma=0.7, alpha=0.4, beta=3.0, temperature=2.0, hint_layer=h), PROBLEM)
    feats_s = (torch.zeros(b, 1, 4, 4, dtype=torch.float64), f_s)  # index 0 must be ignored: hint_layer 1
    feats_t = (torch.ones(b, 1, 4, 4, dtype=torch.float64), f_t)
    ctx = make_ctx(TinyCNN(), TinyCNN(), reg)
    total, parts = method.loss(ModelOutput(s_logits, features=feats_s), ModelOutput(t_logits, features=feats_t), as_batch(labels), ctx)

    # conv 1x1 by explicit sums, BatchNorm with batch statistics (biased variance, eps 1e-5), ReLU
    y = torch.zeros(b, c_t, hw, hw, dtype=torch.float64)
    for o in range(c_t):
        y[:, o] = bias[o] + sum(weight[o, c] * f_s[:, c] for c in range(c_s))
    r = torch.zeros_like(y)
    for o in range(c_t):
        vals = y[:, o]
        mean = vals.sum() / vals.numel()
        var = ((vals - mean) ** 2).sum() / vals.numel()
        r[:, o] = ((vals - mean) / torch.sqrt(var + 1e-5)).clamp(min=0)
    hint = ((r - f_t) ** 2).sum() / r.numel()
    ce, kd = hand_ce(s_logits, labels), hand_kd(s_logits, t_logits, 2.0)
    assert parts["hint"].item() == pytest.approx(hint.item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert total.item() == pytest.approx((0.7 * ce + 0.4 * kd + 3.0 * hint).item(), rel=1e-5)


def test_hint_gradient_reaches_regressor_and_student_features():
    torch.manual_seed(0)
    reg = HintRegressor((2, 2, 3, 3), (2, 3, 3, 3)).double()
    method = FitNet(FitNetParams(gamma=0.0, hint_layer=0), PROBLEM)
    f_s = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    f_t = torch.rand(2, 3, 3, 3, dtype=torch.float64)
    logits = torch.zeros(2, 5, dtype=torch.float64)
    ctx = make_ctx(TinyCNN(), TinyCNN(), reg)

    def hint_of(x: torch.Tensor) -> torch.Tensor:
        return method.loss(ModelOutput(logits, features=(x,)), ModelOutput(logits, features=(f_t,)), as_batch(torch.tensor([0, 1])), ctx)[0]

    hint_of(f_s).backward()
    # central finite difference on one student activation (the loss runs in float32: loose step)
    e = torch.zeros_like(f_s)
    e[1, 0, 2, 1] = 1e-3
    with torch.no_grad():
        fd = (hint_of(f_s + e) - hint_of(f_s - e)) / 2e-3
    assert f_s.grad[1, 0, 2, 1].item() == pytest.approx(fd.item(), rel=1e-2, abs=1e-4)
    assert reg.conv.weight.grad is not None and reg.conv.weight.grad.abs().sum() > 0


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    student, teacher = TinyCNN(4, (4, 8, 8)), TinyCNN(6, (8, 12, 16)).eval()
    batch = fixed_batch()
    method = FitNet(FitNetParams(alpha=0.5), PROBLEM)
    method.check_models(student, teacher)
    extra = method.extra_modules(student, teacher, SetupInfo(batch, 16, torch.device("cpu")))
    assert isinstance(extra, HintRegressor) and extra.conv.in_channels == 8 and extra.conv.out_channels == 12
    ctx = make_ctx(student, teacher, extra, lr=0.02)
    method.setup(ctx)
    losses = [method.train_step(ctx, batch)["loss"].item() for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0]


def test_extra_modules_probe_leaves_batchnorm_statistics_alone():
    student, teacher = TinyCNN(), TinyCNN()
    before = student.stem[1].running_mean.clone()
    FitNet(FitNetParams(), PROBLEM).extra_modules(student, teacher, SetupInfo(fixed_batch(), 16, torch.device("cpu")))
    assert torch.equal(student.stem[1].running_mean, before) and student.training


def test_refuses_models_without_features_or_not_cnn():
    method = FitNet(FitNetParams(), PROBLEM)
    with pytest.raises(IncompatibleModelError, match=r"student to expose \['features'\]"):
        method.check_models(LogitsOnly(), TinyCNN())
    with pytest.raises(IncompatibleModelError, match=r"teacher to expose \['features'\]"):
        method.check_models(TinyCNN(), LogitsOnly())
    with pytest.raises(IncompatibleModelError, match="needs convolutional feature maps.*family 'transformer'"):
        method.check_models(FakeTransformer(), TinyCNN())
    with pytest.raises(IncompatibleModelError, match="hint_layer 5.*only 4 feature maps"):
        FitNet(FitNetParams(hint_layer=5), PROBLEM).check_models(TinyCNN(), TinyCNN())


def test_registered_through_the_hook():
    pm, broken = make_plugin_manager(extra_plugins=["kdbench_plugins.methods.fitnet"])
    reg = Registry(pm, broken)
    assert reg.method("fitnet") is FitNet
    assert FitNetParams() == FitNetParams(gamma=1.0, alpha=0.0, beta=100.0, temperature=4.0, hint_layer=2)


def as_batch(labels: torch.Tensor) -> Batch:
    """The batch a loss receives, reduced to what these losses read: labels (and indices)."""
    return Batch(inputs={}, labels=labels, index=torch.arange(labels.shape[0]))
