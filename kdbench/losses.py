"""Distillation losses and teacher-update helpers shared by methods.

Every function here is public and has one formula. ``p = softmax(z / T)`` is a softened
distribution; ``s``/``t`` are student/teacher logits (..., C): (B, C) per example, or
(B, L, V) per token with a ``mask`` (B, L) of the positions that count, over which every
loss here reduces (a position is then what an example is for (B, C): "batch mean" is the
mean over kept positions). Losses run in float32 under half-precision autocast (see
:func:`kdbench.api.full_precision`).

* :func:`standardize_logits`: ``(z - mean(z)) / (std(z) + 1e-7)`` per example (logit
  standardisation, Sun et al. CVPR 2024), the option of every method that softens logits.
* :func:`soften`: ``z / T`` after optional standardisation: the one place softened
  logits are made, so an option of one method is the same formula in all of them.
* :func:`softened_kl`: ``T^2 * KL(p_t || p_s)``, batch mean (Hinton et al.) or element mean.
* :func:`probability_mse`: ``T^2 * mean (p_s - p_t)^2`` (MetaDistil's official GLUE soft term).
* :func:`soft_cross_entropy`: ``-sum_c p_t log p_s`` averaged per example, or per element
  (TinyBERT's official prediction-layer loss).
* :func:`soft_loss`: the soft term of KD-style methods, the objective's (a bare Problem:
  :func:`class_soft_loss` for classification, :func:`logit_mse` for regression).
* :func:`build_teacher_optimizer`, :func:`schedule_ratio`, :func:`teacher_lr_factor`,
  :func:`apply_teacher_gradient`: for methods that update a run's teacher (ProKT, MetaDistil).
* :func:`output_tensors`, :func:`rng_state`, :func:`replayed_rng`, :func:`output_jvp`,
  :func:`output_jvp_reverse`, :func:`output_derivative`, :func:`virtual_sgd_step`,
  :func:`gradient_or_zeros`, :func:`training_mode`: for meta-gradients (MetaDistil):
  directional derivatives ``J g`` of a model's outputs along a direction ``g`` in its
  parameter space, a virtual step and its pull-back.
* :func:`relation_logits`, :func:`relation_kl`: self-attention relations and their KL
  (MiniLM's attention and value relations, MiniLMv2's q/k/v relations over relation heads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.func import functional_call

from kdbench.api import IncompatibleModelError, ModelOutput, Objective, Problem, StepContext, added, flat_positions, full_precision

SoftKind = Literal["kl", "mse"]


#: what logit standardisation adds to the standard deviation (the authors' ``1e-7``)
STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor) -> Tensor:
    """``(z - mean_c z) / (std_c z + 1e-7)`` over the class dimension (the last), with the
    unbiased (n - 1) standard deviation: ``normalize`` of logit standardisation's official
    code (sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py`` lines
    7-10, ``logit.std`` being torch's unbiased default). Sun et al., "Logit
    Standardization in Knowledge Distillation", CVPR 2024 (arXiv:2403.01427)."""
    z = full_precision(logits)
    return (z - z.mean(dim=-1, keepdim=True)) / (STANDARDIZE_EPS + z.std(dim=-1, keepdim=True))


def standardization_option() -> Any:
    """The ``logit_standardization`` field of a method's params: off by default and
    declared with :func:`kdbench.api.added`, so adding it to a method keeps the hashes of
    its stored runs; on, the method's softened terms read :func:`standardize_logits`."""
    return added(False, description="z-score each example's logits before softening (logit standardisation, Sun et al. CVPR 2024: KD+LS, DKD+LS)")


def check_standardization(method: str, problem: Problem | Objective, standardize: bool) -> None:
    """Refuse logit standardisation where it carries no information, before training: a
    regression output is one number (its z-score divides zero by zero), and two classes
    z-score to (+-1/sqrt 2) whatever the margin, so the teacher would only say which class
    wins. It needs a classification task with at least three classes. ``problem``: the
    method's (a :class:`Problem`, or the run's objective, whose problem is read)."""
    problem = problem.problem if isinstance(problem, Objective) else problem
    if standardize and (problem.is_regression or problem.num_labels < 3):
        what = "a regression task has one output" if problem.is_regression else f"with {problem.num_labels} classes every example z-scores to the same two values"
        raise IncompatibleModelError(f"method '{method}': logit_standardization z-scores logits over the classes, and {what}; "
                                     "it needs a classification task with at least 3 classes")


def soften(logits: Tensor, temperature: float | Tensor, standardize: bool = False) -> Tensor:
    """``z / T``, with ``z`` first standardised (:func:`standardize_logits`) when
    ``standardize``: the logits whose softmax a method compares. Every method with a
    ``logit_standardization`` option softens through here. ``temperature`` may be a tensor
    (a learned temperature, CTKD), broadcast against ``logits``."""
    z = standardize_logits(logits) if standardize else full_precision(logits)
    return z / temperature


def softened_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor, reduction: Literal["batchmean", "mean", "none"] = "batchmean",
                mask: Tensor | None = None, standardize: bool = False) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``. ``batchmean``: summed over classes,
    averaged over the batch (the KL itself); ``mean``: averaged over batch x classes, as
    ``nn.KLDivLoss(reduction="mean")`` (PKD's official code), C times smaller; ``none``:
    one value per example (per kept position). ``mask``: the positions that count.
    ``standardize``: both sides' logits z-scored first (see :func:`soften`)."""
    s, t = flat_positions(full_precision(student_logits), mask, full_precision(teacher_logits))
    t = t.to(s.dtype)
    log_p_s = F.log_softmax(soften(s, temperature, standardize), dim=-1)
    log_p_t = F.log_softmax(soften(t, temperature, standardize), dim=-1)
    if reduction == "none":
        return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * temperature**2
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
    return kl / s.shape[-1] if reduction == "mean" else kl  # mean = sum / (B * C), without torch's warning


def probability_mse(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None,
                    standardize: bool = False) -> Tensor:
    """``T^2 * mean_{b,c} (softmax(s/T) - softmax(t/T))^2``: MetaDistil's official GLUE soft
    term (``nn.MSELoss()`` on the softened probabilities, times T^2), on standardised logits
    when ``standardize``."""
    s, t = flat_positions(full_precision(student_logits), mask, full_precision(teacher_logits))
    t = t.to(s.dtype)
    return F.mse_loss(F.softmax(soften(s, temperature, standardize), dim=-1), F.softmax(soften(t, temperature, standardize), dim=-1)) * temperature**2


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: Literal["mean", "sum"] = "mean",
                       mask: Tensor | None = None) -> Tensor:
    """``-softmax(t/T) * log_softmax(s/T)``: ``mean`` averages over batch x classes
    (TinyBERT's official ``soft_cross_entropy``); ``sum`` sums over classes and averages
    over the batch (the cross-entropy per example, C times larger)."""
    s, t = flat_positions(full_precision(student_logits), mask, full_precision(teacher_logits))
    terms = -F.softmax(t.to(s.dtype) / temperature, dim=-1) * F.log_softmax(s / temperature, dim=-1)
    return terms.mean() if reduction == "mean" else terms.sum(-1).mean()


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, problem: Problem | Objective,
              kind: SoftKind = "kl", reduction: Literal["batchmean", "mean"] = "batchmean", mask: Tensor | None = None,
              standardize: bool = False, regression: Literal["logits", "probabilities"] = "logits") -> Tensor:
    """The soft (teacher) term of KD-style losses: the run's objective's
    (:meth:`kdbench.api.Objective.soft_loss`) when ``problem`` is one and ``standardize`` is
    off. Otherwise, classification: :func:`softened_kl` (``kind="kl"``, with ``reduction``)
    or :func:`probability_mse` (``kind="mse"``), on standardised logits when
    ``standardize`` (which the methods allow for classification only, see
    :func:`check_standardization`); regression, where a temperature means nothing:
    :func:`logit_mse`. Regression with ``regression="probabilities"``: :func:`probability_mse`
    of the one-output softmax, identically 0 with zero gradient, what MetaDistil's official
    GLUE code computes on STS-B by default (``"logits"`` is its ``--logits_mse``)."""
    if regression == "probabilities" and (problem.problem if isinstance(problem, Objective) else problem).is_regression:
        return probability_mse(student_logits, teacher_logits, temperature)
    if isinstance(problem, Objective):
        if not standardize:
            return problem.soft_loss(student_logits, teacher_logits, temperature, kind, reduction, mask)
        problem = problem.problem
    if problem.is_regression:
        return logit_mse(student_logits, teacher_logits, mask)
    return class_soft_loss(student_logits, teacher_logits, temperature, kind, reduction, mask, standardize)


