"""``tinybert``: TinyBERT-style task-specific distillation (without data augmentation).

Jiao, Yin, Shang, Jiang, Chen, Li, Wang, Liu. "TinyBERT: Distilling BERT for Natural
Language Understanding." Findings of EMNLP 2020 (arXiv:1909.10351).

With ``M`` student and ``N`` teacher layers and the uniform map ``g(m) = floor(m * N / M)``
(``k * m`` when N = k*M; ``g(0) = 0`` is the embedding layer)::

    L_att  = sum_{m=1..M} MSE(A_s^m, A_t^{g(m)})          pre-softmax scores, masked keys 0
    L_hid  = sum_{m=0..M} MSE(H_s^m W_h, H_t^{g(m)})       m = 0: embeddings, same W_h
    L_pred = mean_{b,c} -softmax(t / T)_c * log_softmax(s / T)_c       (soft cross-entropy)
    L      = w_att * L_att + w_hid * L_hid + w_pred * L_pred

``W_h`` (student width -> teacher width, with bias) is a learnable linear projection built
in :meth:`TinyBERT.extra_modules`: it is trained with the student and counted in its cost.
MSEs average over all elements (padding positions included, as the official code does).

Regression: ``L_pred`` is MSE between student and teacher logits (``regression_pred:
teacher``, default) or MSE to the labels (``labels``, what the official code does).

Schedule: ``two_stage: false`` (default) optimises all terms jointly; ``two_stage: true``
spends the first ``stage1_fraction`` of the steps on ``L_att + L_hid`` (intermediate-layer
distillation) and the rest on ``L_pred`` (prediction-layer distillation), inside the same
total budget and one learning-rate schedule (the official code runs two separate trainings).

Attention maps are compared head by head, so teacher and student must have the same
number of heads (refused before training otherwise), unless ``att_weight`` is 0.

``soft_reduction``: ``mean`` (default) averages the soft cross-entropy over batch x
classes, as the official ``soft_cross_entropy`` (``(-p_t * log p_s).mean()``); ``sum`` sums
over classes (version 1's only behaviour, C times larger, which matters in joint mode).

Defaults: T 1, all weights 1, joint schedule, soft CE mean.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import (
    ATTENTION_SCORES,
    HIDDEN_STATES,
    LOGITS,
    Batch,
    IncompatibleModelError,
    KDModel,
    Method,
    ModelOutput,
    Options,
    Objective,
    Problem,
    SetupInfo,
    StepContext,
)
from kdbench.hookspecs import hookimpl
from kdbench.losses import soft_cross_entropy


def uniform_map(student_layers: int, teacher_layers: int) -> list[int]:
    """g(m) = floor(m * N / M) for m = 0..M (g(0) = 0, g(M) = N)."""
    if student_layers > teacher_layers:
        raise IncompatibleModelError(f"tinybert maps student layers onto teacher layers, but the student has {student_layers} "
                                     f"layers and the teacher only {teacher_layers}")
    return [m * teacher_layers // student_layers for m in range(student_layers + 1)]


def attention_loss(student_scores: tuple[Tensor, ...], teacher_scores: tuple[Tensor, ...]) -> Tensor:
    g = uniform_map(len(student_scores), len(teacher_scores))
    return sum(F.mse_loss(s.float(), teacher_scores[g[m + 1] - 1].float()) for m, s in enumerate(student_scores))  # type: ignore[return-value]


def hidden_loss(student_hidden: tuple[Tensor, ...], teacher_hidden: tuple[Tensor, ...], projection: nn.Module) -> tuple[Tensor, Tensor]:
    """(embedding term m = 0, sum of the layer terms m = 1..M)."""
    g = uniform_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    terms = [F.mse_loss(projection(h).float(), teacher_hidden[g[m]].float()) for m, h in enumerate(student_hidden)]
    return terms[0], sum(terms[2:], terms[1])


def prediction_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, problem: Problem | Objective,
                    regression_pred: str, reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """Soft CE over the classes; for one value per example (regression) MSE to the
    teacher's output or to the label (``regression_pred``)."""
    if problem.label_layout == "value":
        target = teacher_logits if regression_pred == "teacher" else labels.view_as(student_logits)
        return F.mse_loss(student_logits.float(), target.float())
    return soft_cross_entropy(student_logits, teacher_logits, temperature, reduction)


