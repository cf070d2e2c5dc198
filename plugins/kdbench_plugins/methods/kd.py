"""``kd``: vanilla knowledge distillation.

Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network." NIPS DL Workshop
2015 (arXiv:1503.02531).

Classification::

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

Regression (e.g. STS-B), where a temperature has no meaning::

    L = alpha * MSE(s, t) + (1 - alpha) * MSE(s, y)

Defaults: alpha 0.5, T 4 (the CRD/RepDistiller CIFAR setting uses alpha 0.9, T 4).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdbench.api import Method, ModelOutput, Options, Problem, StepContext, full_precision, task_loss
from kdbench.hookspecs import hookimpl


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, problem: Problem) -> Tensor:
    """T^2 * KL(p_t || p_s) with softened distributions, batch-mean; MSE for regression."""
    student_logits, teacher_logits = full_precision(student_logits), full_precision(teacher_logits)
    if problem.is_regression:
        return F.mse_loss(student_logits, teacher_logits.to(student_logits.dtype))
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(student_logits.dtype) / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class KDParams(Options):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft (teacher) term")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")


class KD(Method):
    name = "kd"
    description = "Hinton KD: alpha*T^2*KL(teacher||student) + (1-alpha)*CE (MSE on logits for regression)."
    citation = "Hinton, Vinyals, Dean 2015, arXiv:1503.02531"
    Params = KDParams

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, labels: Tensor, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        p = self.params
        soft = soft_loss(student.logits, teacher.logits, p.temperature, self.problem)
        hard = task_loss(student.logits, labels, self.problem)
        return p.alpha * soft + (1 - p.alpha) * hard, {"soft": soft.detach(), "hard": hard.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [KD]
