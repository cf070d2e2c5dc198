"""``dist``: distillation from a stronger teacher by relations of predictions.

Huang, You, Wang, Qian, Xu. "Knowledge Distillation from A Stronger Teacher." NeurIPS 2022
(arXiv:2205.10536).

With softened probabilities Y_s = softmax(s / T), Y_t = softmax(t / T) (B x C) and the
Pearson correlation rho(u, v) = <u - mean u, v - mean v> / (|u - mean u| |v - mean v| + 1e-8)::

    inter = T^2 * (1 - mean_b rho(Y_s[b, :], Y_t[b, :]))     (each example's class profile)
    intra = T^2 * (1 - mean_c rho(Y_s[:, c], Y_t[:, c]))     (each class across the batch)
    L     = ce_weight * CE(s, y) + beta * inter + gamma * intra

Written as the authors' code (hunto/image_classification_sota at 6f7a70a,
``lib/models/losses/dist_kd.py`` lines 4-34: the 1e-8 sits in the cosine's denominator).
Defaults are their CIFAR-100 recipe (``configs/strategies/distill/dist_cifar.yaml``:
``ori_loss_weight 1``, ``kd_loss_weight 2``, ``kd: dist_t4``, i.e. ``DIST(beta=1,
gamma=1, tau=4)`` from ``lib/models/losses/kd_loss.py`` lines 69-71, scaled by 2): CE 1,
beta 2, gamma 2, T 4. ``logit_standardization: true`` z-scores both sides' logits before T
(:func:`kdbench.losses.soften`). The intra-class term compares classes across the batch,
so it needs batches of at least 2 examples. Classification only.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdbench.api import Batch, IncompatibleModelError, KDModel, Method, ModelOutput, Options, StepContext, task_loss
from kdbench.hookspecs import hookimpl
from kdbench.losses import check_standardization, soften, standardization_option

EPS = 1e-8  # the authors' cosine_similarity eps


class DISTParams(Options):
    ce_weight: float = Field(1.0, ge=0, description="weight of the task loss (CE)")
    beta: float = Field(2.0, ge=0, description="weight of the inter-class relation (per example, over classes)")
    gamma: float = Field(2.0, ge=0, description="weight of the intra-class relation (per class, over the batch)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    logit_standardization: bool = standardization_option()


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (B,), as the
    authors' ``pearson_correlation``: centred cosine with 1e-8 in the denominator."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def dist_parts(student_logits: Tensor, teacher_logits: Tensor, temperature: float, standardize: bool = False) -> tuple[Tensor, Tensor]:
    """(inter, intra), each ``T^2 * (1 - mean Pearson correlation)`` of softened probabilities."""
    y_s = soften(student_logits, temperature, standardize).softmax(dim=1)
    y_t = soften(teacher_logits.to(y_s.dtype), temperature, standardize).softmax(dim=1)
    inter = temperature**2 * (1 - pearson_rows(y_s, y_t).mean())
    intra = temperature**2 * (1 - pearson_rows(y_s.t(), y_t.t()).mean())
    return inter, intra


class DIST(Method):
    """``ce_weight*CE + beta*inter + gamma*intra`` (Huang et al. NeurIPS 2022)."""

    name = "dist"
    description = "DIST: 1 - Pearson correlation of softened probabilities, per example (inter-class) and per class (intra-class), + CE."
    formula = 'CE + beta*T^2*(1 - rho_rows(p_s, p_t)) + gamma*T^2*(1 - rho_cols(p_s, p_t))'
    citation = "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher, NeurIPS (arXiv:2205.10536)"
    Params = DISTParams

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        check_standardization(self.name, self.problem, self.params.logit_standardization)
        if self.label_layout != "class":  # regression, or token labels
            raise IncompatibleModelError(f"method 'dist' correlates class probabilities; it needs a classification task, not one with the label layout {self.label_layout!r}")

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        p = self.params
        inter, intra = dist_parts(student.logits, teacher.logits, p.temperature, p.logit_standardization)
        ce = task_loss(student.logits, batch.labels, self.problem)
        total = p.ce_weight * ce + p.beta * inter + p.gamma * intra
        return total, {"ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [DIST]

