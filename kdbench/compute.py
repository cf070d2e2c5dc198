"""Compute counted, not only timed: the forward and backward passes of teacher and student
in a run's training steps, and the floating-point operations of one pass of each.

* :class:`PassCounter` counts passes while its :meth:`~PassCounter.counting` block is open
  (the runner opens it around each training step): a **forward** is a call of the model
  (``model(inputs, need=...)``, also through ``torch.func.functional_call``); a
  **backward** is one autograd pass (``backward()`` or ``torch.autograd.grad``) that
  reaches a forward's outputs, counted once per forward it reaches (a hook on the outputs,
  :func:`torch.autograd.graph.register_multi_grad_hook` with ``mode="any"``); a **jvp**
  is a forward carrying tangents (forward-mode AD inside :func:`kdbench.metagrad.tangent_pass`;
  MetaDistil's ``J g``);
  a **decode** is one step of autoregressive generation (:mod:`kdbench.generation` adds
  them). Teacher outputs a method takes through ``ctx.teacher_forward`` count one teacher
  forward per call, also when they come from the shared cache of precomputed outputs
  (the method consumes them; the cache only saves recomputing them across runs).
  Passes in a method's one-off ``setup`` (precomputed teacher caches) are not counted.
  Memory banks cost no passes (CRD's stores the embeddings of the step's own forwards);
  extra views would (a method that runs the models on two views makes two forwards).
* :func:`pass_flops` counts the FLOPs of one pass of a model on a batch with PyTorch's
  :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matrix multiplications,
  convolutions and attention (elementwise operations, normalisation and the loss are not
  counted). The runner counts them on the run's first training batch and multiplies by
  the passes (:func:`total_flops`); decode steps are counted as passes but not in FLOPs.
* :func:`steps_for_flops`: the steps a compute budget
  (``budget.flops``) buys a method, from its planned passes (:meth:`kdbench.api.Method.planned_passes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from kdbench.metagrad import in_tangent_pass, output_jvp, rng_state, training_mode

ROLES = ("student", "teacher")
#: pass kinds, in the order reports list them
KINDS = ("fwd", "bwd", "jvp", "decode")
#: the kinds whose FLOPs are counted and multiplied out (decode steps are only counted)
FLOP_KINDS = ("fwd", "bwd", "jvp")
COUNTER = "torch.utils.flop_counter.FlopCounterMode: matmul, convolution, attention; counted on the first training batch, multiplied by passes"


def pass_key(role: str, kind: str) -> str:
    """The name of a pass count, e.g. ``student_fwd``."""
    return f"{role}_{kind}"


def add_passes(base: Mapping[str, int], per_step: Mapping[str, int], steps: int) -> dict[str, int]:
    """``base`` plus ``steps`` times ``per_step`` (pass counts by :func:`pass_key`)."""
    out = dict(base)
    for key, n in per_step.items():
        out[key] = out.get(key, 0) + steps * n
    return out


def _float_outputs(output: Any) -> list[Tensor]:
    """The floating-point tensors of a model's output (a ModelOutput or a tensor)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if not dataclasses.is_dataclass(output):
        return []
    found: list[Tensor] = []
    for f in dataclasses.fields(output):
        value = getattr(output, f.name)
        for x in ([value] if isinstance(value, Tensor) else value if isinstance(value, (tuple, list)) else ()):
            if isinstance(x, Tensor) and x.is_floating_point():
                found.append(x)
    return found


