"""``optimizer.fused`` (opt-in): PyTorch's fused step kernel, the same update rule as the
default for-loop kernel. Off by default so that stored runs keep their hashes and numbers."""

from __future__ import annotations

import pytest
import torch

from kdbench.spec import OptimizerSpec, build_suite
from kdbench.train.optim import build_optimizer
from support.suites import smoke_data


def test_the_default_is_left_out_of_the_spec_and_its_hash():
    assert "fused" not in OptimizerSpec().model_dump(mode="json")
    assert OptimizerSpec(fused=True).model_dump(mode="json")["fused"] is True
    plain = build_suite(smoke_data())
    same = build_suite(smoke_data(optimizer={"name": "adamw", "lr": 0.001, "schedule": "linear", "fused": False}))
    fused = build_suite(smoke_data(optimizer={"name": "adamw", "lr": 0.001, "schedule": "linear", "fused": True}))
    assert [r.hash for r in plain.runs] == [r.hash for r in same.runs]
    assert not {r.hash for r in plain.runs} & {r.hash for r in fused.runs}


def _train(spec: OptimizerSpec, steps: int = 25) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt, sched = build_optimizer([w], spec, steps=steps, steps_per_epoch=steps, epochs_budget=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        w.grad = torch.randn(64, 32, generator=g)
        opt.step()
        sched.step()
    return w.detach(), opt


@pytest.mark.parametrize("options", [
    {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "warmup_ratio": 0.2},
    {"name": "adam", "lr": 1e-3, "schedule": "cosine"},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "schedule": "multistep", "milestones": [10, 20]},
])
def test_fused_takes_the_same_steps_as_the_default_to_rounding(options):
    plain, plain_opt = _train(OptimizerSpec(**options))
    fused, fused_opt = _train(OptimizerSpec(**options, fused=True))
    assert fused_opt.defaults["fused"] is True and not plain_opt.defaults.get("fused")
    start = _train(OptimizerSpec(**options), steps=0)[0]
    moved = (plain - start).abs().max().item()
    assert moved > 1e-3  # the parameters did move, so agreement below is not trivial
    assert (fused - plain).abs().max().item() <= 1e-5 * max(moved, 1.0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_takes_a_parameter_whose_gradient_starts_late(nesterov):
    """PyTorch's fused SGD raises when one parameter's first gradient comes after the
    others' momentum buffers exist; kdbench's optimizer starts that buffer at zero and
    takes the default kernel's steps (to rounding): hand-checked on the late parameter."""
    spec = dict(name="sgd", lr=0.1, momentum=0.9, nesterov=nesterov, schedule="constant")
    grads = torch.Generator().manual_seed(3)
    steps = [(torch.randn(8, generator=grads), None if i < 2 else torch.randn(8, generator=grads)) for i in range(5)]
    finals = []
    for fused in (False, True):
        a, b = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.zeros(8))
        opt, _ = build_optimizer([a, b], OptimizerSpec(**spec, fused=fused), steps=5, steps_per_epoch=5, epochs_budget=False)
        for ga, gb in steps:
            a.grad, b.grad = ga.clone(), None if gb is None else gb.clone()
            opt.step()
        finals.append((a.detach().clone(), b.detach().clone()))
        assert not opt._optimizer_step_pre_hooks  # fused: the hook removed itself once both had buffers (no per-step scan)
    (pa, pb), (fa, fb) = finals
    assert torch.allclose(fa, pa, atol=1e-6) and torch.allclose(fb, pb, atol=1e-6)
    buf, expected = None, torch.zeros(8)  # b by hand: its buffer starts at its first gradient
    for _, gb in steps[2:]:
        buf = gb.clone() if buf is None else 0.9 * buf + gb
        expected -= 0.1 * (gb + 0.9 * buf if nesterov else buf)
    assert expected.abs().max() > 0.1 and torch.allclose(pb, expected, atol=1e-6)


def test_without_the_guard_pytorchs_fused_sgd_still_raises_on_a_late_gradient():
    """Keeps the guard honest: if PyTorch stops raising, this says the guard can go."""
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9, fused=True)
    a.grad = torch.ones(4)
    opt.step()
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    with pytest.raises((RuntimeError, TypeError)):
        opt.step()

