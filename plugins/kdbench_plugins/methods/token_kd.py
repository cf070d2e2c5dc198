"""``token-kd``: word-level (token-level) knowledge distillation for causal LMs: forward KL
from the teacher's next-token distribution at every response position of the fixed data.

Hinton, Vinyals, Dean 2015 (arXiv:1503.02531); Kim and Rush, "Sequence-Level Knowledge
Distillation", EMNLP 2016 (word-level KD, their eq. 4)::

    L = (1 - w) * (1 / |M|) sum_{(b, i) in M} KL(p_T(. | y_<i) / T || p_S(. | y_<i) / T)
        + w * NLL(y)

(``/ T``: both logits divided by the temperature, no ``T^2`` factor, as TRL's GKD with
beta 0 and lambda 0). Defaults: T 1, w 0 (pure distillation). ``teacher_topk: k`` reads the
teacher from a cache of its top-k log-probabilities over the training responses, computed
once, renormalised over those k tokens (:func:`kdbench.generation.use_topk_teacher`).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdbench.api import Batch, Method, ModelOutput, Options, StepContext, nullable
from kdbench.generation import TokenMethod, response_targets, use_topk_teacher
from kdbench.hookspecs import hookimpl
from kdbench.token_losses import forward_kl, response_nll


class TokenKDParams(Options):
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of both distributions")
    teacher_topk: int | None = nullable("read the teacher from a cache of its top-k log-probs (renormalised over them)", reads="full", ge=1)
    label_weight: float = Field(0.0, ge=0, le=1, description="weight w of the reference's NLL")


class TokenKD(TokenMethod):
    name = "token-kd"
    description = "Causal LMs: forward KL(teacher || student) per response token on the fixed data (word-level KD)."
    citation = "Hinton et al. 2015, arXiv:1503.02531; Kim and Rush, EMNLP 2016"
    Params = TokenKDParams

    def setup(self, ctx: StepContext) -> None:
        if self.params.teacher_topk is not None:
            use_topk_teacher(ctx, self.params.teacher_topk)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        p = self.params
        targets, mask = response_targets(batch.inputs)
        kl = forward_kl(student.logits, teacher.logits, mask, p.temperature)
        nll = response_nll(student.logits, targets, mask)
        return (1 - p.label_weight) * kl + p.label_weight * nll, {"kl": kl.detach(), "nll": nll.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [TokenKD]
