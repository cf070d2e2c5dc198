"""``minilm``: deep self-attention distillation.

Wang, Wei, Dong, Bao, Yang, Zhou. "MiniLM: Deep Self-Attention Distillation for
Task-Agnostic Compression of Pre-Trained Transformers." NeurIPS 2020 (arXiv:2002.10957).

The student mimics the teacher's last transformer layer: its self-attention distributions
and its value relation, both row-wise KL over the keys, averaged over the A_h heads and
the real query positions (batch mean)::

    L_AT = 1/(A_h |x|) sum_a sum_t KL(A_t[a, t] || A_s[a, t])         (attention probabilities)
    L_VR = 1/(A_h |x|) sum_a sum_t KL(VR_t[a, t] || VR_s[a, t]),  VR = softmax(V_a V_a^T / sqrt(d_k))
    L    = w_relation * (L_AT + L_VR) + ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))

MiniLM distils pre-training (task-agnostic) with L_AT + L_VR alone and then fine-tunes the
student; kdbench distils on the task, so the task's CE (and optionally KD) is added,
weights stated above (defaults: w_relation 1, CE 1, KD 0: the paper's loss plus the
fine-tuning loss). Layers: the paper uses the LAST layer of both models (``teacher_layer``
and ``student_layer``, -1 by default; 0-based indices, negative from the end). The
relations are L x L, so widths may differ; the head counts must match (the paper's
constraint, lifted by MiniLMv2: ``minilmv2``). Pairs must share a tokenizer (token
positions compared). Padded keys are left out of every softmax and padded queries out of
the mean.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdbench.api import (ATTENTION_PROBS, LOGITS, VALUES, Batch, IncompatibleModelError, KDModel, Method, ModelOutput, Options, StepContext,
                         resolve_layer, task_loss)
from kdbench.hookspecs import hookimpl
from kdbench.losses import relation_kl, relation_logits, soft_loss


class MiniLMParams(Options):
    w_relation: float = Field(1.0, ge=0, description="weight of L_AT + L_VR")
    ce_weight: float = Field(1.0, ge=0, description="weight of the task loss (CE; MSE for regression)")
    kd_weight: float = Field(0.0, ge=0, description="weight of the KD term on the logits (0: the paper's loss plus the task loss)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KD term")
    teacher_layer: int = Field(-1, description="the teacher layer distilled (0-based; negative counts from the last)")
    student_layer: int = Field(-1, description="the student layer that learns it (0-based; negative counts from the last)")


def check_layers(method: Method, student: KDModel, teacher: KDModel | None, same_heads: bool) -> None:
    """Layer indices inside both models and, for MiniLM, equal head counts (from describe())."""
    p = method.params
    facts = {"student": student.describe(), "teacher": teacher.describe() if teacher is not None else {}}
    for role, index in (("student", p.student_layer), ("teacher", p.teacher_layer)):  # type: ignore[attr-defined]
        if "num_layers" in facts[role]:
            resolve_layer(method.name, role, index, facts[role]["num_layers"])
    heads = [facts[r].get("num_heads") for r in ("student", "teacher")]
    if same_heads and None not in heads and heads[0] != heads[1]:
        raise IncompatibleModelError(f"method '{method.name}' compares attention head by head, but the student has {heads[0]} heads and "
                                     f"the teacher {heads[1]}; use 'minilmv2', whose relation heads allow different head counts")


def task_terms(method: Method, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> tuple[Tensor, Tensor]:
    """(CE on the labels, KD on the logits) as MiniLM-style methods add them."""
    p = method.params
    return task_loss(student.logits, batch.labels, method.problem), soft_loss(student.logits, teacher.logits, p.temperature, method.problem)  # type: ignore[attr-defined]


class MiniLM(Method):
    """``w_relation*(L_AT + L_VR) + ce_weight*CE + kd_weight*KD`` on one layer pair (Wang et al. NeurIPS 2020)."""

    name = "minilm"
    description = "MiniLM: KL of the last layer's self-attention distributions and value relations (softmax(VV^T/sqrt d)), + task loss."
    formula = "w*(KL(A_t||A_s) + KL(softmax(V_t V_t^T/sqrt d)||softmax(V_s V_s^T/sqrt d))) + ce_weight*CE + kd_weight*KD"
    citation = "Wang et al. 2020, MiniLM: Deep Self-Attention Distillation, NeurIPS (arXiv:2002.10957)"
    Params = MiniLMParams
    student_needs = frozenset({LOGITS, ATTENTION_PROBS, VALUES})
    teacher_needs = frozenset({LOGITS, ATTENTION_PROBS, VALUES})
    aligned_positions = "it compares self-attention over the same token positions in both models"

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        check_layers(self, student, teacher, same_heads=True)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None and student.attention_probs is not None and teacher.attention_probs is not None
        assert student.values is not None and teacher.values is not None
        p = self.params
        i = resolve_layer(self.name, "student", p.student_layer, len(student.values))
        j = resolve_layer(self.name, "teacher", p.teacher_layer, len(teacher.values))
        mask = student.attention_mask
        at = relation_kl(student.attention_probs[i], teacher.attention_probs[j], mask, probabilities=True)
        vr = relation_kl(relation_logits(student.values[i]), relation_logits(teacher.values[j]), mask)
        ce, kd = task_terms(self, student, teacher, batch)
        total = p.w_relation * (at + vr) + p.ce_weight * ce + p.kd_weight * kd
        return total, {"attention": at.detach(), "value_relation": vr.detach(), "ce": ce.detach(), "kd": kd.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [MiniLM]
