"""One student run: given a run spec and its teacher's checkpoint, train the student for
the budget with the method's step, evaluate at fixed points and measure the cost. The
runner never touches the results store: claims, heartbeats and records belong to the
executor (:mod:`kdbench.executors`)."""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kdbench.api import (LOGITS, TEACHER as TEACHER_ROLE, Batch, KDBenchError, KDModel, Method, ModelOutput, RunStreams, SetupInfo, StepContext,
                         check_alignment, set_trainable)
from kdbench.compute import PassCounter, PassFlops, compute_cost, steps_for_flops
from kdbench.data import QUIZ, TRAIN, VALIDATION, TaskData, labels_tensor, load_task_data
from kdbench.registry import Registry, call_lifecycle, get_registry
from kdbench.spec import MAX_STEPS, RunSpec, budget_limit
from kdbench.store import DIVERGED, DONE, FAILED
import kdbench.train.teachers as teachers
from kdbench.train.artefacts import DiskFull
from kdbench.train.cost import CostMeter, keep_freed_memory
from kdbench.train.environment import deterministic_cpu, environment, pick_device, seed_everything
from kdbench.train.evaluation import TEACHER, DeferredTest, TeacherDrift, evaluate, metric_infos, select_metrics
from kdbench.train.inputs import ResolvedModel, encoded_splits
from kdbench.train.loop import Diverged, RoleInputs, autocast_for, batches, ordered_batches, train_loop
from kdbench.train.optim import build_optimizer, total_steps
from kdbench.train.teachers import TeacherCheckpoint
from kdbench.train.trackers import RunTrackers


@dataclass
class RunResult:
    status: str
    metrics: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    error: str | None = None
    diverged_step: int | None = None


@dataclass
class _Prepared:
    """What a run builds before its first step (timed as ``prep_s``)."""

    method: Method
    data: TaskData
    factory: Any
    encoded: dict[str, dict[str, torch.Tensor]]
    teacher: KDModel | None
    shared: torch.Tensor | None
    #: the teacher's factory and encoded splits; a split's encoding is the student's own
    #: object when the two share a tokenizer (``encoder_id``), so nothing is encoded twice
    teacher_factory: Any = None
    teacher_encoded: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    student_model: ResolvedModel | None = None  # the student's factory and options, resolved once

    def eval_teacher(self) -> KDModel | None:
        """The teacher the student's evaluators may compare it with: the run's (as it is at
        each evaluation), where it reads the very inputs of the student on every
        evaluation split (one encoding), else None."""
        if self.teacher is None or any(self.teacher_encoded.get(s) is not self.encoded.get(s) for s in self.data.eval_splits):
            return None
        return self.teacher

    def teacher_side(self, split: str) -> RoleInputs | None:
        """What :func:`~kdbench.train.loop.batches` needs to collate the teacher's inputs."""
        return (self.teacher_factory, self.teacher_encoded[split]) if self.teacher is not None else None