def class_soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, kind: SoftKind = "kl",
                    reduction: Literal["batchmean", "mean"] = "batchmean", mask: Tensor | None = None, standardize: bool = False) -> Tensor:
    """The soft term over class distributions: :func:`softened_kl` (``kind="kl"``) or
    :func:`probability_mse` (``kind="mse"``), on standardised logits when ``standardize``."""
    if kind == "mse":
        return probability_mse(student_logits, teacher_logits, temperature, mask, standardize)
    return softened_kl(student_logits, teacher_logits, temperature, reduction, mask, standardize)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean (s - t)^2`` over the logits at the positions ``mask`` keeps (regression's
    soft term)."""
    s, t = flat_positions(full_precision(student_logits), mask, full_precision(teacher_logits))
    return F.mse_loss(s, t.to(s.dtype))


# --------------------------------------------------------------------------- teacher updates


def build_teacher_optimizer(teacher: nn.Module, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """The optimizer of a run's trainable teacher (``name``: ``adamw`` or ``sgd``), over its
    parameters that require grad (the runner enables them for ``updates_teacher`` methods).
    AdamW is the fused implementation where PyTorch has it for the parameters' device (CPU
    and CUDA): the same update rule, one kernel instead of a dozen per parameter
    (``benchmarks/optimizer_step.py`` measures the two)."""
    params = [p for p in teacher.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the teacher has no trainable parameters; the runner enables them for updates_teacher methods (kdbench.api.set_trainable), and the model keeps none of them frozen")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused_available(params) or None)


def fused_available(params: list[Tensor]) -> bool:
    """Whether PyTorch's fused Adam/AdamW kernels take ``params``: floating point tensors,
    all on one CPU or CUDA device."""
    devices = {p.device for p in params}
    return len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)


def schedule_ratio(ctx: StepContext) -> float:
    """The student's current learning rate over its initial one (1.0 before any decay)."""
    group = ctx.student_optimizer.param_groups[0]
    initial = group.get("initial_lr") or ctx.state.get("student_initial_lr") or group["lr"]
    return group["lr"] / initial if initial else 1.0


