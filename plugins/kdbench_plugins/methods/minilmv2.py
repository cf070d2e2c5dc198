"""``minilmv2``: multi-head self-attention relation distillation.

Wang, Bao, Huang, Dong, Wei. "MiniLMv2: Multi-Head Self-Attention Relation Distillation
for Compressing Pretrained Transformers." Findings of ACL 2021 (arXiv:2012.15828).

A layer's queries, keys and values (each (B, A, L, d), concatenated over the model's own A
heads to width H) are re-split into A_r *relation heads* of width H / A_r, the same A_r for
teacher and student, so the two may differ in hidden size and in head count. For each of
Q-Q, K-K and V-V::

    R_XX[a] = softmax(X_a X_a^T / sqrt(H / A_r))                     (L x L per relation head)
    L_XX    = 1/(A_r |x|) sum_a sum_t KL(R^t_XX[a, t] || R^s_XX[a, t])
    L       = w_relation * (L_QQ + L_KK + L_VV) + ce_weight * CE(s, y) + kd_weight * T^2 * KL(logits)

Layers: the student's last layer learns the teacher's ``teacher_layer``: the paper takes
the last layer of base-size teachers and an upper-middle one of large teachers (e.g. layer
21 of 24; set ``teacher_layer: 20`` 0-based). ``relation_heads`` must divide both widths;
default 12 (our reading of the paper's base-size setting; 48 for large teachers). As for
MiniLM, the paper distils task-agnostically and then fine-tunes; here the task's CE (and
optionally KD) is added on the task (defaults w_relation 1, CE 1, KD 0). Pairs must share a
tokenizer. Padded keys are left out of every softmax and padded queries out of the mean.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdbench.api import (KEYS, LOGITS, QUERIES, VALUES, Batch, IncompatibleModelError, KDModel, Method, ModelOutput, Options, StepContext,
                         resolve_layer, task_loss)
from kdbench.hookspecs import hookimpl
from kdbench.losses import relation_kl, relation_logits, soft_loss


class MiniLMv2Params(Options):
    w_relation: float = Field(1.0, ge=0, description="weight of L_QQ + L_KK + L_VV")
    ce_weight: float = Field(1.0, ge=0, description="weight of the task loss (CE; MSE for regression)")
    kd_weight: float = Field(0.0, ge=0, description="weight of the KD term on the logits")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KD term")
    relation_heads: int = Field(12, gt=0, description="relation heads A_r (must divide both models' widths)")
    teacher_layer: int = Field(-1, description="the teacher layer distilled (0-based; negative from the last)")
    student_layer: int = Field(-1, description="the student layer that learns it (0-based; negative from the last)")


class MiniLMv2(Method):
    """``w_relation*(L_QQ + L_KK + L_VV) + ce_weight*CE + kd_weight*KD`` over relation heads (Wang et al. 2021)."""

    name = "minilmv2"
    description = "MiniLMv2: KL of query-query, key-key and value-value relations over re-split relation heads (widths and head counts may differ), + task loss."
    formula = "w*sum_{X in Q,K,V} KL(softmax(X_t X_t^T/sqrt d_r)||softmax(X_s X_s^T/sqrt d_r)) over A_r heads + ce_weight*CE + kd_weight*KD"
    citation = "Wang et al. 2021, MiniLMv2: Multi-Head Self-Attention Relation Distillation, Findings of ACL (arXiv:2012.15828)"
    Params = MiniLMv2Params
    student_needs = frozenset({LOGITS, QUERIES, KEYS, VALUES})
    teacher_needs = frozenset({LOGITS, QUERIES, KEYS, VALUES})
    aligned_positions = "it compares query/key/value relations over the same token positions in both models"

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        p = self.params
        for role, model, index in (("student", student, p.student_layer), ("teacher", teacher, p.teacher_layer)):
            facts = model.describe() if model is not None else {}
            if "num_layers" in facts:
                resolve_layer(self.name, role, index, facts["num_layers"])
            width = facts.get("hidden_size")
            if width is not None and width % p.relation_heads:
                raise IncompatibleModelError(f"method 'minilmv2' splits each layer into relation_heads {p.relation_heads}, which does not "
                                             f"divide the {role}'s width {width}; choose a common divisor of both widths")

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        p = self.params
        mask = student.attention_mask
        parts: dict[str, Tensor] = {}
        for name in ("queries", "keys", "values"):
            s_all, t_all = getattr(student, name), getattr(teacher, name)
            assert s_all is not None and t_all is not None
            i = resolve_layer(self.name, "student", p.student_layer, len(s_all))
            j = resolve_layer(self.name, "teacher", p.teacher_layer, len(t_all))
            parts[name[0] * 2] = relation_kl(relation_logits(s_all[i], p.relation_heads), relation_logits(t_all[j], p.relation_heads), mask)
        relation = parts["qq"] + parts["kk"] + parts["vv"]
        ce = task_loss(student.logits, batch.labels, self.problem)
        kd = soft_loss(student.logits, teacher.logits, p.temperature, self.problem)
        total = p.w_relation * relation + p.ce_weight * ce + p.kd_weight * kd
        return total, {**{k: v.detach() for k, v in parts.items()}, "ce": ce.detach(), "kd": kd.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [MiniLMv2]