class PassCounter:
    """Counts passes of the models :meth:`attach` names by role (see the module doc).
    ``counts`` holds every role and kind (zeros included) once attached."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.active = False
        self._silent: set[str] = set()
        self._handles: list[Any] = []

    @classmethod
    def of(cls, **models: nn.Module | None) -> "PassCounter":
        """A counter attached to each model given by role (``student=..., teacher=...``; None skipped)."""
        counter = cls()
        for role, model in models.items():
            if model is not None:
                counter.attach(role, model)
        return counter

    def attach(self, role: str, model: nn.Module) -> None:
        """Count ``model``'s passes as ``role``'s (``"student"`` or ``"teacher"``)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (allowed: {', '.join(ROLES)})")
        for kind in KINDS:
            self.counts.setdefault(pass_key(role, kind), 0)
        self._handles.append(model.register_forward_hook(lambda module, args, output: self._forward(role, output)))

    def detach(self) -> None:
        """Remove the hooks (the counts stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def add(self, role: str, kind: str, n: int = 1) -> None:
        """Count ``n`` passes of ``kind`` for ``role`` (while counting)."""
        if self.active:
            key = pass_key(role, kind)
            self.counts[key] = self.counts.get(key, 0) + n

    def _forward(self, role: str, output: Any) -> None:
        if not self.active or role in self._silent:
            return
        if in_tangent_pass():
            self.add(role, "jvp")
            return
        self.add(role, "fwd")
        tensors = [t for t in _float_outputs(output) if t.requires_grad]
        if tensors:
            torch.autograd.graph.register_multi_grad_hook(tensors, lambda grad: self.add(role, "bwd"), mode="any")

    @contextlib.contextmanager
    def counting(self) -> Iterator["PassCounter"]:
        """Count the passes made inside (one training step)."""
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def counted_forward(self, role: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``forward`` (e.g. ``ctx.teacher_forward``) counting one ``role`` forward per call,
        whether it runs the model or reads stored outputs; model calls inside are not
        counted again."""
        def call(*args: Any, **kwargs: Any) -> Any:
            self.add(role, "fwd")
            self._silent.add(role)
            try:
                return forward(*args, **kwargs)
            finally:
                self._silent.discard(role)

        return call