def first_teacher_step(start: float, total_steps: int) -> int:
    """The first (0-based) step at which a teacher that starts after ``start * total_steps``
    steps is updated; never step 0 (the first step is always a plain student step)."""
    return max(math.ceil(start * total_steps - 1e-9), 1)


def teacher_lr_factor(ctx: StepContext, schedule: Literal["constant", "linear", "follow_student"], start: float) -> float:
    """The factor on a teacher's learning rate at step ``ctx.step`` (0-based) of
    ``ctx.total_steps``: 0 before :func:`first_teacher_step`; from there

    * ``constant``: 1;
    * ``linear``: ``(total - step) / (total - start * total)``: from 1 at the start down
      toward 0 at the end of the run, one decrement per step. With ``start`` 0 this is, step
      for step, ``get_linear_schedule_with_warmup`` without warm-up over the run
      (MetaDistil's official GLUE teacher; its first step, step 0, is a plain step here);
    * ``follow_student``: the student's :func:`schedule_ratio` divided by its value at the
      first active step, so the teacher starts at its full rate and then decays with the
      student (MetaDistil's official CIFAR teacher: full from epoch 150, x0.1 at 180 and
      210 while the student is at x0.1, x0.01, x0.001). The ratio at the first active step
      is kept in ``ctx.state["teacher_ratio_at_start"]``.
    """
    first = first_teacher_step(start, ctx.total_steps)
    if ctx.step < first:
        return 0.0
    if schedule == "linear":
        start_step = int(start * ctx.total_steps)
        return max(0.0, (ctx.total_steps - ctx.step) / max(ctx.total_steps - start_step, 1))
    if schedule == "follow_student":
        at_start = ctx.state.setdefault("teacher_ratio_at_start", schedule_ratio(ctx))
        return schedule_ratio(ctx) / at_start if at_start else 0.0
    return 1.0


def apply_teacher_gradient(optimizer: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor], lr: float, clip: float | None) -> Tensor:
    """One step of the teacher's optimizer on a gradient computed elsewhere (MetaDistil's
    meta-gradient): set ``.grad``, clip to norm ``clip`` (None: no clipping), set every
    group's rate to ``lr``, step and clear. Returns the gradient's norm before clipping."""
    for q, g in zip(params, grads):
        q.grad = g
    if clip is not None:
        norm = nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


# --------------------------------------------------------------------------- directional derivatives


