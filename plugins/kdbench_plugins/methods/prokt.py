"""``prokt``: Progressive Knowledge Transfer, the teacher trained along with the student.

Shi, Zhou, Wang, Li. "Follow Your Path: a Progressive Method for Knowledge Distillation."
ECML-PKDD 2021 (arXiv:2107.09305).

Each step, on the same batch (``p = softmax(logits / T)``, ``sg`` = stop-gradient):

1. teacher step on ``L_T = (1 - lambda) * CE(t, y) + lambda * T^2 * KL(sg(p_S) || p_T)``:
   the teacher learns the task while staying reachable for the student;
2. student step on ``L_S = alpha * T^2 * KL(p_T' || p_S) + (1 - alpha) * CE(s, y)``
   against the just-updated teacher ``T'`` (``alpha = 1``: the paper's pure KL).

Regression: ``L_T = (1 - lambda) * MSE(t, y) + lambda * MSE(t, sg(s))`` and
``L_S = alpha * MSE(s, t') + (1 - alpha) * MSE(s, y)``.

The run's teacher is a private trainable copy. Its update forward runs in train mode
(dropout, BatchNorm statistics, as in fine-tuning; ``teacher_train_mode``); the targets
for the student come from eval mode. The student forward is computed once and reused for
both objectives (the student's weights do not change in between). The teacher optimizer
(``teacher_optimizer``, ``teacher_lr``, ``teacher_weight_decay``, ``teacher_momentum``)
keeps a constant learning rate unless ``follow_student_schedule`` scales it by the
student's current lr / initial lr.

Where the teacher starts (``teacher_init``): ``pretrained`` (default, the paper's premise
that the student should follow the teacher's path from the start, not chase a converged
teacher) takes the teacher model's pretrained weights with a new task head, as
``ctx.build_teacher`` gives them (for a model without pretrained weights, a fresh
initialisation); ``finetuned`` starts from kdbench's fine-tuned teacher (version 1's only
behaviour).

Defaults (the paper's GLUE setting): lambda 0.4, T 1, teacher lr 3e-5 with AdamW
(the student's lr 1e-4 is set in the suite's optimizer), teacher from pretrained weights.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdbench.api import LOGITS, Batch, KDBenchError, Method, ModelOutput, Objective, Options, Problem, StepContext, step_values, task_loss
from kdbench.hookspecs import hookimpl
from kdbench.losses import soft_loss
from kdbench.teacher_updates import build_teacher_optimizer, schedule_ratio


def teacher_objective(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, lam: float, temperature: float,
                      problem: Problem | Objective) -> tuple[Tensor, Tensor, Tensor]:
    """(L_T, its task part, its KL(p_S || p_T) part); the student's logits are detached."""
    s = student_logits.detach()
    task = task_loss(teacher_logits, labels, problem)
    if problem.label_layout == "value":
        pull = F.mse_loss(teacher_logits.float(), s.float())
    else:  # KL(p_S || p_T): soft_loss(x, y) is KL(p_y || p_x)
        pull = soft_loss(teacher_logits, s, temperature, problem)
    return (1 - lam) * task + lam * pull, task, pull


def student_objective(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, temperature: float,
                      problem: Problem | Objective) -> tuple[Tensor, Tensor, Tensor]:
    """(L_S, its soft part KL(p_T' || p_S), its task part)."""
    soft = soft_loss(student_logits, teacher_logits.detach(), temperature, problem)
    hard = task_loss(student_logits, labels, problem) if alpha < 1 else soft.new_zeros(())
    return alpha * soft + (1 - alpha) * hard, soft, hard


