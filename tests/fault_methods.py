"""Methods that misbehave on purpose, registered only by the tests."""

from __future__ import annotations

import torch

from kdbench.api import EMBEDDING, LOGITS, Method, task_loss
from kdbench.hookspecs import hookimpl
from kdbench_plugins.methods.kd import KD


class NanAtStep3(Method):
    name = "nan-at-3"
    description = "labels only, but the loss is NaN from the 3rd step"
    uses_teacher = False

    def loss(self, student, teacher, labels, ctx):
        loss = task_loss(student.logits, labels, self.problem)
        return (loss * float("nan") if ctx.step >= 2 else loss), {}


class Raises(Method):
    name = "raises"
    description = "raises at step 2"
    uses_teacher = False

    def loss(self, student, teacher, labels, ctx):
        if ctx.step == 1:
            raise ValueError("deliberate failure in a method")
        return task_loss(student.logits, labels, self.problem), {}


class LiveKD(KD):
    """KD that asks the teacher for more than logits, so the runner must run it live."""

    name = "kd-live"
    teacher_needs = frozenset({LOGITS, EMBEDDING})


@hookimpl
def kdbench_methods():
    return [NanAtStep3, Raises, LiveKD]
