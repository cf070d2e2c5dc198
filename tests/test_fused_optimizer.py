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
