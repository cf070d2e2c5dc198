"""``taid``: temporally adaptive interpolated distillation.

Shing, Misaki, Bao, Yokoi, Akiba. "TAID: Temporally Adaptive Interpolated Distillation
for Efficient Knowledge Transfer in Language Models." ICLR 2025 (arXiv:2501.16937);
official code ``SakanaAI/TAID`` (``src/distil_losses/taid.py``). Per response position,
mean over the response mask::

    p_t = softmax((1 - t) sg(z_S) + t z_T)          (sg: stop-gradient)
    L   = KL(p_t || p_S)

with ``t`` rising from ``t_start`` to ``t_end`` by the adaptive rule of
:class:`kdbench.token_losses.TAIDSchedule` (never below the linear schedule over the run's
steps; faster while the loss falls fast). The schedule advances once per training step,
from the first loss computed in that step, so a strategy that computes the loss twice in
a step (MetaDistil's pilot) sees one ``t``. Defaults: the paper's (t_start 0.4, t_end 1,
alpha 5e-4, beta 0.99). ``teacher_topk`` reads the teacher from a top-k cache
(:func:`kdbench.generation.use_topk_teacher`).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdbench.api import Batch, Method, ModelOutput, Options, StepContext, nullable
from kdbench.generation import TokenMethod, response_targets, use_topk_teacher
from kdbench.hookspecs import hookimpl
from kdbench.token_losses import TAIDSchedule, taid_loss


class TAIDParams(Options):
    t_start: float = Field(0.4, ge=0, lt=1, description="initial interpolation t")
    t_end: float = Field(1.0, gt=0, le=1, description="final interpolation t")
    alpha: float = Field(5e-4, ge=0, le=1, description="adaptive step size")
    beta: float = Field(0.99, ge=0, lt=1, description="momentum of the loss's relative change")
    adaptive: bool = Field(True, description="false: the linear schedule alone")
    teacher_topk: int | None = nullable("read the teacher from a cache of its top-k log-probs", reads="full", ge=1)


class TAID(TokenMethod):
    name = "taid"
    description = "Causal LMs: KL from an interpolation of the (detached) student and the teacher, t rising adaptively (TAID)."
    citation = "Shing et al., TAID, ICLR 2025, arXiv:2501.16937"
    Params = TAIDParams

    def setup(self, ctx: StepContext) -> None:
        p = self.params
        ctx.state["taid"] = TAIDSchedule(p.t_start, p.t_end, p.alpha, p.beta, p.adaptive)
        ctx.state["taid_step"] = None  # (step, loss) of the last step whose loss was computed
        if p.teacher_topk is not None:
            use_topk_teacher(ctx, p.teacher_topk)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        schedule: TAIDSchedule = ctx.state["taid"]
        last = ctx.state["taid_step"]
        if last is not None and last[0] != ctx.step:  # a new step: advance t with the previous step's loss
            schedule.update(float(last[1]), last[0], ctx.total_steps)
        _, mask = response_targets(batch.inputs)
        value = taid_loss(student.logits, teacher.logits, schedule.t, mask)
        if last is None or last[0] != ctx.step:
            ctx.state["taid_step"] = (ctx.step, value.detach())
        return value, {"kl": value.detach(), "t": torch.tensor(schedule.t, dtype=torch.float64)}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [TAID]
