"""The step budget, optimizers and per-step learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kdbench.spec import Budget, OptimizerSpec, lr_factor


def total_steps(budget: Budget, n_train: int) -> int:
    """Optimizer steps of a budget given in steps or in epochs over ``n_train`` examples."""
    if budget.steps is not None:
        return budget.steps
    per_epoch = max(n_train // budget.batch_size, 1)
    return max(int(math.ceil(budget.epochs * per_epoch)), 1)


def build_optimizer(params: list[nn.Parameter], spec: OptimizerSpec, steps: int, steps_per_epoch: int, epochs_budget: bool) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer and a per-step LR schedule. Gradient clipping, when asked, runs as a
    pre-step hook so every method's step gets it without repeating it. ``spec.fused``
    asks PyTorch for its fused kernel (it raises where the parameters' device or dtype
    has none)."""
    fused = {"fused": True} if spec.fused else {}  # default: PyTorch's own choice (the for-loop kernels on CPU)
    if spec.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.nesterov, **fused)
    elif spec.name == "adam":
        opt = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, **fused)
    else:
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, **fused)
    if spec.fused and spec.name == "sgd" and spec.momentum:
        def late_buffers(o: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if start_late_momentum_buffers(o):  # every parameter has its buffer: nothing left to do per step
                handle.remove()

        handle = opt.register_step_pre_hook(late_buffers)
    if spec.grad_clip is not None:
        clip = spec.grad_clip

        def clip_before_step(o: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # A pre-step hook must return None (torch refuses a returned norm).
            nn.utils.clip_grad_norm_([p for g in o.param_groups for p in g["params"]], clip)

        opt.register_step_pre_hook(clip_before_step)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(spec, steps, steps_per_epoch, epochs_budget))


def start_late_momentum_buffers(opt: torch.optim.Optimizer) -> bool:
    """For PyTorch's fused SGD with momentum, before a step: a parameter that has a gradient
    for the first time after other parameters' momentum buffers exist (a head used only
    from some step on) gets a zero buffer. PyTorch's fused kernel raises on such a mixed
    step ("expected Tensor ... but got NoneType"); the default kernel starts that buffer
    at the gradient, and a zero buffer gives the same, ``momentum * 0 + grad`` (kdbench
    sets no dampening). A step where no parameter has a buffer yet is left to PyTorch.
    Returns whether every parameter had its buffer already (then no step can need this
    again, and :func:`build_optimizer` removes the hook)."""
    complete = True
    for group in opt.param_groups:
        has = [p in opt.state and opt.state[p].get("momentum_buffer") is not None for p in group["params"]]
        complete = complete and all(has)
        with_grad = [(p, h) for p, h in zip(group["params"], has) if p.grad is not None]
        missing = [p for p, h in with_grad if not h]
        if missing and len(missing) < len(with_grad):
            for p in missing:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return complete