class ProKTParams(Options):
    lam: float = Field(0.4, ge=0, le=1, description="lambda: weight of the teacher's pull toward the student")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of both KL terms")
    alpha: float = Field(1.0, ge=0, le=1, description="student: weight of KL(p_T'||p_S); 1 - alpha goes to CE")
    teacher_lr: float = Field(3e-5, ge=0, description="teacher learning rate")
    teacher_optimizer: Literal["adamw", "sgd"] = "adamw"
    teacher_weight_decay: float = Field(0.0, ge=0)
    teacher_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the teacher optimizer")
    teacher_train_mode: bool = Field(True, description="run the teacher's update forward in train mode (dropout, BN statistics)")
    follow_student_schedule: bool = Field(False, description="scale the teacher lr by the student's lr schedule")
    teacher_init: Literal["pretrained", "finetuned"] = Field(
        "pretrained", description="start the teacher from its pretrained weights with a new head (paper) or from kdbench's fine-tuned teacher")


class ProKT(Method):
    """ProKT: teacher and student updated in turn on each batch (see module doc)."""

    name = "prokt"
    version = 2  # 2: the teacher starts from its pretrained weights by default (teacher_init), not the fine-tuned one
    description = "ProKT: the teacher steps on (1-lambda)*CE + lambda*KL(p_S||p_T), then the student on KL(p_T'||p_S)."
    formula = "teacher: (1-lambda)*CE(t) + lambda*KL(p_s||p_t); student: KL(p_t'||p_s)"
    citation = "Shi, Zhou, Wang, Li 2021, ECML-PKDD, arXiv:2107.09305"
    Params = ProKTParams
    updates_teacher = True
    student_needs = frozenset({LOGITS})
    teacher_needs = frozenset({LOGITS})

    def setup(self, ctx: StepContext) -> None:
        assert ctx.teacher is not None
        p = self.params
        if p.teacher_init == "pretrained":
            if ctx.build_teacher is None:
                raise KDBenchError("prokt with teacher_init 'pretrained' needs the teacher's pretrained weights, but this run "
                                   "gives no ctx.build_teacher; set teacher_init: finetuned to start from the fine-tuned teacher")
            ctx.teacher.load_state_dict(ctx.build_teacher().state_dict())  # in place: the run's teacher stays the same object
        ctx.state["teacher_optimizer"] = build_teacher_optimizer(ctx.teacher, p.teacher_optimizer, p.teacher_lr, p.teacher_weight_decay, p.teacher_momentum)
        ctx.state["student_initial_lr"] = ctx.student_optimizer.param_groups[0]["lr"]

    def planned_passes(self, steps: int, batch_size: int, quiz_size: int) -> dict[str, int]:
        """Per step: a student forward; the teacher's train-mode forward and backward (the
        student detached); its forward again for the student's targets; the student's backward."""
        return {"student_fwd": steps, "student_bwd": steps, "teacher_fwd": 2 * steps, "teacher_bwd": steps}

    def train_step(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        p, teacher = self.params, ctx.teacher
        assert teacher is not None
        t_opt: torch.optim.Optimizer = ctx.state["teacher_optimizer"]
        if p.follow_student_schedule:
            for group in t_opt.param_groups:
                group["lr"] = p.teacher_lr * schedule_ratio(ctx)
        with ctx.autocast():
            s_out: ModelOutput = ctx.student(batch.inputs, need=self.student_needs)
        # 1. teacher step, the student detached
        was_training = teacher.training
        teacher.train(p.teacher_train_mode)
        try:
            with ctx.autocast():
                t_logits = teacher(batch.teacher_inputs, need=self.teacher_needs).logits
                t_loss, t_task, t_pull = teacher_objective(t_logits, s_out.logits, batch.labels, p.lam, p.temperature, self.problem)
            t_opt.zero_grad(set_to_none=True)
            t_loss.backward()
            t_opt.step()
        finally:
            teacher.train(was_training)
        # 2. student step against the updated teacher (targets without grad, eval mode)
        t_new = ctx.teacher_forward(batch, self.teacher_needs)
        with ctx.autocast():
            loss, soft, hard = student_objective(s_out.logits, t_new.logits, batch.labels, p.alpha, p.temperature, self.problem)
        ctx.student_step(loss)
        return step_values(loss, {"soft": soft, "hard": hard}, teacher_loss=t_loss, teacher_task=t_task, teacher_pull=t_pull)


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [ProKT]
