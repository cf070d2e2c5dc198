"""``ctkd``: curriculum temperature for knowledge distillation.

Li, Li, Yang, Cheng, Yang, Li, Wang. "Curriculum Temperature for Knowledge Distillation."
AAAI 2023 (arXiv:2211.16231).

The temperature is learned, adversarially: a scalar parameter ``w`` (initial 1) gives
``T = t_start + t_range * sigmoid(GRL_lambda(w))``, where the gradient-reversal layer
GRL is the identity forward and multiplies the gradient by ``-lambda`` backward, so the
student descends the KD loss while ``w`` ascends it (makes the task harder). lambda
follows a cosine curriculum from 0 to ``lambda_max`` over the first ``curriculum_fraction``
of the steps, then stays::

    lambda(step) = lambda_max * (1 - cos(pi * min((step + 1) / W, 1))) / 2,   W = curriculum_fraction * total_steps
    L = gamma * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))   (batch mean)

``w`` is an extra module trained by the student's optimizer (as the authors' code adds it
to the trainable list). As written in zhengli97/CTKD at 7d52522: ``models/temp_global.py``
lines 9-49 (Global_T, the GRL: ``dx = lambda_ * grads`` with lambda_ <= 0),
``helper/loops.py`` line 134 (``temp = t_start + t_end * sigmoid(temp)``),
``train_student.py`` lines 186-202 (CosineDecay per epoch, epochs from 1) and
``scripts/run_cifar_distill.sh`` (``-r 0.1 -a 0.9 --t_start 1 --t_end 20 --decay_max 0
--decay_min -1 --decay_loops 10``: their lambda runs 0 -> -1, here written as the
magnitude 0 -> 1). Defaults: gamma 0.1, alpha 0.9, t_start 1, t_range 20, lambda_max 1,
curriculum over 10 of 240 epochs, stepped per step here rather than per epoch.
``logit_standardization: true`` z-scores logits before T (CTKD+LS, Sun et al. CVPR 2024).
Classification only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import Batch, IncompatibleModelError, KDModel, Method, ModelOutput, Options, SetupInfo, StepContext, task_loss
from kdbench.hookspecs import hookimpl
from kdbench.losses import check_standardization, softened_kl, standardization_option


class CTKDParams(Options):
    gamma: float = Field(0.1, ge=0, description="weight of the task loss (CE)")
    alpha: float = Field(0.9, ge=0, description="weight of the KD term at the learned temperature")
    t_start: float = Field(1.0, gt=0, description="the smallest temperature: T = t_start + t_range * sigmoid(w)")
    t_range: float = Field(20.0, gt=0, description="span of the learned temperature")
    lambda_max: float = Field(1.0, ge=0, description="final strength of the gradient reversal on the temperature")
    curriculum_fraction: float = Field(10 / 240, gt=0, le=1, description="fraction of the steps over which lambda rises (cosine) to lambda_max; "
                                       "must be > 0: a curriculum needs steps")
    logit_standardization: bool = standardization_option()


class _Reverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-lambda``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


def gradient_reversal(x: Tensor, lam: float) -> Tensor:
    """Ganin & Lempitsky's gradient-reversal layer: ``x`` forward, ``-lam * grad`` backward."""
    return _Reverse.apply(x, lam)


def curriculum_lambda(step: int, total_steps: int, fraction: float, lambda_max: float) -> float:
    """``lambda_max * (1 - cos(pi * min((step + 1) / W, 1))) / 2`` with ``W = fraction * total_steps``
    (at least one step): the authors' CosineDecay(0, -lambda_max, loops) read per step, negated."""
    progress = min((step + 1) / max(fraction * total_steps, 1.0), 1.0)
    return lambda_max * (1 - math.cos(math.pi * progress)) / 2


class GlobalTemperature(nn.Module):
    """The learned scalar ``w`` (initial 1, as the authors' ``Global_T``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, lam: float, t_start: float, t_range: float) -> Tensor:
        return t_start + t_range * torch.sigmoid(gradient_reversal(self.w, lam))


class CTKD(Method):
    """``gamma*CE + alpha*T^2*KL`` at a temperature learned through gradient reversal (Li et al. AAAI 2023)."""

    name = "ctkd"
    description = "Curriculum temperature KD: KD at a learned temperature trained adversarially (gradient reversal), cosine curriculum on its strength."
    formula = 'gamma*CE + alpha*T^2*KL at T = t0 + r*sigmoid(GRL_lambda(w)), lambda cosine 0 -> 1'
    citation = "Li et al. 2023, Curriculum Temperature for Knowledge Distillation, AAAI (arXiv:2211.16231)"
    Params = CTKDParams

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        check_standardization(self.name, self.problem, self.params.logit_standardization)
        if self.label_layout != "class":  # regression, or token labels
            raise IncompatibleModelError(f"method 'ctkd' learns a softmax temperature; it needs a classification task, not one with the label layout {self.label_layout!r}")

    def extra_modules(self, student: KDModel, teacher: KDModel | None, info: SetupInfo) -> nn.Module:
        return GlobalTemperature().to(info.device)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None and isinstance(ctx.extra, GlobalTemperature), "ctkd's temperature comes from extra_modules()"
        p = self.params
        lam = curriculum_lambda(ctx.step, ctx.total_steps, p.curriculum_fraction, p.lambda_max)
        temperature = ctx.extra(lam, p.t_start, p.t_range)  # (1,), float32: promotes with the logits
        kd = softened_kl(student.logits, teacher.logits, temperature, standardize=p.logit_standardization).reshape(())
        ce = task_loss(student.logits, batch.labels, self.problem)
        total = p.gamma * ce + p.alpha * kd
        return total, {"ce": ce.detach(), "kd": kd.detach(), "temperature": temperature.detach().reshape(()), "reversal": torch.tensor(lam)}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [CTKD]
