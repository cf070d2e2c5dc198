"""``skew-kl`` and ``skew-rkl``: DistiLLM's skewed divergences on the fixed data.

Ko, Kim, Chen, Yun. "DistiLLM: Towards Streamlined Distillation for Large Language
Models." ICML 2024 (arXiv:2402.03898); official code ``jongwooko/distillm``
(``distillm/losses.py``). Per response position, mean over the response mask::

    skew-kl:   KL(p_T || a p_T + (1 - a) p_S)
    skew-rkl:  KL(p_S || a p_S + (1 - a) p_T)

(:func:`kdbench.token_losses.skew_kl`, :func:`~kdbench.token_losses.skew_reverse_kl`).
Default a 0.1 (the paper's). Only the loss is DistiLLM's here: its adaptive off-policy
replay of student-generated outputs is not included, so these runs train on the fixed
reference responses like ``token-kd``. ``teacher_topk: k`` reads the teacher from a cache
of its top-k log-probabilities, renormalised over them (:func:`kdbench.generation.use_topk_teacher`).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdbench.api import Batch, Method, ModelOutput, Options, StepContext, nullable
from kdbench.generation import TokenMethod, response_targets, use_topk_teacher
from kdbench.hookspecs import hookimpl
from kdbench.token_losses import skew_kl, skew_reverse_kl


class SkewParams(Options):
    alpha: float = Field(0.1, ge=0, lt=1, description="skew a: the weight of the target's own distribution in the mixture")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both distributions")
    teacher_topk: int | None = nullable("read the teacher from a cache of its top-k log-probs (renormalised over them)", reads="full", ge=1)


class _Skew(TokenMethod):
    Params = SkewParams

    def setup(self, ctx: StepContext) -> None:
        if self.params.teacher_topk is not None:
            use_topk_teacher(ctx, self.params.teacher_topk)


class SkewKL(_Skew):
    name = "skew-kl"
    description = "Causal LMs: DistiLLM's skew KL(teacher || a teacher + (1-a) student) per response token."
    citation = "Ko et al., DistiLLM, ICML 2024, arXiv:2402.03898"
    Params = SkewParams

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        _, mask = response_targets(batch.inputs)
        value = skew_kl(student.logits, teacher.logits, mask, self.params.alpha, self.params.temperature)
        return value, {"skew_kl": value.detach()}


class SkewReverseKL(_Skew):
    name = "skew-rkl"
    description = "Causal LMs: DistiLLM's skew reverse KL(student || a student + (1-a) teacher) per response token."
    citation = "Ko et al., DistiLLM, ICML 2024, arXiv:2402.03898"
    Params = SkewParams

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        _, mask = response_targets(batch.inputs)
        value = skew_reverse_kl(student.logits, teacher.logits, mask, self.params.alpha, self.params.temperature)
        return value, {"skew_rkl": value.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [SkewKL, SkewReverseKL]
