"""``fitnet``: FitNets, hint-based feature regression.

Romero, Ballas, Kahou, Chassang, Gatta, Bengio. "FitNets: Hints for Thin Deep Nets."
ICLR 2015 (arXiv:1412.6550).

A learnable regressor ``r`` maps the student's hint feature map to the shape of the
teacher's hint map, and the student is trained to match it::

    L = gamma * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
        + beta * mean((r(F_s[h]) - F_t[h])^2)

``F[h]`` is the post-activation feature map ``h`` of ``ModelOutput.features`` (index 0 is
the stem, then one per stage), the same index on both sides. ``r`` is conv -> BatchNorm ->
ReLU with the conv chosen by the spatial sizes (as RepDistiller's ``ConvReg``): a 3x3
stride-2 conv when the student map is twice the teacher's size, a 4x4 stride-2 transposed
conv when it is half, otherwise a valid conv of kernel ``1 + H_s - H_t`` (1x1 for equal
sizes). It is created once from a probe forward and trained with the student.

Defaults follow the CRD benchmark (Tian et al. ICLR 2020, RepDistiller
``scripts/run_cifar_distill.sh``: ``--distill hint -a 0 -b 100``, gamma 1, ``hint_layer``
2 = the middle stage, T 4 for the unused KD term). The paper's FitNet trains in two
stages (hint pre-training, then KD); like RepDistiller's main table this is the
single-stage combined loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import (
    FEATURES,
    LOGITS,
    STUDENT,
    TEACHER,
    Batch,
    IncompatibleModelError,
    KDModel,
    Method,
    ModelOutput,
    Options,
    SetupInfo,
    StepContext,
    require_family,
    task_loss,
)
from kdbench.hookspecs import hookimpl
from kdbench.losses import soft_loss


class FitNetParams(Options):
    gamma: float = Field(1.0, ge=0, description="weight of the task loss (CE)")
    alpha: float = Field(0.0, ge=0, description="weight of the KD (KL) term")
    beta: float = Field(100.0, ge=0, description="weight of the hint regression term")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of the KD term")
    hint_layer: int = Field(2, ge=0, description="index into ModelOutput.features (0 = stem) on both sides")


class HintRegressor(nn.Module):
    """r(f) = ReLU(BN(conv(f))): maps a (B, C_s, H_s, W_s) student map to (B, C_t, H_t, W_t)."""

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]):
        super().__init__()
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h and s_w == 2 * t_w:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h and 2 * s_w == t_w:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise IncompatibleModelError(
                f"method 'fitnet' cannot regress a student hint map of spatial size {s_h}x{s_w} onto the "
                f"teacher's {t_h}x{t_w}: the student map must be larger, equal, half or twice the size"
            )
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, f: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(f)))


def _feature_shapes(model: KDModel, info: SetupInfo, role: str) -> list[tuple[int, ...]]:
    """Feature map shapes from one forward on the sample batch, leaving BN statistics alone."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(info.sample.inputs_for(role), need=frozenset({FEATURES}))
    model.train(was_training)
    assert out.features is not None
    return [tuple(f.shape) for f in out.features]


class FitNet(Method):
    """Hint regression: ``gamma*CE + alpha*KD + beta*MSE(r(F_s[h]), F_t[h])`` (Romero et al. 2015)."""

    name = "fitnet"
    description = "FitNets: MSE between a learned conv regressor of a student hint map and the teacher's map (+CE, +optional KD)."
    formula = 'gamma*CE + alpha*T^2*KL + beta*MSE(r(F_s^h), F_t^h)'
    citation = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets, ICLR (arXiv:1412.6550)"
    Params = FitNetParams
    student_needs = frozenset({LOGITS, FEATURES})
    teacher_needs = frozenset({LOGITS, FEATURES})

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        h = self.params.hint_layer
        for role, model in (("student", student), ("teacher", teacher)):
            require_family(self.name, role, model, "cnn", "convolutional feature maps (B, C, H, W)")
            n = len(model.describe().get("feature_channels", ())) if model is not None else 0
            if model is not None and n and h >= n:
                raise IncompatibleModelError(
                    f"method 'fitnet' uses hint_layer {h}, but the {role} model ({getattr(model, 'name', type(model).__name__)}) "
                    f"exposes only {n} feature maps (indices 0..{n - 1})"
                )

    def extra_modules(self, student: KDModel, teacher: KDModel | None, info: SetupInfo) -> nn.Module:
        assert teacher is not None
        h = self.params.hint_layer
        s_shapes, t_shapes = _feature_shapes(student, info, STUDENT), _feature_shapes(teacher, info, TEACHER)
        if h >= min(len(s_shapes), len(t_shapes)):
            raise IncompatibleModelError(
                f"method 'fitnet' uses hint_layer {h}, but the student has {len(s_shapes)} and the "
                f"teacher {len(t_shapes)} feature maps"
            )
        return HintRegressor(s_shapes[h], t_shapes[h])

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None and student.features is not None and teacher.features is not None
        assert ctx.extra is not None, "fitnet's regressor comes from extra_modules()"
        p = self.params
        h = p.hint_layer
        hint = F.mse_loss(ctx.extra(student.features[h]).float(), teacher.features[h].float())
        ce = task_loss(student.logits, batch.labels, self.problem)
        kd = soft_loss(student.logits, teacher.logits, p.temperature, self.problem)
        total = p.gamma * ce + p.alpha * kd + p.beta * hint
        return total, {"ce": ce.detach(), "kd": kd.detach(), "hint": hint.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [FitNet]
