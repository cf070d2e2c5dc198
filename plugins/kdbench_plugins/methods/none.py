"""``none``: the student trained on the labels only, the row every KD table needs.

    L = CE(s, y)            (classification)
    L = MSE(s, y)           (regression)

(the task objective's loss, averaged over the positions the student's output mask keeps)
"""

from __future__ import annotations

from torch import Tensor

from kdbench.api import Batch, Method, ModelOutput, StepContext, task_loss
from kdbench.hookspecs import hookimpl


class NoDistillation(Method):
    """Labels only; no teacher is built or read."""

    name = "none"
    description = "No distillation: the student trained on the labels only (the baseline row)."
    formula = 'CE(s, y)'
    uses_teacher = False

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        return task_loss(student.logits, batch.labels, self.problem, student.mask), {}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [NoDistillation]
