"""Evaluating a split through the task's objective (streamed: only what its metrics need
is kept, never every logit), predicting a whole split where logits are needed (a live
teacher's drift, shared teacher outputs), choosing the reported evaluation, and following
a trainable teacher's drift (:class:`TeacherDrift`)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdbench.api import Batch, KDModel, MetricInfo, ModelFactory, ModelOutput, Objective
from kdbench.data import VALIDATION, TaskData

TEACHER = "teacher"  # history key of the live teacher's evaluation (teacher-updating methods)
LIVE_TEACHER = "live_teacher"  # the chosen evaluation's teacher entry, in the run's metrics


def _batched(model: KDModel, factory: ModelFactory, encoded: dict[str, torch.Tensor], batch_size: int, device: torch.device,
             need: frozenset[str], begin: Any, take: Any) -> Any:
    """Run ``model`` over a whole split in eval mode under inference mode: ``begin()``
    makes a fresh accumulator, ``take(acc, output, index, inputs)`` feeds it each batch, and the
    accumulator is returned. On a GPU that runs out of memory the batch is halved and the
    split run again from a fresh accumulator (``batch_size`` is the first try)."""
    was_training = model.training
    model.eval()
    n = next(iter(encoded.values())).shape[0]
    try:
        while True:
            try:
                acc = begin()
                with torch.inference_mode():
                    for start in range(0, n, batch_size):
                        index = torch.arange(start, min(start + batch_size, n))
                        inputs = {k: v.to(device, non_blocking=True) for k, v in factory.collate(encoded, index).items()}
                        take(acc, model(inputs, need=need), index, inputs)
                return acc
            except torch.OutOfMemoryError:
                if batch_size == 1 or device.type != "cuda":
                    raise
                batch_size //= 2
                torch.cuda.empty_cache()
    finally:
        model.train(was_training)


def predict(model: KDModel, factory: ModelFactory, encoded: dict[str, torch.Tensor], batch_size: int, device: torch.device, need: frozenset[str] = frozenset()) -> torch.Tensor:
    """Logits for a whole split (float32, on the CPU), batched, in eval mode: for what
    needs them all (a teacher's shared outputs, a live teacher's drift); scoring a split
    goes through :func:`evaluate_split`, which keeps only what the metrics read."""
    out: list[torch.Tensor] = []
    _batched(model, factory, encoded, batch_size, device, need, lambda: out.clear() or out,
             lambda acc, o, index, inputs: acc.append(o.logits.float().cpu()))
    return torch.cat(out)


def evaluate_split(model: KDModel, factory: ModelFactory, encoded: dict[str, torch.Tensor], labels: torch.Tensor, objective: Objective,
                   batch_size: int, device: torch.device, teacher: KDModel | None = None) -> dict[str, float]:
    """The metrics of ``model`` on one split, streamed through ``objective.start()``: each
    batch's output (with the outputs ``objective.eval_needs`` names) and the batch (its
    inputs on the device, its labels as stored, its indices in the split) go to the
    evaluator's ``update``, which keeps what it chooses (e.g. one class id per example);
    then ``finish``. ``teacher`` (a student's teacher reading the same inputs) is handed
    to the evaluator in eval mode, and put back in its mode after."""
    def take(ev: Any, out: ModelOutput, index: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
        ev.update(out, Batch(inputs=inputs, labels=labels[index], index=index))

    def begin() -> Any:
        ev = objective.start()
        ev.model, ev.teacher = model, teacher  # for evaluators that decode or compare with the teacher (generation)
        return ev

    was = teacher.training if teacher is not None else False
    try:
        if teacher is not None:
            teacher.eval()
        return _batched(model, factory, encoded, batch_size, device, frozenset(objective.eval_needs), begin, take).finish()
    finally:
        if teacher is not None:
            teacher.train(was)


def evaluate(model: KDModel, factory: ModelFactory, data: TaskData, encoded: dict[str, dict[str, torch.Tensor]], batch_size: int, device: torch.device,
             splits: list[str] | None = None, teacher: KDModel | None = None) -> dict[str, dict[str, float]]:
    """The task's metrics on ``splits`` (default: every evaluation split: validation, test).
    The labels reach the evaluator as the task stored them (their own dtype), so the
    metrics read exactly the values a whole-split computation would. ``teacher``: see
    :func:`evaluate_split`."""
    return {split: evaluate_split(model, factory, encoded[split], _label_tensor(data, split), data.objective, batch_size, device, teacher)
            for split in (data.eval_splits if splits is None else splits)}


def _label_tensor(data: TaskData, split: str) -> torch.Tensor:
    """A split's labels as stored (their own dtype); labels that are no numbers (a
    generation task's reference texts, which travel in the inputs) in the objective's
    layout instead."""
    raw = np.asarray(data.labels(split))
    return data.objective.labels(raw) if raw.dtype == object else torch.as_tensor(raw)


class DeferredTest:
    """``evaluate_fn`` for :func:`~kdbench.train.loop.train_loop` under a budget's
    ``test_every_eval: false``: every evaluation scores validation alone, except the one a
    run reports. Under ``selection: final`` the last evaluation scores every split. Under
    ``selection: validation`` the student's weights at the best validation score so far
    (earliest on ties, as :func:`select_metrics` chooses) are kept in memory, and
    :meth:`finish` scores the other splits with them and writes those into that
    evaluation's history entry. Evaluation reads no random numbers, so training is the
    same as with every split scored."""

    def __init__(self, model: KDModel, factory: ModelFactory, data: TaskData, encoded: dict[str, dict[str, torch.Tensor]], batch_size: int,
                 device: torch.device, selection: str, main_metric: str, teacher: KDModel | None = None):
        self.model, self.factory, self.data, self.encoded, self.teacher = model, factory, data, encoded, teacher
        self.batch_size, self.device, self.selection, self.main_metric = batch_size, device, selection, main_metric
        self.best: tuple[float, int, dict[str, torch.Tensor] | None] | None = None  # (score, step, weights; None: the last)

    def _scores(self, splits: list[str]) -> dict[str, dict[str, float]]:
        return evaluate(self.model, self.factory, self.data, self.encoded, self.batch_size, self.device, splits, self.teacher)

    def __call__(self, step: int, last: bool) -> dict[str, dict[str, float]]:
        if last and self.selection == "final":
            return self._scores(self.data.eval_splits)
        metrics = self._scores([VALIDATION])
        if self.selection == "validation":
            score = metrics[VALIDATION][self.main_metric]
            if not self.data.objective.metric_info(self.main_metric).higher_is_better:
                score = -score  # best is lowest: compare the negation, ties still keep the earliest
            if self.best is None or score > self.best[0]:
                weights = None if last else {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self.best = (score, step, weights)
        return metrics

    def finish(self, history: list[dict[str, Any]]) -> tuple[int, dict[str, dict[str, float]]] | None:
        """Under ``selection: validation``: score the other splits with the best-validation
        weights (the model keeps them afterwards), put the scores into that step's history
        entry and return ``(step, scores)``; None otherwise."""
        if self.selection != "validation" or self.best is None:
            return None
        _, step, weights = self.best
        if weights is not None:
            self.model.load_state_dict(weights)
        scores = self._scores([s for s in self.data.eval_splits if s != VALIDATION])
        next(h for h in history if h.get("step") == step).update(scores)
        return step, scores


def split_metrics(logits: torch.Tensor, data: TaskData, split: str) -> dict[str, float]:
    """The task's metrics of ``logits`` (a whole split's) against that split's labels,
    read through the task's objective."""
    objective = data.objective
    return objective.metrics(objective.predictions(logits), data.labels(split))


