"""``reviewkd``: distilling knowledge via knowledge review.

Chen, Liu, Zhao, Jia. "Distilling Knowledge via Knowledge Review." CVPR 2021
(arXiv:2104.09044).

The student's stage outputs F_1..F_n (``features[1:]``, the stem left out) and its pooled
embedding F_{n+1} (as a 1 x 1 map) are fused from the deepest up by attention-based fusion
(ABF) modules; level i is compared with the teacher's pre-activation map G_i
(``preact_features[1:]``, then its pooled embedding) by the hierarchical context loss::

    x_i      = BN(conv1x1(F_i))                                     (to mid channels)
    r_i      = x_i                                                  (deepest level, no fusion)
             = x_i * a_0 + up(r_{i+1}) * a_1,  [a_0, a_1] = sigmoid(conv1x1([x_i, up(r_{i+1})]))
    R_i      = BN(conv3x3(resize(r_i, G_i's size)))                 (to the teacher's channels)
    HCL(R, G) = (MSE(R, G) + sum_{l in 4,2,1, l < h} 2^-k MSE(pool_l R, pool_l G)) / (1 + sum 2^-k)
    L        = ce_weight * CE(s, y) + w(step) * reviewkd_weight * sum_i HCL(R_i, G_i)
    w(step)  = min((step + 1) / (warmup_fraction * total_steps), 1)

(k counts the pooled levels used, 1, 2, 3; "up" and "resize" are nearest-neighbour.)
As written in megvii-research/mdistiller at a08d46f, ``mdistiller/distillers/ReviewKD.py``:
``hcl_loss`` lines 11-28, the fusion lines 66-98 and ``ABF`` lines 106-144 (mid channels
min(512, embedding width); Kaiming-uniform convs, a=1). Shapes come from a probe forward
instead of the config's SHAPES/OUT_SHAPES. Defaults are mdistiller's CIFAR-100 ones
(``mdistiller/engine/cfg.py`` lines 150-159: CE 1, REVIEWKD_WEIGHT 1, warm-up 20 of 240
epochs, student post-activation features; ``configs/cifar100/reviewkd.yaml`` sets the
weight to 5 for resnet32x4 -> resnet8x4). The ABF modules train with the student and count
in its parameters. Student and teacher need the same number of stages (CNN zoo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import (EMBEDDING, FEATURES, LOGITS, PREACT_FEATURES, Batch, IncompatibleModelError, KDModel, Method, ModelOutput, Options, SetupInfo,
                         StepContext, full_precision, require_family, task_loss)
from kdbench.hookspecs import hookimpl

MAX_MID_CHANNELS = 512  # mdistiller: mid_channel = min(512, in_channels[-1])


class ReviewKDParams(Options):
    ce_weight: float = Field(1.0, ge=0, description="weight of the task loss (CE)")
    reviewkd_weight: float = Field(1.0, ge=0, description="weight of the hierarchical context loss (mdistiller uses 5 for resnet32x4 -> resnet8x4)")
    warmup_fraction: float = Field(20 / 240, ge=0, le=1, description="fraction of the steps over which the review weight ramps up linearly")
    student_preact: bool = Field(False, description="fuse the student's pre-activation maps instead of its post-activation ones")


class ABF(nn.Module):
    """Attention-based fusion of one level with the residual from the level below it."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.conv2 = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(the level's output at ``out_size``, the fused map handed to the next level)."""
        x = self.conv1(x)
        if self.att_conv is not None and residual is not None:
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            a = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * a[:, :1] + residual * a[:, 1:]
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


class ReviewFusion(nn.Module):
    """One ABF per level, applied from the deepest (the embedding) up."""

    def __init__(self, s_channels: list[int], t_channels: list[int], t_sizes: list[tuple[int, int]]):
        super().__init__()
        mid = min(MAX_MID_CHANNELS, s_channels[-1])
        n = len(s_channels)
        self.abfs = nn.ModuleList(ABF(c, mid, t_channels[i], i < n - 1) for i, c in enumerate(s_channels))
        self.t_sizes = t_sizes

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        results: list[Tensor] = [feats[0]] * len(feats)
        residual = None
        for i in reversed(range(len(feats))):
            results[i], residual = self.abfs[i](feats[i], residual, self.t_sizes[i])
        return results


