"""``smoothed-kd``: KD against a teacher distribution mixed with the uniform one.

    p_t' = (1 - eps) * softmax(t / T) + eps / K
    L    = alpha * T^2 * KL(p_t' || softmax(s / T)) + (1 - alpha) * CE(s, y)

A method written outside kdbench: one class, one hook, one entry point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.api import Method, Options, task_loss
from kdbench.hookspecs import hookimpl


class SmoothedKDParams(Options):
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)
    epsilon: float = Field(0.1, ge=0, le=1)


class SmoothedKD(Method):
    name = "smoothed-kd"
    description = "KD toward a label-smoothed teacher distribution (example third-party plugin)."
    Params = SmoothedKDParams

    def loss(self, student, teacher, batch, ctx):
        p = self.params
        k = teacher.logits.shape[-1]
        target = (1 - p.epsilon) * F.softmax(teacher.logits / p.temperature, -1) + p.epsilon / k
        soft = F.kl_div(F.log_softmax(student.logits / p.temperature, -1), target, reduction="batchmean") * p.temperature**2
        hard = task_loss(student.logits, batch.labels, self.problem)
        return p.alpha * soft + (1 - p.alpha) * hard, {"soft": soft.detach(), "hard": hard.detach()}


@hookimpl
def kdbench_methods():
    return [SmoothedKD]
