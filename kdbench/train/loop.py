"""The training loop shared by teacher fine-tuning and student runs, and its batches."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch

from kdbench.api import Batch, KDBenchError, KDModel, ModelFactory, iter_batches
from kdbench.spec import Budget
from kdbench.train.cost import CostMeter

Evaluation = dict[str, dict[str, float]]
RoleInputs = tuple[ModelFactory, dict[str, torch.Tensor]]
"""A model's factory and its encoding of one split (what collates that model's inputs)."""


class Diverged(Exception):
    """The training loss became NaN or infinite at ``step``."""

    def __init__(self, step: int, value: float):
        self.step = step
        super().__init__(f"loss became {value} at step {step}")


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on a GPU that has it; nothing otherwise."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        inputs = {k: v.pin_memory() for k, v in inputs.items()}
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def batches(factory: ModelFactory, encoded: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int,
            generator: torch.Generator, device: torch.device, task: Any = None, augment: bool = False,
            meter: CostMeter | None = None, teacher: RoleInputs | None = None) -> Iterator[Batch]:
    """Endless shuffled batches on ``device`` (epoch after epoch, order from ``generator``),
    augmented by the task when asked; time spent here counts as waiting for data.

    ``teacher``: the teacher's factory and encoding of the same split, collated with the
    same example indices into ``Batch.teacher_inputs``. When it is None or its encoding is
    the student's own object (one tokenizer), the batch's two inputs are one object and
    nothing is collated twice."""
    separate = teacher is not None and teacher[1] is not encoded
    if separate and augment:
        raise KDBenchError("a task that augments its inputs needs teacher and student to share one encoding: the augmentation "
                           "draws once per batch and cannot be applied alike to two encodings")
    for index in iter_batches(labels.shape[0], batch_size, generator):
        t0 = time.perf_counter()
        inputs = _to_device(factory.collate(encoded, index), device)
        if augment:
            inputs = task.augment(inputs, generator)
        teacher_inputs = _to_device(teacher[0].collate(teacher[1], index), device) if separate else inputs  # type: ignore[index]
        batch = Batch(inputs, labels[index].to(device, non_blocking=True), index, teacher_inputs)
        if meter is not None:
            meter.data_wait += time.perf_counter() - t0
        yield batch


def ordered_batches(factory: ModelFactory, encoded: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int,
                    device: torch.device, teacher: RoleInputs | None = None) -> Iterator[Batch]:
    """One pass over a split in example order (the last batch may be smaller), both roles'
    inputs collated as in :func:`batches`, no augmentation: what a method that
    precomputes something per training example (``StepContext.train_batches``) reads."""
    separate = teacher is not None and teacher[1] is not encoded
    n = labels.shape[0]
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n))
        inputs = _to_device(factory.collate(encoded, index), device)
        teacher_inputs = _to_device(teacher[0].collate(teacher[1], index), device) if separate else inputs  # type: ignore[index]
        yield Batch(inputs, labels[index].to(device, non_blocking=True), index, teacher_inputs)


def _check_finite(pending: list[torch.Tensor], first_step: int) -> None:
    losses = torch.stack([p.float() for p in pending]).cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        first = int(bad[0, 0])
        raise Diverged(first_step + first, float(losses[first]))


def train_loop(*, model: KDModel, step_fn: Callable[[Batch, int], dict[str, torch.Tensor]], batches: Iterator[Batch],
               steps: int, budget: Budget, evaluate_fn: Callable[[int, bool], Evaluation], meter: CostMeter,
               on_log: Callable[[int, dict[str, float]], None] = lambda s, v: None,
               on_eval: Callable[[int, Evaluation], None] = lambda s, m: None,
               desc: str = "", progress: bool = False,
               eval_extras: Callable[[], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run ``steps`` steps of ``step_fn``, evaluating every ``budget.eval_every`` steps and
    at the end (``evaluate_fn(step, is_last)``); returns the evaluation history. Losses stay on the device between log
    points so the step needs no host synchronisation; a non-finite one raises
    :class:`Diverged` naming its step. ``eval_extras`` (optional) adds entries to each
    evaluation's history entry (a trainable teacher's drift), timed as evaluation;
    ``on_eval`` sees the split metrics only."""
    eval_points = set(range(budget.eval_every, steps + 1, budget.eval_every)) if budget.eval_every else set()
    eval_points.add(steps)
    history: list[dict[str, Any]] = []
    pending: list[torch.Tensor] = []
    pending_start = 1
    bar = _progress(steps, desc, progress)
    model.train()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        values = step_fn(next(batches), step - 1)
        pending.append(values["loss"])
        if step % budget.log_every == 0 or step in eval_points:
            _check_finite(pending, pending_start)
            on_log(step, {k: float(v) for k, v in values.items()})
            pending, pending_start = [], step + 1
        bar.update(1)
        meter.record_step(time.perf_counter() - t0)
        if step in eval_points:
            t1 = time.perf_counter()
            metrics = evaluate_fn(step, step == steps)
            extras = eval_extras() if eval_extras is not None else {}
            meter.eval_time += time.perf_counter() - t1
            history.append({"step": step, **metrics, **extras})
            on_eval(step, metrics)
    bar.close()
    return history


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    from kdbench.display import terminal_stream

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True, file=terminal_stream())
