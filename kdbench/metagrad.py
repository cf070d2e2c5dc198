"""Meta-gradient machinery (MetaDistil): directional derivatives ``J g`` of a model's
outputs along a direction ``g`` in its parameter space, a virtual step and its pull-back.

* :func:`output_tensors`: a :class:`~kdbench.api.ModelOutput`'s tensors as a flat list,
  and the function that rebuilds the output from such a list.
* :func:`rng_state`, :func:`replayed_rng`: replay a forward pass's random draws (dropout).
* :func:`output_jvp`, :func:`output_jvp_reverse`, :func:`output_derivative`: ``J g`` by
  forward mode, by reverse over reverse, and the choice between them.
* :func:`gradient_or_zeros`, :func:`virtual_sgd_step`, :func:`training_mode`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.func import functional_call

from kdbench.api import ModelOutput


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
    with torch.no_grad(), fwad.dual_level(), replayed_rng(device, rng), tangent_pass():
        duals = {n: fwad.make_dual(params[n].detach(), t) for n, t in tangents.items()}
        out = functional_call(model, {**duals, **buffers}, (inputs,), {"need": need})
        return [fwad.unpack_dual(x).tangent for x in output_tensors(out)[0]]


_TANGENT_PASS = False


@contextlib.contextmanager
def tangent_pass() -> Iterator[None]:
    """Inside, model calls carry tangents (:func:`output_jvp`): :class:`kdbench.compute.PassCounter`
    counts them as jvp passes, not forwards."""
    global _TANGENT_PASS
    previous, _TANGENT_PASS = _TANGENT_PASS, True
    try:
        yield
    finally:
        _TANGENT_PASS = previous


def in_tangent_pass() -> bool:
    """Whether a :func:`tangent_pass` is open."""
    return _TANGENT_PASS


def meta_step_passes(quiz_batches: int) -> dict[str, int]:
    """The passes of one pilot-update meta step (MetaDistil's, by :func:`kdbench.compute.pass_key`):
    a teacher forward with grad and a student forward; the pilot backward through the student
    (:func:`virtual_sgd_step`); a forward and a backward per quiz batch (``n``); ``J g`` (a
    jvp pass, :func:`output_jvp`); one backward into the teacher; the real step's teacher
    forward and student backward (its student forward is the first one's). Teacher 2 fwd +
    1 bwd; student (1 + n) fwd + (2 + n) bwd + 1 jvp. Under :func:`output_jvp_reverse` the
    jvp is a backward and a double backward instead."""
    n = quiz_batches
    return {"teacher_fwd": 2, "teacher_bwd": 1, "student_fwd": 1 + n, "student_bwd": 2 + n, "student_jvp": 1}


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