def _flops(run: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def pass_flops(model: nn.Module, inputs: Any, need: frozenset[str], train: bool, kinds: tuple[str, ...] = FLOP_KINDS) -> dict[str, int]:
    """FLOPs of one pass of each kind in ``kinds`` of ``model`` on ``inputs`` (in train or
    eval mode as ``train`` says), counted by :class:`~torch.utils.flop_counter.FlopCounterMode`.
    ``bwd``: the gradient of all floating-point outputs with respect to the parameters that
    require grad (0 when none does); ``jvp``: a forward carrying a tangent for each of them
    (:func:`kdbench.metagrad.output_jvp`). Changes nothing: the model's buffers (BatchNorm
    statistics), parameters' gradients, random state and mode are as before."""
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    devices = [inputs_device(inputs)] if inputs_device(inputs).type == "cuda" else []
    out: dict[str, int] = {}
    with torch.random.fork_rng(devices=devices), training_mode(model, train):
        def call() -> Any:
            return functional_call(model, {n: b.clone() for n, b in model.named_buffers()}, (inputs,), {"need": need})

        if "fwd" in kinds:
            with torch.no_grad():
                out["fwd"] = _flops(call)
        if "bwd" in kinds:
            with torch.enable_grad():
                outputs = [t for t in _float_outputs(call()) if t.requires_grad]
                out["bwd"] = _flops(lambda: torch.autograd.grad(outputs, list(params.values()), [torch.ones_like(t) for t in outputs],
                                                                allow_unused=True)) if outputs and params else 0
        if "jvp" in kinds:
            device = inputs_device(inputs)
            state = rng_state(device)
            tangents = {n: torch.ones_like(q) for n, q in params.items()}
            out["jvp"] = _flops(lambda: output_jvp(model, inputs, need, tangents, state, device)) if params and state is not None else 0  # type: ignore[arg-type]
    return out


def inputs_device(inputs: Any) -> torch.device:
    """The device of a batch's input tensors (CPU when it holds none)."""
    for value in (inputs.values() if isinstance(inputs, Mapping) else [inputs]):
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def total_flops(passes: Mapping[str, float], per_pass: Mapping[str, float | None]) -> dict[str, float | None]:
    """``student_flops``, ``teacher_flops`` and ``train_flops``: each role's passes of the
    counted kinds times the FLOPs of one such pass; None for a role with passes of a kind
    whose FLOPs are unknown."""
    out: dict[str, float | None] = {}
    for role in ROLES:
        total: float | None = 0.0
        for kind in FLOP_KINDS:
            n = passes.get(pass_key(role, kind), 0)
            if not n:
                continue
            f = per_pass.get(pass_key(role, kind))
            total = None if f is None or total is None else total + n * f
        out[f"{role}_flops"] = total
    s, t = out["student_flops"], out["teacher_flops"]
    out["train_flops"] = None if s is None or t is None else s + t
    return out


def steps_for_flops(budget: float, planned: Callable[[int], Mapping[str, float]], per_pass: Mapping[str, float | None], max_steps: int) -> int:
    """The most steps (at least 1) whose planned passes cost at most ``budget`` FLOPs
    (per-pass FLOPs from :func:`pass_flops`); ValueError where the budget buys more than
    ``max_steps``. A method's passes per step may change over a run (MetaDistil's teacher
    starts late), so its total is searched, not divided; totals must not decrease with
    the steps."""
    def cost(steps: int) -> float:
        flops = total_flops(planned(steps), per_pass)["train_flops"]
        if flops is None:
            raise ValueError("a planned pass has no counted FLOPs")
        return flops

    if cost(1) <= 0:
        raise ValueError("the counted FLOPs of a step are 0 (nothing the counter sees: matmul, convolution, attention)")
    lo, hi = 1, max_steps
    if cost(hi) < budget:
        raise ValueError(f"a budget of {budget:.3g} FLOPs buys more than {max_steps} steps ({cost(hi):.3g} FLOPs); "
                         "set KDBENCH_MAX_STEPS to allow more")
    while lo < hi:  # the largest steps with cost <= budget (1 if even one step costs more)
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PassFlops:
    """FLOPs of one pass of each kind of the student and the teacher, counted by
    :func:`pass_flops` on ``sample`` (the run's first training batch; the student in train
    mode, the teacher in eval mode, each reading the outputs its method needs) when first
    asked for (:meth:`measure`), and kept in ``per_pass`` by :func:`pass_key`."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, sample: Any, student_needs: frozenset[str], teacher_needs: frozenset[str]):
        self.models = {"student": (student, student_needs, True), "teacher": (teacher, teacher_needs, False)}
        self.sample = sample
        self.per_pass: dict[str, int] = {}

    def measure(self, keys: set[str]) -> None:
        """Count the passes named in ``keys`` (e.g. ``{"student_fwd", "teacher_bwd"}``) not yet counted."""
        for role, (model, needs, train) in self.models.items():
            kinds = tuple(k for k in FLOP_KINDS if pass_key(role, k) in keys and pass_key(role, k) not in self.per_pass)
            if kinds and model is not None:
                found = pass_flops(model, self.sample.inputs_for(role), needs, train, kinds)
                self.per_pass.update({pass_key(role, k): v for k, v in found.items()})


def compute_cost(counter: PassCounter, flops: PassFlops, seconds: float = 0.0) -> dict[str, Any]:
    """The compute fields stored in a run's cost, once its steps are done: ``passes`` (every
    counted pass by :func:`pass_key`), ``pass_flops`` (FLOPs of one pass of each kind made,
    counted now for kinds not counted before training), the totals of :func:`total_flops`,
    ``flops_counter`` (how they were counted) and ``count_s`` (``seconds`` already spent
    counting plus now's: not part of the run's preparation or training). Detaches the counter."""
    t0 = time.perf_counter()
    counter.detach()
    passes = counter.counts
    flops.measure({k for k, n in passes.items() if n})
    per_pass = flops.per_pass
    return {"passes": dict(passes), "pass_flops": {k: v for k, v in per_pass.items() if passes.get(k)},
            **total_flops(passes, per_pass), "flops_counter": COUNTER, "count_s": seconds + time.perf_counter() - t0}
