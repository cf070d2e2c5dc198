"""``dkd``: decoupled knowledge distillation.

Zhao, Cui, Song, Qiu, Liang. "Decoupled Knowledge Distillation." CVPR 2022
(arXiv:2203.08679).

With softened probabilities p = softmax(z / T) and target class y, the KL of classic KD
splits into a target-class part and a non-target part::

    b = [p_y, 1 - p_y]                          (binary: target vs all others)
    q = softmax over the non-target logits      (z_y masked out)
    KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_t,y) * KL(q_t || q_s)

DKD weights the two parts independently and drops the (1 - p_t,y) coupling::

    TCKD = T^2 * KL(b_t || b_s),   NCKD = T^2 * KL(q_t || q_s)      (batch means)
    L = gamma * CE(s, y) + w(step) * (alpha * TCKD + beta * NCKD)
    w(step) = min((step + 1) / (warmup_fraction * total_steps), 1)

q is computed as in the paper's code: softmax of z / T - 1000 * onehot(y).

Defaults are mdistiller's CIFAR-100 ones (``mdistiller/engine/cfg.py``: CE_WEIGHT 1,
ALPHA 1, BETA 8, T 4, WARMUP 20 epochs of 240). BETA is tuned per pair in its configs:
8 for resnet32x4->resnet8x4 (the default), 2 for resnet56->resnet20 and
resnet110->resnet32, 6 for wrn-40-2->wrn-16-2 and vgg13->vgg8. mdistiller ramps the KD
weight per epoch (epoch / 20, epochs counted from 1); here it ramps per step over the same
fraction of the budget (20/240). Classification only.

``logit_standardization: true`` z-scores both sides' logits before T (DKD+LS, Sun et al.
CVPR 2024, their ``mdistiller/distillers/DKD.py`` lines 12-14; their runs then use T 2
and ALPHA, BETA times 9: ``--logit-stand --base-temp 2 --kd-weight 9``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdbench.api import Batch, IncompatibleModelError, KDModel, Method, ModelOutput, Options, StepContext, task_loss
from kdbench.hookspecs import hookimpl
from kdbench.losses import check_standardization, soften, standardization_option

#: what the paper's code subtracts from the target logit to drop it from the softmax
TARGET_MASK = 1000.0


class DKDParams(Options):
    gamma: float = Field(1.0, ge=0, description="weight of the task loss (CE)")
    alpha: float = Field(1.0, ge=0, description="weight of TCKD (target-class KD)")
    beta: float = Field(8.0, ge=0, description="weight of NCKD (non-target-class KD)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    warmup_fraction: float = Field(20 / 240, ge=0, le=1, description="fraction of the steps over which the DKD weight ramps up linearly")
    logit_standardization: bool = standardization_option()


def log_binary(z: Tensor, gt: Tensor) -> Tensor:
    """log b = [log p_y, log(1 - p_y)] of softmax(z), from log-sum-exps so neither side underflows."""
    lse = z.logsumexp(dim=1, keepdim=True)
    target = z.masked_fill(~gt, -torch.inf).logsumexp(dim=1, keepdim=True)
    other = z.masked_fill(gt, -torch.inf).logsumexp(dim=1, keepdim=True)
    return torch.cat([target, other], dim=1) - lse


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, standardize: bool = False) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each T^2 * KL(teacher || student), batch mean; on standardised logits
    when ``standardize``."""
    s = soften(student_logits.float(), temperature, standardize)
    t = soften(teacher_logits.float(), temperature, standardize)
    gt = F.one_hot(labels, s.shape[1]).bool()
    tckd = F.kl_div(log_binary(s, gt), log_binary(t, gt), reduction="batchmean", log_target=True) * temperature**2
    log_q_s = F.log_softmax(s - TARGET_MASK * gt, dim=1)
    q_t = F.softmax(t - TARGET_MASK * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean") * temperature**2
    return tckd, nckd


class DKD(Method):
    """``gamma*CE + w(step) * (alpha*TCKD + beta*NCKD)`` (Zhao et al. CVPR 2022)."""

    name = "dkd"
    description = "Decoupled KD: target-class (TCKD) and non-target-class (NCKD) KL terms weighted separately, with a warm-up."
    formula = 'gamma*CE + w(step)*(alpha*TCKD + beta*NCKD)'
    citation = "Zhao et al. 2022, Decoupled Knowledge Distillation, CVPR (arXiv:2203.08679)"
    Params = DKDParams

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        check_standardization(self.name, self.problem, self.params.logit_standardization)
        if self.label_layout != "class":
            what = "regression" if self.label_layout == "value" else f"the label layout '{self.label_layout}'"
            raise IncompatibleModelError("method 'dkd' splits class probabilities into target and non-target parts; it needs a "
                                         f"classification task, not {what} (one class id per example)")

    def warmup_weight(self, step: int, total_steps: int) -> float:
        """Linear ramp of the DKD weight from 1/W to 1 over W = warmup_fraction * total_steps steps."""
        warm = self.params.warmup_fraction * total_steps
        return 1.0 if warm <= 0 else min((step + 1) / warm, 1.0)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        p = self.params
        tckd, nckd = dkd_parts(student.logits, teacher.logits, batch.labels, p.temperature, p.logit_standardization)
        ce = task_loss(student.logits, batch.labels, self.problem)
        w = self.warmup_weight(ctx.step, ctx.total_steps)
        total = p.gamma * ce + w * (p.alpha * tckd + p.beta * nckd)
        return total, {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(), "dkd_weight": torch.tensor(w)}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [DKD]
