"""``mlkd``: multi-level logit distillation.

Jin, Wang, Lin. "Multi-Level Logit Distillation." CVPR 2023.

Instance-, batch- and class-level alignment of softened predictions at several
temperatures. With P_s = softmax(s / T), P_t = softmax(t / T) (B x C)::

    KD_T = T^2 * KL(P_t || P_s)                       (batch mean; instance level)
    BC_T = |P_t P_t^T - P_s P_s^T|_F^2 / B            (B x B batch correlation)
    CC_T = |P_t^T P_t - P_s^T P_s|_F^2 / C            (C x C class correlation)
    f    = mean_b [conf_b <= median(conf)],  conf_b = max_c softmax(t)_b     (teacher, T = 1)
    f_c  = mean_c [m_c <= median(m)],        m_c = sum_b softmax(t)_bc
    L    = ce_weight * CE(s, y) + kd_weight * sum_T (f * KD_T + f * BC_T + f_c * CC_T)

The masks are as the authors' code applies them (Jin-Ying/Multi-Level-Logit-Distillation
at 5ee473f, ``mdistiller/distillers/KD_ours.py``: ``kd_loss``/``cc_loss``/``bc_loss``
lines 13-47, the masks lines 98-111, the weak-view terms from line 115): the loss is
reduced to a scalar first and then multiplied by the 0/1 mask and averaged, so the mask
scales the term by the fraction f of low-confidence examples (about one half) rather than
selecting them. Temperatures 4 (``cfg.KD.TEMPERATURE``), 3, 5, 2 and 6; weights CE 0.1 and
KD 0.9 (``mdistiller/engine/cfg.py`` lines 60-64).

**Not the published recipe.** MLKD's published CIFAR-100 numbers train on two views of
every image, the usual crop/flip ("weak") and an AutoAugment-style "strong" one, each
through teacher and student (two teacher and two student passes per image), for 240
epochs; the authors' loss also adds CE on the strong view and unmasked KD on it at T 3,
4, 5 (plus, unmasked, weak-view KD at T 2 and 6). kdbench methods see one batch as the
task augments it, so this plugin computes the weak-view half of the loss above on that
single view (one teacher and one student pass), under the suite's budget. Its numbers
measure multi-level alignment, not the paper's augmentation; the paper's gains should be
compared with that in mind. ``logit_standardization: true`` z-scores logits in the KD
terms (MLKD+LS, Sun et al. CVPR 2024, whose code standardises only there).
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveFloat
from torch import Tensor

from kdbench.api import Batch, IncompatibleModelError, KDModel, Method, ModelOutput, Options, StepContext, task_loss
from kdbench.hookspecs import hookimpl
from kdbench.losses import check_standardization, soften, softened_kl, standardization_option


class MLKDParams(Options):
    ce_weight: float = Field(0.1, ge=0, description="weight of the task loss (CE)")
    kd_weight: float = Field(0.9, ge=0, description="weight of every alignment term")
    temperatures: list[PositiveFloat] = Field([4.0, 3.0, 5.0, 2.0, 6.0], min_length=1,
                                              description="the temperatures each level is aligned at (at least one)")
    logit_standardization: bool = standardization_option()


def batch_correlation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``|P_t P_t^T - P_s P_s^T|_F^2 / B`` (the authors' ``bc_loss``)."""
    p_s, p_t = soften(student_logits, temperature).softmax(1), soften(teacher_logits, temperature).softmax(1).to(student_logits.dtype)
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / p_s.shape[0]


def class_correlation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``|P_t^T P_t - P_s^T P_s|_F^2 / C`` (the authors' ``cc_loss``)."""
    p_s, p_t = soften(student_logits, temperature).softmax(1), soften(teacher_logits, temperature).softmax(1).to(student_logits.dtype)
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / p_s.shape[1]


def low_confidence_fractions(teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(f, f_c): the fraction of examples whose teacher confidence is at most the batch's
    median, and of classes whose summed teacher probability is at most the classes'
    median (medians interpolated as ``np.percentile(x, 50)``, as the authors' code)."""
    with torch.no_grad():
        probs = torch.softmax(teacher_logits.float(), dim=1)
        conf = probs.max(dim=1).values
        mass = probs.sum(dim=0)
        f = (conf <= torch.quantile(conf, 0.5)).float().mean()
        f_c = (mass <= torch.quantile(mass, 0.5)).float().mean()
    return f, f_c


class MLKD(Method):
    """``ce_weight*CE + kd_weight * sum_T (f*KD_T + f*BC_T + f_c*CC_T)`` on one view (Jin et al. CVPR 2023)."""

    name = "mlkd"
    description = "Multi-level logit KD: instance (KL), batch and class correlation alignment at several temperatures, confidence-weighted (one view)."
    formula = '0.1*CE + 0.9*sum_T (f*KD_T + f*BC_T + f_c*CC_T)'
    citation = "Jin, Wang, Lin 2023, Multi-Level Logit Distillation, CVPR"
    Params = MLKDParams

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        check_standardization(self.name, self.problem, self.params.logit_standardization)
        if self.label_layout != "class":  # regression, or token labels
            raise IncompatibleModelError(f"method 'mlkd' aligns class probabilities; it needs a classification task, not one with the label layout {self.label_layout!r}")

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        p = self.params
        s = student.logits.float() if student.logits.dtype != torch.float64 else student.logits
        t = teacher.logits.to(s.dtype)
        f, f_c = low_confidence_fractions(t)
        f, f_c = f.to(s.dtype), f_c.to(s.dtype)
        kd = sum(softened_kl(s, t, temp, standardize=p.logit_standardization) for temp in p.temperatures)
        bc = sum(batch_correlation(s, t, temp) for temp in p.temperatures)
        cc = sum(class_correlation(s, t, temp) for temp in p.temperatures)
        ce = task_loss(s, batch.labels, self.problem)
        total = p.ce_weight * ce + p.kd_weight * (f * kd + f * bc + f_c * cc)
        return total, {"ce": ce.detach(), "kd": kd.detach(), "bc": bc.detach(), "cc": cc.detach(), "low_conf_fraction": f}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [MLKD]
