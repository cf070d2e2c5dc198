"""``metadistil``: the teacher learns to teach through meta-learning, with a pilot update.

Zhou, Xu, McAuley. "BERT Learns to Teach: Knowledge Distillation with Meta Learning."
ACL 2022 (arXiv:2106.04570).

A strategy that wraps any loss-based method (``inner``, default ``kd``; also ``pkd``,
``tinybert``, ``crd``, ...) whose loss ``L_inner(S, T; x, y)`` distils teacher ``T`` into
student ``S``. Each step, on batch ``(x, y)``:

1. **Pilot (virtual) step.** With the teacher in eval mode but with grad, one plain SGD
   step of the student on the inner loss, kept as a differentiable function of ``T``::

       S'(T) = S - eta * grad_S L_inner(S, T; x, y)          (eta = virtual_lr)

2. **Teacher meta step.** The quiz loss of ``S'`` on quiz batches ``(x_q, y_q)`` (the
   objective's task loss alone, :func:`kdbench.api.batch_task_loss`: CE, MSE for
   regression, the reference tokens' NLL over the response positions for generation)::

       g_T = d/dT  mean_q task_loss(S'(T)(x_q), y_q)

   reaches ``T`` only through the student's virtual gradient (second order). ``g_T`` is
   clipped to norm ``teacher_grad_clip`` and the teacher's optimizer steps. The teacher has
   no loss of its own.
3. **Real step.** The inner loss on the **same** batch against the updated teacher
   (teacher outputs recomputed without grad), then ``ctx.student_step``.

Options (besides ``teacher_lr``, ``teacher_optimizer`` and its weight decay / momentum):

* ``quiz_batches``: quiz batches per teacher step, or ``all``: one pass over the whole
  quiz split every teacher step (the official default, ``num_held_batches=0``; its last
  partial batch is dropped as in training). Default 1 (cheaper; not the official one).
* ``quiz_mode``: ``eval`` (default; no dropout, BatchNorm uses its running statistics) or
  ``train`` (BatchNorm normalises with the quiz batch's statistics, as the official CIFAR
  code's virtual student; the student's running statistics are never changed by it).
* ``teacher_schedule`` with ``teacher_start`` (see :func:`kdbench.teacher_updates.teacher_lr_factor`):
  the teacher is fixed for the first ``teacher_start`` of the steps (a step is then a plain
  step of the inner method; the first step always is); from there its lr is ``constant``,
  ``linear`` (to 0 at the end: official GLUE) or ``follow_student`` (the student's schedule
  renormalised to 1 at the start: official CIFAR, with ``teacher_start`` 150/240).
  The official CIFAR code switches at its 1-based epochs 150, 180, 210, i.e. one epoch
  before the student's own decays; here the switches fall on the student's milestones.
  The default ``constant`` is kdbench's, not the official one; on the demo's setting it let
  the live teacher lose 13-20 validation points in 3 of 4 runs where ``linear`` lost none
  (results/quickstart-teacher-cpu; docs/FIDELITY.md says why the default stays).
* ``virtual_schedule``: ``constant`` (official GLUE) or ``follow_student`` (eta times the
  student's lr ratio, not renormalised: official CIFAR, x0.1 at each student decay).
* ``follow_student_schedule: true`` (deprecated) means both schedules ``follow_student``.
* ``teacher_warm_steps``: that many full meta steps at teacher lr 0 just before the teacher
  starts. The parameters do not move, but the optimizer's state does: the official CIFAR
  teacher steps at lr 0 from the first round, so its SGD momentum buffer is full when its
  lr switches on. At momentum ``mu`` the last ``k`` steps give the buffer to within
  ``mu**k`` (66 steps: 0.1% at 0.9). Default 0 (an empty buffer at the switch).
* ``quiz_augment``: the quiz batches get the task's training augmentation (crop and flip
  on CIFAR-100), as the official CIFAR held set does. Default off (quiz on clean inputs).
* The inner method's params as extra top-level fields (e.g. ``inner: pkd, alpha: 0.5,
  beta: 100, temperature: 5, soft_loss: mse``), validated against its Params.

Implementation (exact; no model or optimizer is copied, so any ``nn.Module`` student works).
Write the inner loss as ``L(S, T) = l(s(S), t(T))``, with ``s`` the student's output tensors
the loss reads (logits, hidden states, ...) and ``t`` the teacher's. Then
``grad_S L = J^T v(T)`` with ``J = ds/dS`` and ``v(T) = dl/ds``, and for the quiz gradient
``g = d quiz / dS'`` at ``S'``::

    d/dT <g, S'(T)> = -eta * d/dT <J g, v(T)>        (J g does not depend on T)

so a step runs: the teacher forward (eval mode, with grad) and the student's train-mode
forward once; ``v`` as a small logit-level graph that still reads ``t(T)``; the pilot
gradient ``J^T v`` by a plain first-order backward through the student (its graph kept
for the real step) and ``S' = S - eta J^T v`` as fresh tensors (a dict used through
``torch.func.functional_call``); the quiz gradient ``g`` at ``S'`` batch by batch (one
quiz graph alive at a time, ``S'`` freed after it); ``J g`` by forward-mode AD (one
forward at ``S`` carrying the tangent ``g``, with the pilot forward's dropout masks
replayed from the saved random state and BatchNorm's buffers copied, so running statistics
move once per step); and one backward of ``-eta <J g, v(T)>`` into the teacher. There is
no double backward through the student: the tangent pass costs about 2-3 plain student
forwards and keeps no graph. Where forward mode cannot run (an op without a forward-mode
derivative, a device whose random state cannot be replayed) ``J g`` comes from the kept
graph by reverse over reverse (exact, slower; warned once per run). Helpers:
:func:`kdbench.metagrad.output_derivative` and its neighbours. The real step reuses the
student forward (same weights). The pilot's inner loss runs under ``ctx.rehearsal()``
(on detached copies of the student's outputs): the inner method's random draws and extra
buffers (CRD's negatives and memory banks) are the same in the real step. Extra modules
(e.g. TinyBERT's projection) are not moved by the pilot step. The teacher learns only
through terms of the student's loss that read the teacher's current outputs: CRD's
contrastive term reads the teacher through its memory bank (constants), so wrap CRD with
``alpha > 0`` (CRD+KD).

Defaults: virtual_lr 5e-5, teacher_lr 1e-5 with AdamW, clip 1.0 (the official GLUE code's
values); both schedules constant (the official GLUE teacher lr decays linearly to 0,
``teacher_schedule: linear`` in the ``metadistil-glue`` recipe; its pilot step is
constant); one quiz batch per teacher step (official: the whole quiz set); inner ``kd`` with
its defaults (the official GLUE student loss is ``pkd`` with alpha 0.5, beta 100, T 5 and
``soft_loss: mse``). ``plugins/kdbench_plugins/recipes/metadistil-*.yaml`` hold the official settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from kdbench.api import LOGITS, Batch, KDModel, Method, ModelOutput, Options, Problem, SetupInfo, StepContext, added, batch_task_loss, step_values, wrapped_options
from kdbench.hookspecs import hookimpl
from kdbench.compute import add_passes
from kdbench.metagrad import gradient_or_zeros, meta_step_passes, output_derivative, output_tensors, rng_state, training_mode, virtual_sgd_step
from kdbench.registry import get_registry, inner_method_class
from kdbench.teacher_updates import apply_teacher_gradient, build_teacher_optimizer, first_teacher_step, schedule_ratio, setup_reading_live_teacher, teacher_lr_factor


class MetaDistilParams(Options):
    """MetaDistil's own fields; any other field is a hyper-parameter of the inner method.
    The inner method is looked up in the registry given as validation context
    (``model_validate(data, context={"registry": r})``, as suites are validated), else in
    the process registry."""

    model_config = ConfigDict(extra="allow", frozen=True)

    inner: str = Field("kd", description="the loss-based method whose loss the student is trained on")
    virtual_lr: float = Field(5e-5, gt=0, description="step size of the pilot (virtual) SGD step of the student")
    teacher_lr: float = Field(1e-5, ge=0, description="teacher learning rate (0: the teacher is never updated)")
    teacher_optimizer: Literal["adamw", "sgd"] = "adamw"
    teacher_weight_decay: float = Field(0.0, ge=0)
    teacher_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the teacher optimizer")
    teacher_grad_clip: float | None = Field(1.0, gt=0, description="max norm of the teacher's meta-gradient (null: no clipping)")
    teacher_start: float = Field(0.0, ge=0, lt=1, description="fraction of the steps before the teacher is first updated")
    quiz_batches: Annotated[int, Field(ge=1, le=64)] | Literal["all"] = Field(1, description="quiz batches per teacher step, or all: one pass over the quiz split")
    follow_student_schedule: bool = Field(False, description="deprecated: teacher_schedule and virtual_schedule follow_student")
    teacher_schedule: Literal["constant", "linear", "follow_student"] = added("constant", description="teacher lr schedule from teacher_start")
    virtual_schedule: Literal["constant", "follow_student"] = added("constant", description="virtual_lr constant or times the student's lr ratio")
    quiz_mode: Literal["eval", "train"] = added("eval", description="student mode on quiz batches (train: BatchNorm batch statistics)")
    quiz_augment: bool = added(False, description="quiz batches get the task's training augmentation (the official CIFAR held set does)")
    teacher_warm_steps: int = added(0, ge=0, description="meta steps at teacher lr 0 just before the teacher starts: they fill its optimizer state")
    inner_version: int | None = added(None, description="set from the inner method: its version when above 1, so its changes change run hashes")
    _inner_cls: type[Method] | None = PrivateAttr(None)
    _inner_params: Options | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _deprecated_follow(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("follow_student_schedule") is True:  # stored as false: its old meaning is gone
            data = {"teacher_schedule": "follow_student", "virtual_schedule": "follow_student", **data, "follow_student_schedule": False}
        return data

    @model_validator(mode="after")
    def _validate_inner_params(self, info: ValidationInfo) -> MetaDistilParams:
        registry = (info.context or {}).get("registry") or get_registry()
        inner = inner_method_class(self.inner, registry, "metadistil")
        extras = dict(self.model_extra or {})
        validated = wrapped_options(extras, inner.Params, "metadistil", self.inner, type(self).model_fields)
        # keep only the fields given, in their validated form (stable run hashes)
        self.__pydantic_extra__.clear()  # type: ignore[union-attr]
        self.__pydantic_extra__.update(validated.model_dump(mode="json", include=set(extras)))  # type: ignore[union-attr]
        self._inner_cls, self._inner_params = inner, validated
        object.__setattr__(self, "inner_version", inner.version if inner.version > 1 else None)  # derived, never taken from input
        return self


class MetaDistil(Method):
    """MetaDistil: pilot update + teacher meta step on quiz batches + real step (see module doc)."""

    name = "metadistil"
    description = "MetaDistil: the teacher is meta-updated from the virtual student's quiz loss (pilot update), around any loss-based method."
    citation = "Zhou, Xu, McAuley 2022, ACL, arXiv:2106.04570"
    version = 2  # 2: follow_student_schedule renormalises the teacher lr to 1 at teacher_start (was x the student's ratio)
    Params = MetaDistilParams
    updates_teacher = True
    uses_quiz = True

    def __init__(self, params: MetaDistilParams, problem: Problem):
        super().__init__(params, problem)
        assert params._inner_cls is not None and params._inner_params is not None
        self.inner: Method = params._inner_cls(params._inner_params, problem)
        # what the wrapped loss reads, and whether it compares token positions
        # augments_quiz: read by the runner's quiz stream
        self.student_needs, self.teacher_needs, self.aligned_positions, self.augments_quiz = (  # type: ignore[misc]
            self.inner.student_needs, self.inner.teacher_needs, self.inner.aligned_positions, params.quiz_augment)

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        self.inner.check_models(student, teacher)

    def extra_modules(self, student: KDModel, teacher: KDModel | None, info: SetupInfo) -> nn.Module | None:
        return self.inner.extra_modules(student, teacher, info)

    def setup(self, ctx: StepContext) -> None:
        assert ctx.teacher is not None
        setup_reading_live_teacher(self.inner, ctx, "metadistil")
        ctx.state["teacher_optimizer"] = build_teacher_optimizer(ctx.teacher, self.params.teacher_optimizer, self.params.teacher_lr,
                                                                 self.params.teacher_weight_decay, self.params.teacher_momentum)
        ctx.state["student_initial_lr"] = ctx.student_optimizer.param_groups[0]["lr"]

    def first_meta_step(self, total_steps: int) -> int:
        """The first (0-based) meta step (``total_steps``: none). Warm steps run before
        first_teacher_step, where teacher_lr_factor is 0: only the optimizer state moves."""
        first = max(first_teacher_step(self.params.teacher_start, total_steps) - self.params.teacher_warm_steps, 1)
        return min(first, total_steps) if self.params.teacher_lr > 0 else total_steps

    def meta_active(self, ctx: StepContext) -> bool:
        return ctx.step >= self.first_meta_step(ctx.total_steps)

    def planned_passes(self, steps: int, batch_size: int, quiz_size: int) -> dict[str, int] | None:
        """The inner method's plain steps, then meta steps (:func:`kdbench.metagrad.meta_step_passes`)."""
        meta = steps - self.first_meta_step(steps)
        plain = self.inner.planned_passes(steps - meta, batch_size, quiz_size)
        return None if plain is None else add_passes(plain, meta_step_passes(self.n_quiz_batches(quiz_size, batch_size)), meta)

    def virtual_step_size(self, ctx: StepContext) -> float:
        """eta of the pilot step: ``virtual_lr``, times the student's lr ratio under ``follow_student``."""
        return self.params.virtual_lr * (schedule_ratio(ctx) if self.params.virtual_schedule == "follow_student" else 1.0)

    def n_quiz_batches(self, quiz_size: int, batch_size: int) -> int:
        if self.params.quiz_batches != "all":
            return int(self.params.quiz_batches)
        if quiz_size <= 0:
            raise RuntimeError("metadistil quiz_batches 'all' needs the quiz split's size (ctx.quiz_size), which this run does not give")
        return max(quiz_size // batch_size, 1)  # one pass; the batches drop the last partial one

    # -- steps 1 and 2 ------------------------------------------------------------------
    def meta_gradient(self, ctx: StepContext, batch: Batch) -> tuple[list[Tensor], ModelOutput, Tensor]:
        """The teacher's meta-gradient (one tensor per trainable teacher parameter), the
        student's forward on ``batch`` (reusable by the real step) and the quiz loss.
        Changes nothing but the student's BatchNorm statistics (one train-mode forward)."""
        student, teacher = ctx.student, ctx.teacher
        assert teacher is not None
        t_params = [q for q in teacher.parameters() if q.requires_grad]
        named = [(n, q) for n, q in student.named_parameters() if q.requires_grad]
        eta = self.virtual_step_size(ctx)
        with torch.enable_grad(), ctx.autocast(), ctx.rehearsal(), training_mode(teacher, False):
            t_out = teacher(batch.teacher_inputs, need=self.teacher_needs)
            rng = rng_state(ctx.device)  # the student's dropout masks, replayed by the jvp
            s_out = student(batch.inputs, need=self.student_needs)
            s_all, rebuild = output_tensors(s_out)
            leaves = [x.detach().requires_grad_() for x in s_all]
            inner_loss, _ = self.inner.loss(rebuild(leaves), t_out, batch, ctx)
        # v(T) = dL_inner/ds at the student's outputs s: a small graph that still reads T
        v = torch.autograd.grad(inner_loss, leaves, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(v) if g is not None]
        outs, vs = [s_all[i] for i in used], [v[i] for i in used]
        # S' lives only through the quiz pass (the call's argument)
        grad_fast, quiz = self.quiz_gradient(ctx, virtual_sgd_step(named, outs, [g.detach() for g in vs], eta), batch.labels.shape[0])
        s_dot = output_derivative(student, batch.inputs, self.student_needs, used, outs, grad_fast, rng, ctx.state, ctx.autocast)
        del grad_fast
        # d/dT <g, S'(T)> = -eta d/dT <J g, v(T)>: backpropagated from the outputs into T
        phi = sum(((-eta * d) * g).sum() for d, g in zip(s_dot, vs) if d is not None)
        return gradient_or_zeros(phi, t_params), s_out, quiz

    def quiz_gradient(self, ctx: StepContext, leaves: dict[str, Tensor], batch_size: int) -> tuple[dict[str, Tensor], Tensor]:
        """d/dS' of the mean quiz loss by parameter name (those it reaches; first order, one
        quiz graph alive at a time), and that loss."""
        student, n = ctx.student, self.n_quiz_batches(ctx.quiz_size, batch_size)
        grad_fast: dict[str, Tensor] = {}  # the first batch's gradients are taken as they are
        quiz = torch.zeros((), device=ctx.device)
        # train mode reads the batch's BatchNorm statistics; the copies keep the running ones unchanged
        buffers = {k: b.clone() for k, b in student.named_buffers()} if self.params.quiz_mode == "train" else {}
        with training_mode(student, self.params.quiz_mode == "train"):
            for _ in range(n):
                qb = ctx.next_quiz_batch()
                with torch.enable_grad(), ctx.autocast():
                    out: ModelOutput = functional_call(student, {**leaves, **buffers}, (qb.inputs,), {"need": frozenset({LOGITS})})
                    q_loss = batch_task_loss(out, qb, self.problem) / n
                for name, g in zip(leaves, torch.autograd.grad(q_loss, list(leaves.values()), allow_unused=True)):
                    if g is not None:
                        grad_fast[name] = grad_fast[name].add_(g) if name in grad_fast else g
                quiz = quiz + q_loss.detach()
        return grad_fast, quiz

    # -- the whole step -----------------------------------------------------------------
    def train_step(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        if not self.meta_active(ctx):
            return self.inner.train_step(ctx, batch)
        p, teacher = self.params, ctx.teacher
        assert teacher is not None
        ctx.student_optimizer.zero_grad(set_to_none=True)  # the last step's gradients, freed before this step's peak
        t_grads, s_out, quiz = self.meta_gradient(ctx, batch)
        lr = p.teacher_lr * teacher_lr_factor(ctx, p.teacher_schedule, p.teacher_start)
        t_params = [q for q in teacher.parameters() if q.requires_grad]
        norm = apply_teacher_gradient(ctx.state["teacher_optimizer"], t_params, t_grads, lr, p.teacher_grad_clip)
        del t_grads  # the optimizer has them: not alive through the real step
        # 3. real step: the shared student forward against the updated teacher
        t_new = ctx.teacher_forward(batch, self.teacher_needs)
        with ctx.autocast():
            loss, parts = self.inner.loss(s_out, t_new, batch, ctx)
        ctx.student_step(loss)
        return step_values(loss, parts, quiz_loss=quiz, teacher_grad_norm=norm, teacher_lr=torch.tensor(lr, dtype=torch.float64))


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [MetaDistil]