class Runner:
    """Trains student runs of one results folder on one device."""

    def __init__(self, results_dir: str | Path, registry: Registry | None = None, device: str = "auto",
                 trackers: tuple[str, ...] = (), progress: bool | None = None, share_teacher_outputs: bool = True,
                 drift_splits: tuple[str, ...] = (VALIDATION,)):
        """``drift_splits``: the splits on which a teacher-updating method's live teacher is
        scored at every evaluation (:class:`~kdbench.train.evaluation.TeacherDrift`);
        validation always, first. Another split (a diagnostic such as
        ``benchmarks/teacher_probe.py``'s test) adds ``<split>``, ``start_<split>`` and
        ``<split>_divergence`` to the run's teacher entries; selection never reads them."""
        if not drift_splits or drift_splits[0] != VALIDATION:
            raise KDBenchError(f"drift_splits must start with {VALIDATION!r}, got {drift_splits!r}")
        self.drift_splits = tuple(drift_splits)
        self.results_dir = Path(results_dir)
        self.registry = registry or get_registry()
        self.device = pick_device(device)
        self.trackers = tuple(trackers)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.share_teacher_outputs = share_teacher_outputs
        self._teacher_logits: dict[str, torch.Tensor] = {}
        keep_freed_memory()  # large tensors reuse the heap instead of new pages every step
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def run(self, spec: RunSpec, teacher: TeacherCheckpoint | None = None) -> RunResult:
        """Train and evaluate one run; never raises for a failed or diverged run, only for a
        full disk (``DiskFull``: no fault of the run). ``teacher``: the teachers-first phase's checkpoint."""
        env = environment(self.device)
        run_dir = self.results_dir / "runs" / spec.hash
        call_lifecycle(self.registry, "kdbench_run_start", spec=spec, run_dir=str(run_dir), trackers=list(self.trackers))
        tracked = RunTrackers.start(self.registry, self.trackers, spec, run_dir)
        try:
            with deterministic_cpu():
                result = self._run(spec, teacher, env, tracked)
        except Diverged as exc:
            result = RunResult(DIVERGED, error=str(exc), env=env, diverged_step=exc.step)
        except torch.OutOfMemoryError as exc:
            result = RunResult(FAILED, error=f"out of memory on {self.device}: {exc}", env=env)
        except MemoryError:
            result = RunResult(FAILED, error="out of host memory (MemoryError)", env=env)
        except (KeyboardInterrupt, DiskFull):  # a full disk is the environment's, not the run's: exit 2
            tracked.end("interrupted", {})
            raise
        except Exception as exc:
            result = RunResult(FAILED, error="".join(traceback.format_exception(exc)), env=env)
        tracked.end(result.status, {"status": result.status, "metrics": result.metrics, "cost": result.cost, "error": result.error})
        return result

    # -- preparation ------------------------------------------------------------------
    def _prepare(self, spec: RunSpec, checkpoint: TeacherCheckpoint | None) -> _Prepared:
        method_cls = self.registry.method(spec.method)
        data = load_task_data(self.registry, spec.task, spec.quiz_fraction, spec.data_seed)
        method: Method = method_cls(method_cls.Params(**spec.params), data.objective)
        teacher, teacher_model = None, None
        student_model = ResolvedModel.of(self.registry, spec.student)
        if method.uses_teacher and spec.teacher is not None:
            if checkpoint is None:
                raise KDBenchError(f"run {spec.hash} needs the checkpoint of teacher {spec.teacher_hash}: "
                                   "the executor's teachers-first phase provides it (kdbench.train.teachers.provide_teacher)")
            teacher_model = ResolvedModel.of(self.registry, spec.teacher)
            check_alignment(method, teacher_model.encoder_id, student_model.encoder_id)  # before anything is loaded
            teacher = teachers.load_teacher(checkpoint, spec, self.registry, data, self.device, teacher_model)
        splits = [TRAIN, QUIZ, *data.eval_splits]
        factory, encoded = encoded_splits(self.registry, spec, data, spec.student, splits, student_model)
        t_factory, t_encoded = None, {}
        if teacher is not None:
            t_factory, t_encoded = encoded_splits(self.registry, spec, data, spec.teacher, splits, teacher_model)  # type: ignore[arg-type]
        shared = None
        if teacher is not None and self.share_teacher_outputs and method.can_share_teacher_outputs and not data.task.has_augmentation:
            shared = self._shared_logits(checkpoint, teacher, spec, data)  # type: ignore[arg-type]
        return _Prepared(method, data, factory, encoded, teacher, shared, t_factory, t_encoded, student_model)

    def _shared_logits(self, checkpoint: TeacherCheckpoint, teacher: KDModel, spec: RunSpec, data: TaskData) -> torch.Tensor:
        key = teachers.logits_inputs(checkpoint, spec, self.registry, data)
        if key not in self._teacher_logits:
            logits = teachers.shared_train_logits(checkpoint, lambda: teachers.train_logits(teacher, spec, self.registry, data, self.device), key)
            self._teacher_logits[key] = logits.to(self.device)
        return self._teacher_logits[key]

    def _teacher_forward(self, teacher: KDModel | None, shared: torch.Tensor | None) -> Callable[[Batch, frozenset[str]], ModelOutput]:
        def teacher_forward(batch: Batch, need: frozenset[str]) -> ModelOutput:
            assert teacher is not None
            if shared is not None and set(need) <= {LOGITS}:
                return ModelOutput(logits=shared[batch.index.to(shared.device)])
            # A fixed teacher is in eval mode already (load_teacher); train(False) and train() each walk
            # every submodule (0.7 ms of CPU a step for the MiniLM teacher's 120 modules, found by
            # profiling benchmarks/peers.py): switch only a teacher that a method left in train mode.
            was_training = teacher.training
            if was_training:
                teacher.train(False)
            with torch.no_grad():
                out = teacher(batch.inputs_for(TEACHER_ROLE), need=need)
            if was_training:
                teacher.train()
            return out

        return teacher_forward

    def _quiz_batches(self, spec: RunSpec, p: _Prepared, streams: RunStreams) -> Callable[[], Batch]:
        quiz_iter: Iterator[Batch] | None = None

        def next_quiz_batch() -> Batch:
            nonlocal quiz_iter
            if QUIZ not in p.encoded:
                raise KDBenchError(f"method '{spec.method}' needs a quiz split; set quiz_fraction > 0")
            if quiz_iter is None:
                quiz_gen = streams.fresh("quiz")
                quiz_iter = batches(p.factory, p.encoded[QUIZ], labels_tensor(p.data, QUIZ), spec.budget.batch_size, quiz_gen, self.device,
                                    p.data.task, p.data.task.has_augmentation and p.method.augments_quiz, teacher=p.teacher_side(QUIZ))
            return next(quiz_iter)

        return next_quiz_batch

    def _sample(self, spec: RunSpec, p: _Prepared, streams: RunStreams) -> Batch:
        """The run's first training batch (before augmentation), read from a fresh copy of its data stream."""
        return next(batches(p.factory, p.encoded[TRAIN], labels_tensor(p.data, TRAIN), spec.budget.batch_size, streams.fresh("data"),
                            self.device, teacher=p.teacher_side(TRAIN)))

    def _plan(self, spec: RunSpec, p: _Prepared, student: KDModel, streams: RunStreams) -> tuple[Batch, PassFlops, int, float]:
        """The first training batch, the FLOPs of one pass counted on it (when first asked),
        the run's steps, and the seconds spent counting (not preparation)."""
        sample = self._sample(spec, p, streams)
        t0 = time.perf_counter()
        flops = PassFlops(student, p.teacher, sample, p.method.student_needs, p.method.teacher_needs)
        steps = self._steps(spec, p, flops)
        return sample, flops, steps, time.perf_counter() - t0

    def _steps(self, spec: RunSpec, p: _Prepared, flops: PassFlops) -> int:
        """The run's optimizer steps: the budget's steps or epochs, or the most steps whose
        planned passes fit its FLOPs (:func:`kdbench.compute.steps_for_flops`)."""
        n_train = labels_tensor(p.data, TRAIN).shape[0]
        if spec.budget.flops is None:
            return total_steps(spec.budget, n_train)
        quiz = int(labels_tensor(p.data, QUIZ).shape[0]) if QUIZ in p.encoded else 0
        planned = lambda steps: p.method.planned_passes(steps, spec.budget.batch_size, quiz)  # noqa: E731
        if planned(1) is None:
            raise KDBenchError(f"method '{spec.method}' does not plan its passes (Method.planned_passes), so a budget in flops cannot "
                               "give it a number of steps")
        max_steps = budget_limit("KDBENCH_MAX_STEPS", MAX_STEPS)
        flops.measure({k for steps in (1, max_steps) for k, n in planned(steps).items() if n})  # type: ignore[union-attr]
        try:
            return steps_for_flops(spec.budget.flops, planned, flops.per_pass, max_steps)  # type: ignore[arg-type]
        except ValueError as exc:
            raise KDBenchError(f"budget flops={spec.budget.flops:g} for method '{spec.method}': {exc}") from None

    def _context(self, spec: RunSpec, p: _Prepared, student: KDModel, streams: RunStreams, steps: int, sample: Batch) -> tuple[StepContext, int]:
        """The step context (optimizer over student + the method's extra modules) and the
        deployed parameter count."""
        labels = labels_tensor(p.data, TRAIN)
        extra = p.method.extra_modules(student, p.teacher, SetupInfo(sample=sample, train_size=labels.shape[0], device=self.device))
        extra = extra.to(self.device) if extra is not None else None
        params = list(student.parameters()) + (list(extra.parameters()) if extra is not None else [])
        per_epoch = max(labels.shape[0] // spec.budget.batch_size, 1)
        optimizer, scheduler = build_optimizer(params, spec.optimizer, steps, per_epoch, spec.budget.epochs is not None)
        build_teacher = None
        if spec.teacher is not None and p.teacher is not None:
            build_teacher = lambda: teachers.pretrained_teacher(spec, self.registry, p.data, self.device)  # noqa: E731
        ctx = StepContext(student=student, teacher=p.teacher, extra=extra, student_optimizer=optimizer, scheduler=scheduler,
                          problem=p.data.objective, device=self.device, total_steps=steps, train_size=labels.shape[0],
                          teacher_forward=self._teacher_forward(p.teacher, p.shared), next_quiz_batch=self._quiz_batches(spec, p, streams),
                          autocast=autocast_for(self.device), seed=spec.seed, streams=streams, build_teacher=build_teacher,
                          quiz_size=int(labels_tensor(p.data, QUIZ).shape[0]) if QUIZ in p.encoded else 0)
        return ctx, sum(x.numel() for x in params)

    # -- the run ------------------------------------------------------------------------
    def _run(self, spec: RunSpec, checkpoint: TeacherCheckpoint | None, env: dict[str, Any], tracked: RunTrackers) -> RunResult:
        t0 = time.perf_counter()
        p = self._prepare(spec, checkpoint)
        env["data"] = getattr(p.data, "fingerprints", None)
        assert p.student_model is not None
        seed_everything(spec.seed)
        student = p.student_model.factory.build(p.student_model.options, p.data.objective).to(self.device)
        p.method.check_models(student, p.teacher)
        if p.teacher is not None:
            set_trainable(p.teacher, p.method.updates_teacher)
        streams = RunStreams(spec.seed)  # every random stream of the run, by name
        sample, flops, steps, count_s = self._plan(spec, p, student, streams)
        ctx, n_training = self._context(spec, p, student, streams, steps, sample)
        ctx.passes = counter = PassCounter.of(student=student, teacher=p.teacher)
        ctx.train_batches = lambda size: ordered_batches(p.factory, p.encoded[TRAIN], labels_tensor(p.data, TRAIN), size, self.device,
                                                         p.teacher_side(TRAIN))
        if checkpoint is not None and p.teacher is not None and not p.method.updates_teacher:
            ctx.teacher_cache = lambda name, compute: teachers.shared_teacher_tensors(checkpoint, name, compute)
        p.method.setup(ctx)
        ctx.teacher_forward = counter.counted_forward("teacher", ctx.teacher_forward)  # as the method left it (a cache may answer)
        meter = CostMeter(self.device)
        labels = labels_tensor(p.data, TRAIN)
        train_batches = batches(p.factory, p.encoded[TRAIN], labels, spec.budget.batch_size, streams.fresh("data"),
                                self.device, p.data.task, p.data.task.has_augmentation, meter, teacher=p.teacher_side(TRAIN))

        def step_fn(batch: Batch, step: int) -> dict[str, torch.Tensor]:
            ctx.step = step
            with counter.counting():
                values = p.method.train_step(ctx, batch)
            values.setdefault("lr", torch.tensor(ctx.student_optimizer.param_groups[0]["lr"]))
            return values

        meter.prep_s = time.perf_counter() - t0 - count_s  # counting FLOPs is not preparing the run
        with meter:
            drift = self._teacher_drift(spec, p, meter)
            judge = p.eval_teacher()
            deferred = None if spec.budget.test_every_eval else DeferredTest(student, p.factory, p.data, p.encoded, spec.budget.eval_batch_size,
                                                                              self.device, spec.selection, p.data.task.main_metric, judge)
            history = train_loop(
                model=student, step_fn=step_fn, batches=train_batches, steps=steps, budget=spec.budget,
                evaluate_fn=deferred if deferred is not None else (lambda step, last: evaluate(student, p.factory, p.data, p.encoded, spec.budget.eval_batch_size, self.device,
                                                                                               teacher=judge)),
                meter=meter, on_log=lambda step, values: self._on_log(spec, tracked, step, values),
                on_eval=lambda step, metrics: self._on_eval(spec, tracked, step, metrics),
                desc=f"{spec.method} {spec.task.name} seed {spec.seed}", progress=self.progress, eval_extras=drift)
            if deferred is not None:
                t1 = time.perf_counter()
                late = deferred.finish(history)
                meter.eval_time += time.perf_counter() - t1
                if late is not None:
                    self._on_eval(spec, tracked, *late)
        cost = meter.summary()
        cost["params_deployed"] = sum(x.numel() for x in student.parameters())
        cost["params_training"] = cost["student_params"] = n_training
        cost["shared_teacher_outputs"] = p.shared is not None
        cost.update({f"{part}_s": seconds for part, seconds in ctx.timings.items()})  # parts of train_s (generation, ...)
        cost.update(compute_cost(counter, flops, count_s))
        main = p.data.task.main_metric
        metrics = select_metrics(history, spec.selection, main, metric_infos(p.data.objective, history, main))
        return RunResult(DONE, metrics=metrics, history=history, cost=cost, env=env)

    def _teacher_drift(self, spec: RunSpec, p: _Prepared, meter: CostMeter) -> Callable[[], dict[str, Any]] | None:
        """For a method that updates its teacher: the live teacher's drift on
        ``self.drift_splits``, its starting predictions taken now (after ``method.setup``,
        before step 1; timed as evaluation)."""
        if p.teacher is None or not p.method.updates_teacher:
            return None
        t0 = time.perf_counter()
        drifts = [TeacherDrift(p.teacher, p.teacher_factory, p.data, p.teacher_encoded[split], spec.budget.eval_batch_size, self.device, split=split)
                  for split in self.drift_splits]
        meter.eval_time += time.perf_counter() - t0

        def entry() -> dict[str, Any]:
            first, *others = (d() for d in drifts)
            for d, other in zip(drifts[1:], others):
                t = other[TEACHER]
                first[TEACHER].update({d.split: t[d.split], f"start_{d.split}": t[f"start_{d.split}"], f"{d.split}_divergence": t["divergence"]})
            return first

        return entry

    def _on_log(self, spec: RunSpec, tracked: RunTrackers, step: int, values: dict[str, float]) -> None:
        call_lifecycle(self.registry, "kdbench_train_log", spec=spec, step=step, values=values)
        tracked.log(step, values)

    def _on_eval(self, spec: RunSpec, tracked: RunTrackers, step: int, metrics: dict[str, dict[str, float]]) -> None:
        for split, m in metrics.items():
            call_lifecycle(self.registry, "kdbench_eval_result", spec=spec, step=step, split=split, metrics=m)
            tracked.eval_result(step, split, m)
