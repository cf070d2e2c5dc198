"""``sft``: supervised fine-tuning of a causal LM on the reference responses (labels only,
no teacher): the baseline every language-model distillation method must beat.

    L = -(1 / |M|) sum_{(b, i) in M} log p_S(y_{b,i} | x_b, y_{b,<i})

over the response positions ``M`` (the prompt and padding masked), the end-of-sequence
token included so the student learns to stop.
"""

from __future__ import annotations

from torch import Tensor

from kdbench.api import Batch, Method, ModelOutput, StepContext
from kdbench.generation import TokenMethod, response_targets
from kdbench.hookspecs import hookimpl
from kdbench.token_losses import response_nll


class SFT(TokenMethod):
    name = "sft"
    description = "Causal LMs: next-token cross-entropy on the reference responses (labels only, no teacher)."
    citation = "the standard maximum-likelihood baseline"
    uses_teacher = False
    teacher_needs = frozenset()

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        targets, mask = response_targets(batch.inputs)
        nll = response_nll(student.logits, targets, mask)
        return nll, {"nll": nll.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [SFT]