class TinyBERTParams(Options):
    temperature: float = Field(1.0, gt=0, description="temperature of the prediction-layer soft cross-entropy")
    att_weight: float = Field(1.0, ge=0, description="weight of the attention-score MSE")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the hidden-state MSE (embeddings included)")
    pred_weight: float = Field(1.0, ge=0, description="weight of the prediction-layer term")
    two_stage: bool = Field(False, description="intermediate layers first, then prediction layer, in one budget")
    stage1_fraction: float = Field(0.5, ge=0, le=1, description="share of the steps spent in stage 1 when two_stage")
    regression_pred: Literal["teacher", "labels"] = Field("teacher", description="regression target of the prediction term")
    soft_reduction: Literal["mean", "sum"] = Field("mean", description="soft CE averaged over batch x classes (official) or summed over classes")


class TinyBERT(Method):
    """TinyBERT task distillation: attention + projected hidden-state + soft-CE terms (see module doc)."""

    name = "tinybert"
    version = 2  # 2: the soft CE averages over batch x classes by default (soft_reduction), as the official code
    description = "TinyBERT-style: attention-score MSE + hidden MSE through a learned W_h (embeddings incl.) + soft CE; optional two stages."
    formula = 'w_att*sum MSE(A_s, A_t) + w_hid*sum MSE(H_s W_h, H_t) + w_pred*softCE(p_t^T, p_s^T)'
    citation = "Jiao et al. 2020, Findings of EMNLP, arXiv:1909.10351"
    Params = TinyBERTParams
    student_needs = frozenset({LOGITS, HIDDEN_STATES, ATTENTION_SCORES})
    teacher_needs = frozenset({LOGITS, HIDDEN_STATES, ATTENTION_SCORES})
    aligned_positions = "it compares hidden states token by token and attention maps query by key, position for position"

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        assert teacher is not None
        s, t = student.describe(), teacher.describe()
        if "num_layers" in s and "num_layers" in t:
            uniform_map(s["num_layers"], t["num_layers"])
        if self.params.att_weight > 0 and s.get("num_heads") != t.get("num_heads"):
            raise IncompatibleModelError(
                f"tinybert compares attention scores head by head, but the student has {s.get('num_heads')} heads and the "
                f"teacher {t.get('num_heads')}; use models with equal head counts or set att_weight: 0")

    def extra_modules(self, student: KDModel, teacher: KDModel | None, info: SetupInfo) -> nn.Module:
        assert teacher is not None
        s_width, t_width = student.describe().get("hidden_size"), teacher.describe().get("hidden_size")
        if s_width is None or t_width is None:  # probe a forward pass for models that do not describe their width
            with torch.no_grad():
                s_width = student(info.sample.inputs, need=frozenset({HIDDEN_STATES})).hidden_states[-1].shape[-1]
                t_width = teacher(info.sample.teacher_inputs, need=frozenset({HIDDEN_STATES})).hidden_states[-1].shape[-1]
        return nn.Linear(s_width, t_width)

    def in_stage1(self, ctx: StepContext) -> bool:
        return self.params.two_stage and ctx.step <= int(self.params.stage1_fraction * ctx.total_steps)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None and ctx.extra is not None
        p = self.params
        zero = student.logits.new_zeros((), dtype=torch.float32)
        intermediate = not p.two_stage or self.in_stage1(ctx)
        prediction = not p.two_stage or not self.in_stage1(ctx)
        att = emb = hid = pred = zero
        if intermediate:
            if p.att_weight > 0:
                att = attention_loss(student.attention_scores, teacher.attention_scores)  # type: ignore[arg-type]
            if p.hidden_weight > 0:
                emb, hid = hidden_loss(student.hidden_states, teacher.hidden_states, ctx.extra)  # type: ignore[arg-type]
        if prediction:
            pred = prediction_loss(student.logits, teacher.logits, batch.labels, p.temperature, self.problem, p.regression_pred, p.soft_reduction)
        loss = p.att_weight * att + p.hidden_weight * (emb + hid) + p.pred_weight * pred
        return loss, {"att": att.detach(), "embedding": emb.detach(), "hidden": hid.detach(), "pred": pred.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [TinyBERT]
