"""``at``: attention transfer.

Zagoruyko, Komodakis. "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer." ICLR 2017 (arXiv:1612.03928).

The spatial attention map of a feature map F (B, C, H, W) is the channel mean of |F|^p,
flattened and L2-normalised per example::

    a(F) = v / ||v||_2,   v[b, hw] = (1/C) * sum_c F[b, c, hw]^p          (p = 2)

    L = gamma * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
        + beta * sum_{j >= 1} mean_{b, hw} (a(F_s[j]) - a(F_t[j]))^2

over every feature map of ``ModelOutput.features`` except the stem (index 0), paired by
index (RepDistiller's ``feat[1:-1]``: there the last entry is the pooled vector, which
kdbench keeps in ``embedding`` instead). Where the spatial sizes differ, the larger map
is average-pooled to the smaller size first. The paper writes the distance as
``beta/2 * || . ||_2`` per layer; this is the squared, averaged form the CRD benchmark
uses (its beta 1000 belongs to this form).

Defaults follow the CRD benchmark (Tian et al. ICLR 2020, RepDistiller
``scripts/run_cifar_distill.sh``: ``--distill attention -a 0 -b 1000``, gamma 1; p = 2;
T 4 for the unused KD term). mdistiller uses the same (AT.P 2, FEAT_WEIGHT 1000).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdbench.api import FEATURES, LOGITS, Batch, IncompatibleModelError, KDModel, Method, ModelOutput, Options, StepContext, require_family, task_loss
from kdbench.hookspecs import hookimpl
from kdbench.losses import soft_loss


class ATParams(Options):
    gamma: float = Field(1.0, ge=0, description="weight of the task loss (CE)")
    alpha: float = Field(0.0, ge=0, description="weight of the KD (KL) term")
    beta: float = Field(1000.0, ge=0, description="weight of the attention transfer term")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of the KD term")
    p: float = Field(2.0, gt=0, description="power applied to activations before the channel mean")


def attention_map(f: Tensor, p: float) -> Tensor:
    """(B, C, H, W) -> (B, H*W): channel mean of f^p, L2-normalised per example."""
    return F.normalize(f.float().pow(p).mean(dim=1).flatten(1), dim=1)


def at_layer_loss(f_s: Tensor, f_t: Tensor, p: float) -> Tensor:
    """mean (a(f_s) - a(f_t))^2 after pooling the larger map to the smaller spatial size."""
    h_s, h_t = f_s.shape[2], f_t.shape[2]
    if h_s > h_t:
        f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[2:])
    elif h_t > h_s:
        f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


class AttentionTransfer(Method):
    """``gamma*CE + alpha*KD + beta*sum_j mean (a(F_s[j]) - a(F_t[j]))^2`` (Zagoruyko & Komodakis 2017)."""

    name = "at"
    description = "Attention transfer: match L2-normalised spatial attention maps (channel mean of F^2) of every stage (+CE, +optional KD)."
    formula = 'gamma*CE + alpha*KD + beta*sum_j mean (a(F_s^j) - a(F_t^j))^2, a(F) = normalize(mean_c F^2)'
    citation = "Zagoruyko & Komodakis 2017, Paying More Attention to Attention, ICLR (arXiv:1612.03928)"
    Params = ATParams
    student_needs = frozenset({LOGITS, FEATURES})
    teacher_needs = frozenset({LOGITS, FEATURES})

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        for role, model in (("student", student), ("teacher", teacher)):
            require_family(self.name, role, model, "cnn", "convolutional feature maps (B, C, H, W)")
        if teacher is None:
            return
        n_s = len(student.describe().get("feature_channels", ()))
        n_t = len(teacher.describe().get("feature_channels", ()))
        if n_s and n_t and (n_s != n_t or n_s < 2):
            raise IncompatibleModelError(
                f"method 'at' pairs the non-stem feature maps by index, but the student "
                f"({type(student).__name__}) has {n_s} feature maps and the teacher ({type(teacher).__name__}) {n_t}"
            )

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None and student.features is not None and teacher.features is not None
        if len(student.features) != len(teacher.features) or len(student.features) < 2:
            raise IncompatibleModelError(
                f"method 'at' pairs the non-stem feature maps by index, but the student gave "
                f"{len(student.features)} and the teacher {len(teacher.features)}"
            )
        hp = self.params
        at = sum(at_layer_loss(f_s, f_t, hp.p) for f_s, f_t in zip(student.features[1:], teacher.features[1:]))
        ce = task_loss(student.logits, batch.labels, self.problem)
        kd = soft_loss(student.logits, teacher.logits, hp.temperature, self.problem)
        total = hp.gamma * ce + hp.alpha * kd + hp.beta * at
        return total, {"ce": ce.detach(), "kd": kd.detach(), "at": at.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [AttentionTransfer]