def divergence(start: torch.Tensor, now: torch.Tensor, regression: bool) -> tuple[float, str]:
    """(value, kind) of how far predictions ``now`` moved from ``start`` (both ``(N, C)``):
    classification ``kl``, the mean over examples of KL(p_start || p_now) at temperature 1;
    regression ``mse``, the mean over examples of the squared difference of the
    predictions (summed over outputs). Computed in float64; the formulas of the built-in
    objectives' :meth:`~kdbench.api.Objective.divergence`, which a live teacher's drift
    reads (:class:`TeacherDrift`)."""
    start, now = start.double(), now.double()
    if regression:
        return float(((now - start) ** 2).sum(-1).mean()), "mse"
    log_p, log_q = F.log_softmax(start, -1), F.log_softmax(now, -1)
    return float(F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)), "kl"


class TeacherDrift:
    """The live (trainable) teacher of a run whose method updates it, against itself at
    the start: built right after ``method.setup`` (so a teacher the method re-initialises
    there is compared with its new start), it predicts the validation split once; each
    call evaluates the live teacher on validation and returns the history entry

    ``{"teacher": {"validation": {metric: value}, "divergence": x, "divergence_kind":
    "kl" | "mse", "start_validation": {metric: value}}}``

    (``divergence``: :func:`divergence` from the starting teacher's predictions;
    ``start_validation``: the starting teacher's own metrics; ``split`` names another
    split to score instead, its keys then named after it). Eval mode, no gradient:
    nothing of the run's training changes. For an objective that shares no teacher
    outputs (a split of per-token logits is too large to hold) a frozen copy of the
    starting teacher is kept instead of its predictions, the metrics are scored through
    the objective's evaluator and the divergence is streamed
    (:meth:`~kdbench.api.Objective.batch_divergence`)."""

    def __init__(self, teacher: KDModel, factory: ModelFactory, data: TaskData, encoded: dict[str, torch.Tensor],
                 batch_size: int, device: torch.device, split: str = VALIDATION):
        self.teacher, self.factory, self.data, self.encoded = teacher, factory, data, encoded
        self.batch_size, self.device, self.split = batch_size, device, split
        # a split of per-token logits does not fit in memory: keep the starting teacher instead and stream
        self.streamed = not data.objective.shares_teacher_outputs
        if self.streamed:
            self.start_model = copy.deepcopy(teacher).requires_grad_(False)
            self.start_metrics = self._metrics(self.start_model)
        else:
            self.start = self._predict()
            self.start_metrics = split_metrics(self.start, data, split)

    def _predict(self) -> torch.Tensor:
        return predict(self.teacher, self.factory, self.encoded, self.batch_size, self.device)

    def _metrics(self, model: KDModel) -> dict[str, float]:
        return evaluate_split(model, self.factory, self.encoded, _label_tensor(self.data, self.split), self.data.objective, self.batch_size, self.device)

    def _streamed_divergence(self) -> tuple[float, str]:
        """:meth:`Objective.batch_divergence` of the starting and the live teacher, batch by
        batch over the split (both in eval mode)."""
        totals, kinds = [0.0, 0.0], set()

        def take(acc: Any, out: ModelOutput, index: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
            total, weight, kind = self.data.objective.batch_divergence(self.start_model(inputs), out)
            acc[0], acc[1] = acc[0] + total, acc[1] + weight
            kinds.add(kind)

        was = self.start_model.training
        self.start_model.eval()
        try:
            _batched(self.teacher, self.factory, self.encoded, self.batch_size, self.device, frozenset(), lambda: totals, take)
        finally:
            self.start_model.train(was)
        return totals[0] / max(totals[1], 1e-300), ",".join(sorted(kinds))

    def __call__(self) -> dict[str, Any]:
        if self.streamed:
            (value, kind), metrics = self._streamed_divergence(), self._metrics(self.teacher)
        else:
            now = self._predict()
            (value, kind), metrics = self.data.objective.divergence(self.start, now), split_metrics(now, self.data, self.split)
        return {TEACHER: {self.split: metrics, "divergence": value, "divergence_kind": kind, f"start_{self.split}": dict(self.start_metrics)}}


#: The key of a run's metrics that keeps each metric's direction, scale and bounds
#: (:class:`kdbench.api.MetricInfo` as a dict), so reports read them from the store.
METRIC_INFO = "metric_info"


def select_metrics(history: list[dict[str, Any]], selection: str, main_metric: str,
                   info: dict[str, MetricInfo] | None = None) -> dict[str, Any]:
    """The reported evaluation: the final one, or the one with the best *validation*
    score (earliest on ties; best is the highest, or the lowest where ``info`` says the
    main metric is lower-is-better). Never selected on the test split. A live teacher's
    entry (teacher-updating methods) is kept under ``live_teacher``, never as a split.
    ``info`` (each metric's :class:`MetricInfo`, from the task's objective) is stored
    under :data:`METRIC_INFO`."""
    chosen = history[-1]
    if selection == "validation":
        sign = 1.0 if info is None or main_metric not in info or info[main_metric].higher_is_better else -1.0
        chosen = max(history, key=lambda h: (sign * h[VALIDATION][main_metric], -h["step"]))
    out = {"step": chosen["step"], "selection": selection, "main_metric": main_metric,
           **{split: vals for split, vals in chosen.items() if split not in ("step", TEACHER)}}
    if TEACHER in chosen:
        out[LIVE_TEACHER] = chosen[TEACHER]
    if info:
        out[METRIC_INFO] = {name: i.to_dict() for name, i in sorted(info.items())}
    return out


def metric_infos(objective: Objective, history: list[dict[str, Any]], main_metric: str) -> dict[str, MetricInfo]:
    """The :class:`MetricInfo` of every metric the evaluations in ``history`` recorded
    (and of ``main_metric``), as ``objective`` reads them."""
    names = {main_metric} | {k for h in history for split, vals in h.items() if split not in ("step", TEACHER) and isinstance(vals, dict)
                             for k in vals}
    return {name: objective.metric_info(name) for name in sorted(names)}