def output_tensors(out: ModelOutput) -> tuple[list[Tensor], Callable[[list[Tensor]], ModelOutput]]:
    """The floating-point tensors of ``out`` (its fields in declaration order, tuples
    flattened; masks and missing fields skipped) and a function that rebuilds ``out`` with
    other tensors in their places (e.g. detached leaves, to differentiate a loss by them)."""
    slots: list[tuple[str, int | None]] = []
    tensors: list[Tensor] = []
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        items = [(None, value)] if isinstance(value, Tensor) else list(enumerate(value or ()))
        for i, x in items:
            if x.is_floating_point():
                slots.append((f.name, i))
                tensors.append(x)

    def rebuild(new: list[Tensor]) -> ModelOutput:
        fields: dict[str, object] = {}
        for (name, i), x in zip(slots, new):
            if i is None:
                fields[name] = x
            else:
                fields.setdefault(name, list(getattr(out, name)))[i] = x  # type: ignore[index]
        return dataclasses.replace(out, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    return tensors, rebuild


def rng_state(device: torch.device) -> Tensor | None:
    """The state of the default generator that random ops (dropout) on ``device`` draw
    from: CPU and CUDA; None on other devices (their draws cannot be replayed here)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state() if device.type == "cpu" else None


@contextlib.contextmanager
def replayed_rng(device: torch.device, state: Tensor) -> Iterator[None]:
    """Inside, the default generator of ``device`` is back at ``state`` (from
    :func:`rng_state`): random ops draw what they drew after it was taken, e.g. the same
    dropout masks. On exit the generator is where it was on entry."""
    def put(s: Tensor) -> None:
        torch.cuda.set_rng_state(s, device) if device.type == "cuda" else torch.set_rng_state(s)

    now = rng_state(device)
    assert now is not None, f"no random state to replay on {device}"
    put(state)
    try:
        yield
    finally:
        put(now)


def output_jvp(model: nn.Module, inputs: object, need: frozenset[str], tangents: dict[str, Tensor], rng: Tensor,
               device: torch.device) -> list[Tensor | None]:
    """``J g`` by forward-mode AD: the derivative of the model's output tensors (as
    :func:`output_tensors` lists them; None where an output does not move) at its current
    parameters along ``tangents`` (by parameter name; the others stay fixed). One forward
    pass that carries tangents (about 2-3 plain forwards, no backward graph). The model
    runs in its current mode; random ops replay ``rng`` (see :func:`replayed_rng`), so a
    train-mode forward sees the dropout masks drawn after ``rng`` was taken; its buffers are
    copies (BatchNorm's running statistics are not updated a second time, its batch
    statistics are differentiated as in the first pass). Raises what the forward raises
    where an op has no forward-mode derivative (then see :func:`output_jvp_reverse`)."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad(), fwad.dual_level(), replayed_rng(device, rng):
        duals = {n: fwad.make_dual(params[n].detach(), t) for n, t in tangents.items()}
        out = functional_call(model, {**duals, **buffers}, (inputs,), {"need": need})
        return [fwad.unpack_dual(x).tangent for x in output_tensors(out)[0]]


def output_jvp_reverse(outputs: list[Tensor], params: list[Tensor], tangents: list[Tensor]) -> list[Tensor | None]:
    """``J g`` from the outputs' retained autograd graph, by reverse over reverse: ``J^T u``
    for a placeholder ``u`` with ``create_graph``, then its derivative along ``g`` with
    respect to ``u``. Exact like :func:`output_jvp` and for any op with a double backward,
    but slower (a backward that builds a graph and a backward through it); the fallback
    where forward-mode AD does not cover the model. ``outputs``' graph is kept."""
    u = [torch.zeros_like(x, requires_grad=True) for x in outputs]
    back = torch.autograd.grad(outputs, params, grad_outputs=u, create_graph=True, retain_graph=True, allow_unused=True)
    pairs = [(b, g) for b, g in zip(back, tangents) if b is not None]
    if not pairs:
        return [None] * len(outputs)
    return list(torch.autograd.grad([b for b, _ in pairs], u, grad_outputs=[g for _, g in pairs], retain_graph=True, allow_unused=True))


def output_derivative(model: nn.Module, inputs: object, need: frozenset[str], used: list[int], outputs: list[Tensor],
                      tangents: dict[str, Tensor], rng: Tensor | None, state: dict, autocast: Callable = contextlib.nullcontext) -> list[Tensor | None]:
    """``J g`` for ``outputs``, the model's output tensors at indices ``used`` of
    :func:`output_tensors` from a forward on ``inputs`` that began with the random state
    ``rng`` and whose graph is kept: :func:`output_jvp` (under ``autocast``), or
    :func:`output_jvp_reverse` where forward mode cannot run (an op without a forward-mode
    derivative, or no ``rng`` on this device). The reason is kept in
    ``state["jvp_fallback"]`` and warned about once: later calls go straight to the fallback."""
    device = outputs[0].device
    reason = state.get("jvp_fallback") or (None if rng is not None else f"no random state to replay on {device}")
    if reason is None:
        try:
            with autocast():
                found = output_jvp(model, inputs, need, tangents, rng, device)  # type: ignore[arg-type]
            return [found[i] for i in used]
        except (RuntimeError, NotImplementedError) as exc:
            reason = f"forward-mode AD failed: {exc}"
    if "jvp_fallback" not in state:
        state["jvp_fallback"] = reason
        warnings.warn(f"{reason}; J g by reverse over reverse instead (exact, slower)", stacklevel=2)
    params = dict(model.named_parameters())
    return output_jvp_reverse(outputs, [params[n] for n in tangents], list(tangents.values()))


