"""Helpers for methods that update a run's teacher (ProKT, MetaDistil): its optimizer, the
learning-rate factor of a step, and one clipped update from given gradients.

* :func:`build_teacher_optimizer`: AdamW (fused where PyTorch has it) or SGD over the
  teacher's trainable parameters.
* :func:`schedule_ratio`, :func:`first_teacher_step`, :func:`teacher_lr_factor`: the
  teacher's rate at a step (constant, linear, or following the student's schedule).
* :func:`apply_teacher_gradient`: one step from gradients, clipped by global norm.
* :func:`setup_reading_live_teacher`: a wrapped method's setup, refused where it would read
  the teacher from outputs computed once (they go stale as the teacher learns).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from kdbench.api import KDBenchError, Method, StepContext


def build_teacher_optimizer(teacher: nn.Module, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """The optimizer of a run's trainable teacher (``name``: ``adamw`` or ``sgd``), over its
    parameters that require grad (the runner enables them for ``updates_teacher`` methods).
    AdamW is the fused implementation where PyTorch has it for the parameters' device (CPU
    and CUDA): the same update rule, one kernel instead of a dozen per parameter
    (``benchmarks/optimizer_step.py`` measures the two)."""
    params = [p for p in teacher.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the teacher has no trainable parameters; the runner enables them for updates_teacher methods (kdbench.api.set_trainable), and the model keeps none of them frozen")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused_available(params) or None)


def fused_available(params: list[Tensor]) -> bool:
    """Whether PyTorch's fused Adam/AdamW kernels take ``params``: floating point tensors,
    all on one CPU or CUDA device."""
    devices = {p.device for p in params}
    return len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)


def schedule_ratio(ctx: StepContext) -> float:
    """The student's current learning rate over its initial one (1.0 before any decay)."""
    group = ctx.student_optimizer.param_groups[0]
    initial = group.get("initial_lr") or ctx.state.get("student_initial_lr") or group["lr"]
    return group["lr"] / initial if initial else 1.0


def first_teacher_step(start: float, total_steps: int) -> int:
    """The first (0-based) step at which a teacher that starts after ``start * total_steps``
    steps is updated; never step 0 (the first step is always a plain student step)."""
    return max(math.ceil(start * total_steps - 1e-9), 1)


def teacher_lr_factor(ctx: StepContext, schedule: Literal["constant", "linear", "follow_student"], start: float) -> float:
    """The factor on a teacher's learning rate at step ``ctx.step`` (0-based) of
    ``ctx.total_steps``: 0 before :func:`first_teacher_step`; from there

    * ``constant``: 1;
    * ``linear``: ``(total - step) / (total - start * total)``: from 1 at the start down
      toward 0 at the end of the run, one decrement per step. With ``start`` 0 this is, step
      for step, ``get_linear_schedule_with_warmup`` without warm-up over the run
      (MetaDistil's official GLUE teacher; its first step, step 0, is a plain step here);
    * ``follow_student``: the student's :func:`schedule_ratio` divided by its value at the
      first active step, so the teacher starts at its full rate and then decays with the
      student (MetaDistil's official CIFAR teacher: full from epoch 150, x0.1 at 180 and
      210 while the student is at x0.1, x0.01, x0.001). The ratio at the first active step
      is kept in ``ctx.state["teacher_ratio_at_start"]``.
    """
    first = first_teacher_step(start, ctx.total_steps)
    if ctx.step < first:
        return 0.0
    if schedule == "linear":
        start_step = int(start * ctx.total_steps)
        return max(0.0, (ctx.total_steps - ctx.step) / max(ctx.total_steps - start_step, 1))
    if schedule == "follow_student":
        at_start = ctx.state.setdefault("teacher_ratio_at_start", schedule_ratio(ctx))
        return schedule_ratio(ctx) / at_start if at_start else 0.0
    return 1.0


def apply_teacher_gradient(optimizer: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor], lr: float, clip: float | None) -> Tensor:
    """One step of the teacher's optimizer on a gradient computed elsewhere (MetaDistil's
    meta-gradient): set ``.grad``, clip to norm ``clip`` (None: no clipping), set every
    group's rate to ``lr``, step and clear. Returns the gradient's norm before clipping."""
    for q, g in zip(params, grads):
        q.grad = g
    if clip is not None:
        norm = nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


def setup_reading_live_teacher(inner: Method, ctx: StepContext, wrapper: str) -> None:
    """``inner.setup(ctx)`` for a method that ``wrapper`` (one that updates the teacher)
    wraps; a :class:`~kdbench.api.KDBenchError` when that setup replaced
    ``ctx.teacher_forward`` (e.g. a top-k teacher cache,
    :func:`kdbench.generation.use_topk_teacher`): those outputs were computed once from
    the teacher as it was, and the wrapper's real step must read the teacher it updates."""
    live = ctx.teacher_forward
    inner.setup(ctx)
    if ctx.teacher_forward is not live:
        raise KDBenchError(f"{wrapper}: inner method '{inner.name}' reads its teacher from outputs computed once (a teacher cache); "
                           f"{wrapper} updates the teacher, so its steps must read it live: drop that option of '{inner.name}'")
