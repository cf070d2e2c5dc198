"""Distillation losses and teacher-update helpers shared by methods.

Every function here is public and has one formula. ``p = softmax(z / T)`` is a softened
distribution; ``s``/``t`` are student/teacher logits (B, C). Losses run in float32 under
half-precision autocast (see :func:`kdbench.api.full_precision`).

* :func:`softened_kl`: ``T^2 * KL(p_t || p_s)``, batch mean (Hinton et al.) or element mean.
* :func:`probability_mse`: ``T^2 * mean (p_s - p_t)^2`` (MetaDistil's official GLUE soft term).
* :func:`soft_cross_entropy`: ``-sum_c p_t log p_s`` averaged per example, or per element
  (TinyBERT's official prediction-layer loss).
* :func:`soft_loss`: the soft term of KD-style methods: one of the two above for
  classification, MSE between logits for regression.
* :func:`build_teacher_optimizer`, :func:`schedule_ratio`, :func:`teacher_lr_factor`,
  :func:`apply_teacher_gradient`: for methods that update a run's teacher (ProKT, MetaDistil).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.api import Problem, StepContext, full_precision

SoftKind = Literal["kl", "mse"]


def softened_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: Literal["batchmean", "mean"] = "batchmean") -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``. ``batchmean``: summed over classes,
    averaged over the batch (the KL itself); ``mean``: averaged over batch x classes, as
    ``nn.KLDivLoss(reduction="mean")`` (PKD's official code), C times smaller."""
    s, t = full_precision(student_logits), full_precision(teacher_logits)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t.to(s.dtype) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
    return kl / s.shape[-1] if reduction == "mean" else kl  # mean = sum / (B * C), without torch's warning


def probability_mse(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_{b,c} (softmax(s/T) - softmax(t/T))^2``: MetaDistil's official GLUE soft
    term (``nn.MSELoss()`` on the softened probabilities, times T^2)."""
    s, t = full_precision(student_logits), full_precision(teacher_logits)
    return F.mse_loss(F.softmax(s / temperature, dim=-1), F.softmax(t.to(s.dtype) / temperature, dim=-1)) * temperature**2


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """``-softmax(t/T) * log_softmax(s/T)``: ``mean`` averages over batch x classes
    (TinyBERT's official ``soft_cross_entropy``); ``sum`` sums over classes and averages
    over the batch (the cross-entropy per example, C times larger)."""
    s, t = full_precision(student_logits), full_precision(teacher_logits)
    terms = -F.softmax(t.to(s.dtype) / temperature, dim=-1) * F.log_softmax(s / temperature, dim=-1)
    return terms.mean() if reduction == "mean" else terms.sum(-1).mean()


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, problem: Problem,
              kind: SoftKind = "kl", reduction: Literal["batchmean", "mean"] = "batchmean") -> Tensor:
    """The soft (teacher) term of KD-style losses. Classification: :func:`softened_kl`
    (``kind="kl"``, with ``reduction``) or :func:`probability_mse` (``kind="mse"``).
    Regression, where a temperature means nothing: ``MSE(s, t)`` on the logits."""
    if problem.is_regression:
        s = full_precision(student_logits)
        return F.mse_loss(s, full_precision(teacher_logits).to(s.dtype))
    if kind == "mse":
        return probability_mse(student_logits, teacher_logits, temperature)
    return softened_kl(student_logits, teacher_logits, temperature, reduction)


# --------------------------------------------------------------------------- teacher updates


def build_teacher_optimizer(teacher: nn.Module, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """The optimizer of a run's trainable teacher (``name``: ``adamw`` or ``sgd``), over its
    parameters that require grad (the runner enables them for ``updates_teacher`` methods).
    AdamW is the fused implementation where PyTorch has it for the parameters' device (CPU
    and CUDA): the same update rule, one kernel instead of a dozen per parameter (on the
    reference CPU setup the for-loop AdamW over a MiniLM teacher took about 0.1 s a step)."""
    params = [p for p in teacher.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the teacher has no trainable parameters; the runner must call teacher.requires_grad_(True) for updates_teacher methods")
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