def hcl(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """The hierarchical context loss summed over levels (mdistiller's ``hcl_loss``)."""
    total = student[0].new_zeros(())
    for fs, ft in zip(student, teacher):
        loss, weight, norm = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            norm += weight
        total = total + loss / norm
    return total


def levels(out: ModelOutput, preact: bool) -> list[Tensor]:
    """Stage maps without the stem, then the embedding as a 1 x 1 map."""
    maps = out.preact_features if preact else out.features
    assert maps is not None and out.embedding is not None
    return [*maps[1:], out.embedding[:, :, None, None]]


class ReviewKD(Method):
    """``ce_weight*CE + w(step)*reviewkd_weight*sum HCL(ABF(student), teacher)`` (Chen et al. CVPR 2021)."""

    name = "reviewkd"
    description = "Knowledge review: student stages fused deepest-first by attention (ABF), each matched to the teacher's stage by a pyramid MSE (HCL)."
    formula = 'CE + w(step)*sum_i HCL(ABF_i(F_s), G_t^i)'
    citation = "Chen et al. 2021, Distilling Knowledge via Knowledge Review, CVPR (arXiv:2104.09044)"
    Params = ReviewKDParams
    student_needs = frozenset({LOGITS, FEATURES, PREACT_FEATURES, EMBEDDING})
    teacher_needs = frozenset({LOGITS, PREACT_FEATURES, EMBEDDING})

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        for role, model in (("student", student), ("teacher", teacher)):
            require_family(self.name, role, model, "cnn", "convolutional stage maps (B, C, H, W)")

    def extra_modules(self, student: KDModel, teacher: KDModel | None, info: SetupInfo) -> nn.Module:
        assert teacher is not None
        self.check_models(student, teacher)
        probed = []
        for role, model, preact in (("student", student, self.params.student_preact), ("teacher", teacher, True)):
            was = model.training
            model.eval()  # a probe: leave BatchNorm statistics alone
            with torch.no_grad():
                out = model(info.sample.inputs, need=frozenset({FEATURES, PREACT_FEATURES, EMBEDDING}))
            model.train(was)
            found = levels(out, preact)
            if len(found) < 2:
                raise IncompatibleModelError(f"method 'reviewkd' needs at least one stage after the stem, but the {role} "
                                             f"({type(model).__name__}) exposes {len(found) - 1} feature map(s) in all")
            probed.append(found)
        if len(probed[0]) != len(probed[1]):
            raise IncompatibleModelError(f"method 'reviewkd' matches stage i of the student with stage i of the teacher, but the "
                                         f"student has {len(probed[0]) - 1} stages and the teacher {len(probed[1]) - 1}")
        s, t = probed
        return ReviewFusion([x.shape[1] for x in s], [x.shape[1] for x in t], [tuple(x.shape[-2:]) for x in t]).to(info.device)

    def warmup_weight(self, step: int, total_steps: int) -> float:
        warm = self.params.warmup_fraction * total_steps
        return 1.0 if warm <= 0 else min((step + 1) / warm, 1.0)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None and isinstance(ctx.extra, ReviewFusion), "reviewkd's fusion modules come from extra_modules()"
        p = self.params
        fused = ctx.extra(levels(student, p.student_preact))
        fused = [full_precision(r) for r in fused]  # the loss in float32 under autocast
        review = hcl(fused, [full_precision(g).to(fused[0].dtype) for g in levels(teacher, True)])
        ce = task_loss(student.logits, batch.labels, self.problem)
        w = self.warmup_weight(ctx.step, ctx.total_steps)
        total = p.ce_weight * ce + w * p.reviewkd_weight * review
        return total, {"ce": ce.detach(), "review": review.detach(), "review_weight": torch.tensor(w)}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [ReviewKD]
