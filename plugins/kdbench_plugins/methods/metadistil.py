"""``metadistil``: the teacher learns to teach through meta-learning, with a pilot update.

Zhou, Xu, McAuley. "BERT Learns to Teach: Knowledge Distillation with Meta Learning."
ACL 2022 (arXiv:2106.04570).

A strategy that wraps any loss-based method (``inner``, default ``kd``) whose loss
``L_inner(S, T; x, y)`` distils teacher ``T`` into student ``S``. Each step, on batch
``(x, y)``:

1. **Pilot (virtual) step.** With the teacher in eval mode but with grad, one plain SGD
   step of the student on the inner loss, kept as a differentiable function of ``T``::

       S'(T) = S - eta * grad_S L_inner(S, T; x, y)          (eta = virtual_lr)

2. **Teacher meta step.** The quiz loss of ``S'`` on ``quiz_batches`` quiz batches
   ``(x_q, y_q)`` (task loss only: CE, or MSE for regression), with ``S'`` in eval mode (no
   dropout; BatchNorm normalises with its running statistics and does not change them)::

       g_T = d/dT  mean_q task_loss(S'(T)(x_q), y_q)

   reaches ``T`` only through the student's virtual gradient (second order). ``g_T`` is
   clipped to norm ``teacher_grad_clip`` and the teacher's optimizer steps. The teacher has
   no loss of its own.
3. **Real step.** The inner loss on the **same** batch against the updated teacher
   (teacher outputs recomputed without grad), then the student's normal optimizer and
   scheduler step.

Implementation: ``S'`` is a dict of tensors used through ``torch.func.functional_call``;
no model or optimizer is copied and no functional model is hand-written, so any
``nn.Module`` student works (BERT; CNNs with BatchNorm). The student's weights and
optimizer state are never touched by the pilot step. The student's forward on ``(x, y)``
(train mode) is computed once and shared by the pilot and the real step: the weights are
the same in both, so the real step's loss is recomputed only against the updated teacher,
and BatchNorm's running statistics are updated once per step, as in a plain step. The quiz
gradient is taken w.r.t. ``S'`` batch by batch and pulled back to ``T`` in one
second-order backward, so memory does not grow with ``quiz_batches``. The student's extra
modules (e.g. TinyBERT's projection) are not moved by the pilot step: ``S'`` depends on
them, but the quiz loss does not.

Before ``teacher_start * total_steps`` steps the teacher is fixed and a step is a plain
step of the inner method (the CIFAR recipe keeps the teacher lr at 0 for 150 of 240
epochs). ``follow_student_schedule`` scales ``teacher_lr`` and ``virtual_lr`` by the
student's current lr / initial lr (the CIFAR recipe decays them with the student's).

Params: the wrapper's own fields below, plus the inner method's hyper-parameters as extra
top-level fields (e.g. ``inner: pkd, alpha: 0.5, beta: 100, temperature: 5``), validated
against the inner method's Params.

Defaults (official GLUE code): virtual_lr 5e-5, teacher_lr 1e-5 with AdamW, clip 1.0,
one quiz batch per step, teacher updated from the first step, inner ``kd`` with its own
defaults (the official GLUE student loss is ``pkd`` with alpha 0.5, beta 100, T 5).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from kdbench.api import LOGITS, Batch, KDModel, Method, ModelOutput, Options, Problem, SetupInfo, StepContext, task_loss
from kdbench.hookspecs import hookimpl
from kdbench.registry import UnknownNameError, did_you_mean, get_registry
from kdbench_plugins.methods.prokt import build_teacher_optimizer, schedule_ratio


def inner_method_class(name: str) -> type[Method]:
    """The loss-based method MetaDistil wraps; ValueError for anything else."""
    registry = get_registry()
    try:
        cls = registry.method(name)
    except UnknownNameError:
        usable = [n for n in registry.names("methods") if _is_loss_based(registry.method(n))]
        raise ValueError(f"unknown inner method '{name}'.{did_you_mean(name, usable)} Loss-based methods: {', '.join(usable) or '(none)'}") from None
    if not cls.uses_teacher:
        raise ValueError(f"inner method '{name}' does not use a teacher, so the teacher would get no meta-gradient")
    if not _is_loss_based(cls):
        raise ValueError(f"inner method '{name}' updates the teacher or runs its own training step; "
                         "metadistil needs a loss-based method (one that only implements loss())")
    return cls


def _is_loss_based(cls: type[Method]) -> bool:
    return cls.uses_teacher and not cls.updates_teacher and cls.train_step is Method.train_step


class MetaDistilParams(Options):
    """MetaDistil's own fields; any other field is a hyper-parameter of the inner method."""

    model_config = ConfigDict(extra="allow", frozen=True)

    inner: str = Field("kd", description="the loss-based method whose loss the student is trained on")
    virtual_lr: float = Field(5e-5, gt=0, description="step size of the pilot (virtual) SGD step of the student")
    teacher_lr: float = Field(1e-5, ge=0, description="teacher learning rate (0: the teacher is never updated)")
    teacher_optimizer: Literal["adamw", "sgd"] = "adamw"
    teacher_weight_decay: float = Field(0.0, ge=0)
    teacher_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the teacher optimizer")
    teacher_grad_clip: float | None = Field(1.0, gt=0, description="max norm of the teacher's meta-gradient (null: no clipping)")
    teacher_start: float = Field(0.0, ge=0, lt=1, description="fraction of the steps before the teacher is first updated")
    quiz_batches: int = Field(1, ge=1, le=64, description="quiz batches per teacher step")
    follow_student_schedule: bool = Field(False, description="scale teacher_lr and virtual_lr by the student's lr schedule")

    @model_validator(mode="before")
    @classmethod
    def _validate_inner_params(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("inner", "kd")
        if not isinstance(name, str):
            return data  # the field's own type check reports it
        inner = inner_method_class(name)
        extras = {k: v for k, v in data.items() if k not in cls.model_fields}
        allowed = inner.Params.model_fields
        unknown = sorted(set(extras) - set(allowed))
        if unknown:
            own = ", ".join(cls.model_fields)
            raise ValueError(f"unknown field {', '.join(repr(u) for u in unknown)} for metadistil with inner method '{name}'; "
                             f"allowed: {own}, and the inner method's {', '.join(allowed) or '(none)'}")
        try:
            validated = inner.Params(**extras)
        except ValidationError as err:
            why = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
            raise ValueError(f"inner method '{name}' params: {why}") from None
        # keep only the fields given, in their validated form (stable run hashes)
        return {**{k: v for k, v in data.items() if k in cls.model_fields}, **validated.model_dump(mode="json", include=set(extras))}


class MetaDistil(Method):
    """MetaDistil: pilot update + teacher meta step on quiz batches + real step (see module doc)."""

    name = "metadistil"
    description = "MetaDistil: the teacher is meta-updated from the virtual student's quiz loss (pilot update), around any loss-based method."
    citation = "Zhou, Xu, McAuley 2022, ACL, arXiv:2106.04570"
    Params = MetaDistilParams
    updates_teacher = True
    uses_quiz = True

    def __init__(self, params: MetaDistilParams, problem: Problem):
        super().__init__(params, problem)
        inner_cls = inner_method_class(params.inner)
        self.inner: Method = inner_cls(inner_cls.Params(**(params.model_extra or {})), problem)
        self.student_needs = self.inner.student_needs
        self.teacher_needs = self.inner.teacher_needs

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        self.inner.check_models(student, teacher)

    def extra_modules(self, student: KDModel, teacher: KDModel | None, info: SetupInfo) -> nn.Module | None:
        return self.inner.extra_modules(student, teacher, info)

    def setup(self, ctx: StepContext) -> None:
        assert ctx.teacher is not None
        self.inner.setup(ctx)
        p = self.params
        ctx.state["teacher_optimizer"] = build_teacher_optimizer(ctx.teacher, p.teacher_optimizer, p.teacher_lr, p.teacher_weight_decay, p.teacher_momentum)
        ctx.state["student_initial_lr"] = ctx.student_optimizer.param_groups[0]["lr"]

    def meta_active(self, ctx: StepContext) -> bool:
        return self.params.teacher_lr > 0 and ctx.step > self.params.teacher_start * ctx.total_steps

    # -- steps 1 and 2 ------------------------------------------------------------------
    def meta_gradient(self, ctx: StepContext, batch: Batch) -> tuple[list[Tensor], ModelOutput, Tensor]:
        """The teacher's meta-gradient (one tensor per trainable teacher parameter), the
        student's forward on ``batch`` (reusable by the real step) and the quiz loss.
        Changes nothing but the student's BatchNorm statistics (one train-mode forward)."""
        p, student, teacher = self.params, ctx.student, ctx.teacher
        assert teacher is not None
        t_params = [q for q in teacher.parameters() if q.requires_grad]
        named = [(n, q) for n, q in student.named_parameters() if q.requires_grad]
        eta = p.virtual_lr * (schedule_ratio(ctx) if p.follow_student_schedule else 1.0)

        was_training = teacher.training
        teacher.eval()
        try:
            with torch.enable_grad(), ctx.autocast():
                t_out = teacher(batch.inputs, need=self.teacher_needs)
                s_out = student(batch.inputs, need=self.student_needs)
                inner_loss, _ = self.inner.loss(s_out, t_out, batch.labels, ctx)
        finally:
            teacher.train(was_training)
        grads = torch.autograd.grad(inner_loss, [q for _, q in named], create_graph=True, allow_unused=True)
        moved = [(n, q - eta * g) for (n, q), g in zip(named, grads) if g is not None]  # S'(T), differentiable in T

        # quiz gradient w.r.t. S' (first order, one quiz graph alive at a time)
        leaves = {n: w.detach().requires_grad_() for n, w in moved}
        grad_fast = [torch.zeros_like(w) for w in leaves.values()]
        quiz = torch.zeros((), device=inner_loss.device)
        was_training = student.training
        student.eval()  # no dropout; BatchNorm reads its running statistics and leaves them alone
        try:
            for _ in range(p.quiz_batches):
                qb = ctx.next_quiz_batch()
                with torch.enable_grad(), ctx.autocast():
                    out: ModelOutput = functional_call(student, leaves, (qb.inputs,), {"need": frozenset({LOGITS})})
                    q_loss = task_loss(out.logits, qb.labels, self.problem) / p.quiz_batches
                for acc, g in zip(grad_fast, torch.autograd.grad(q_loss, list(leaves.values()), allow_unused=True)):
                    if g is not None:
                        acc += g
                quiz = quiz + q_loss.detach()
        finally:
            student.train(was_training)

        # pull back to the teacher through the pilot step (second order); keep the graph:
        # the real step backpropagates through the same student forward
        t_grads = torch.autograd.grad([w for _, w in moved], t_params, grad_outputs=grad_fast, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(q) if g is None else g for q, g in zip(t_params, t_grads)], s_out, quiz

    # -- the whole step -----------------------------------------------------------------
    def train_step(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        if not self.meta_active(ctx):
            return self.inner.train_step(ctx, batch)
        p, teacher = self.params, ctx.teacher
        assert teacher is not None
        t_grads, s_out, quiz = self.meta_gradient(ctx, batch)

        t_params = [q for q in teacher.parameters() if q.requires_grad]
        for q, g in zip(t_params, t_grads):
            q.grad = g
        if p.teacher_grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(t_params, p.teacher_grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in t_grads]))
        t_opt: torch.optim.Optimizer = ctx.state["teacher_optimizer"]
        if p.follow_student_schedule:
            for group in t_opt.param_groups:
                group["lr"] = p.teacher_lr * schedule_ratio(ctx)
        t_opt.step()
        t_opt.zero_grad(set_to_none=True)

        # 3. real step: the shared student forward against the updated teacher
        t_new = ctx.teacher_forward(batch, self.teacher_needs)
        with ctx.autocast():
            loss, parts = self.inner.loss(s_out, t_new, batch.labels, ctx)
        ctx.student_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.student_optimizer.step()
        if ctx.scheduler is not None:
            ctx.scheduler.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()},
                "quiz_loss": quiz, "teacher_grad_norm": norm.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [MetaDistil]
