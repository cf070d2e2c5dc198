"""``kd``: vanilla knowledge distillation.

Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network." NIPS DL Workshop
2015 (arXiv:1503.02531).

Classification::

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

Regression (e.g. STS-B), where a temperature has no meaning::

    L = alpha * MSE(s, t) + (1 - alpha) * MSE(s, y)

``soft_loss: mse`` replaces the KL by ``T^2 * mean_{b,c} (p_s - p_t)^2`` (the soft term of
MetaDistil's official GLUE code; see :func:`kdbench.losses.probability_mse`).
``regression_soft: probabilities`` (regression only) is that same term on the one output:
identically 0, so the student learns from the labels alone (what the official GLUE code
computes on STS-B unless ``--logits_mse`` is given); default ``logits``, the MSE above.

``logit_standardization: true`` z-scores each example's student and teacher logits before
dividing by T (KD+LS of Sun et al., "Logit Standardization in Knowledge Distillation",
CVPR 2024; :func:`kdbench.losses.standardize_logits`). Their CIFAR-100 KD+LS runs
(``tools/train.py --logit-stand --base-temp 2 --kd-weight 9``) weigh CE 0.1 and KD 9:
``alpha`` 9/9.1 keeps that ratio at 1/9.1 of its scale (the student's learning rate
sees the difference). Classification only.

Both terms come from the task's objective and average over the positions the student's
output mask keeps (token logits (B, L, V)); per-example logits have no mask.

Defaults: alpha 0.5, T 4, KL (the CRD/RepDistiller CIFAR setting uses alpha 0.9, T 4).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdbench.api import Batch, KDModel, Method, ModelOutput, Options, StepContext, added, task_loss
from kdbench.hookspecs import hookimpl
from kdbench.losses import check_standardization, soft_loss, standardization_option


class KDParams(Options):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft (teacher) term")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    soft_loss: Literal["kl", "mse"] = added("kl", description="soft term: T^2*KL (Hinton) or T^2*MSE of softened probabilities (MetaDistil's GLUE code)")
    logit_standardization: bool = standardization_option()
    regression_soft: Literal["logits", "probabilities"] = added(
        "logits", description="regression soft term: MSE of the outputs, or of their one-output softmax (identically 0: MetaDistil's official STS-B)")


class KD(Method):
    name = "kd"
    description = "Hinton KD: alpha*T^2*KL(teacher||student) + (1-alpha)*CE (MSE on logits for regression)."
    formula = 'alpha*T^2*KL(p_t^T || p_s^T) + (1-alpha)*CE'
    citation = "Hinton, Vinyals, Dean 2015, arXiv:1503.02531"
    Params = KDParams

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        check_standardization(self.name, self.problem, self.params.logit_standardization)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        p = self.params
        soft = soft_loss(student.logits, teacher.logits, p.temperature, self.problem, kind=p.soft_loss, mask=student.mask,
                         standardize=p.logit_standardization, regression=p.regression_soft)
        hard = task_loss(student.logits, batch.labels, self.problem, student.mask)
        return p.alpha * soft + (1 - p.alpha) * hard, {"soft": soft.detach(), "hard": hard.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [KD]