def gradient_or_zeros(loss: Tensor | float, params: list[Tensor]) -> list[Tensor]:
    """``d loss / d params``; zeros for the parameters it does not reach (all of them when
    ``loss`` reads none, e.g. a constant)."""
    found = torch.autograd.grad(loss, params, allow_unused=True) if isinstance(loss, Tensor) and loss.requires_grad else [None] * len(params)
    return [torch.zeros_like(q) if g is None else g for q, g in zip(params, found)]


def virtual_sgd_step(named: list[tuple[str, Tensor]], outputs: list[Tensor], cotangents: list[Tensor], eta: float) -> dict[str, Tensor]:
    """``S' = S - eta J^T v``: one plain SGD step of the parameters ``named`` on the loss
    whose gradient at ``outputs`` is ``cotangents`` (``v``), through the outputs' graph
    (kept). New leaves requiring grad, by name; parameters the outputs do not reach are
    left out (they stay as they are)."""
    grads = torch.autograd.grad(outputs, [q for _, q in named], grad_outputs=cotangents, retain_graph=True, allow_unused=True)
    return {n: torch.add(q.detach(), g, alpha=-eta).requires_grad_() for (n, q), g in zip(named, grads) if g is not None}


@contextlib.contextmanager
def training_mode(module: nn.Module, mode: bool) -> Iterator[nn.Module]:
    """Inside, ``module`` is in train (``mode`` True) or eval mode; on exit in the mode it had."""
    was = module.training
    module.train(mode)
    try:
        yield module
    finally:
        module.train(was)


# --------------------------------------------------------------------------- attention relations


def relation_logits(x: Tensor, heads: int | None = None) -> Tensor:
    """``X X^T / sqrt(d)`` per head: ``x`` (B, A, L, d) as a model's q/k/v split into its own
    heads, or, with ``heads`` given, first concatenated over them to (B, L, A*d) and re-split
    into ``heads`` relation heads of width A*d / heads (MiniLMv2's relation heads, which let
    two models of different widths and head counts be compared). Returns (B, heads, L, L)."""
    x = full_precision(x)
    if heads is not None:
        b, a, length, d = x.shape
        if (a * d) % heads:
            raise ValueError(f"{heads} relation heads do not divide the width {a * d}")
        x = x.transpose(1, 2).reshape(b, length, heads, a * d // heads).transpose(1, 2)
    return x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])


def relation_kl(student: Tensor, teacher: Tensor, mask: Tensor | None, probabilities: bool = False) -> Tensor:
    """``KL(R_t || R_s)`` of two (B, A, L, L) relations, row by row over the keys, averaged
    over heads and real query positions (MiniLM's ``1 / (A_h |x|) sum_a sum_t KL``, then the
    batch mean). ``student``/``teacher`` are logits (a softmax over the real keys is taken,
    padded keys masked out) or, with ``probabilities``, already normalised rows such as a
    model's attention probabilities (zero at padded keys). ``mask`` (B, L): real tokens."""
    s, t = full_precision(student), full_precision(teacher).to(full_precision(student).dtype)
    keys = mask[:, None, None, :].bool() if mask is not None else torch.ones(s.shape[0], 1, 1, s.shape[-1], dtype=torch.bool, device=s.device)
    if probabilities:
        log_s, log_t = s.clamp_min(1e-30).log(), t.clamp_min(1e-30).log()
        t_prob = t
    else:
        log_s = F.log_softmax(s.masked_fill(~keys, -torch.inf), dim=-1)
        log_t = F.log_softmax(t.masked_fill(~keys, -torch.inf), dim=-1)
        t_prob = log_t.exp()
    terms = torch.where(keys & (t_prob > 0), t_prob * (log_t - log_s), torch.zeros_like(t_prob)).sum(-1)  # (B, A, L)
    queries = keys.squeeze(2).to(terms.dtype)  # (B, 1, L): real query positions
    per_example = (terms * queries).sum((1, 2)) / (queries.sum((1, 2)) * terms.shape[1])
    return per_example.mean()
