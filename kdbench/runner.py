"""Train one run spec: seed everything, fetch (or fine-tune once) the teacher, train the
student for the budget with the method's step, evaluate at fixed points, measure cost."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdbench.api import (
    LOGITS,
    Batch,
    KDBenchError,
    KDModel,
    Method,
    ModelFactory,
    ModelOutput,
    SetupInfo,
    StepContext,
    iter_batches,
    task_loss,
)
from kdbench.data import QUIZ, TRAIN, VALIDATION, TaskData, encode_split, labels_tensor, load_task_data
from kdbench.registry import Registry, call_lifecycle, get_registry
from kdbench.spec import Budget, ModelSpec, OptimizerSpec, RunSpec
from kdbench.store import DIVERGED, DONE, FAILED, ResultsStore

# ----------------------------------------------------------------------------- basics


class Diverged(Exception):
    def __init__(self, step: int, value: float):
        self.step = step
        super().__init__(f"loss became {value} at step {step}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise KDBenchError("device: 'cuda' was asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def deterministic_cpu() -> Iterator[None]:
    """Deterministic kernels where PyTorch has them (warn rather than fail elsewhere)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


_GIT: str | None = None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware a number came from (stored with every run)."""
    global _GIT
    if _GIT is None:
        try:
            here = Path(__file__).resolve().parent
            _GIT = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout.strip()
            _GIT += "+dirty" if dirty else ""
        except (OSError, subprocess.SubprocessError):
            _GIT = "unknown"
    import transformers

    import kdbench

    env = {
        "kdbench": kdbench.__version__,
        "git_commit": _GIT,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}",
    }
    return env


# ----------------------------------------------------------------------------- cost


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_peak_mb() -> float:
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_rss_peak() -> None:
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class CostMeter:
    """Wall time, device time (CUDA events on GPU, process CPU time otherwise), time per
    step, time waiting for data and peak memory (CUDA max allocated, or process RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.data_wait = 0.0
        self.train_time = 0.0
        self.eval_time = 0.0
        self.steps = 0
        self.step_times: list[float] = []

    def __enter__(self) -> "CostMeter":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._ev0 = torch.cuda.Event(enable_timing=True)
            self._ev1 = torch.cuda.Event(enable_timing=True)
            self._ev0.record()
            self._mem0 = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            _reset_rss_peak()
            self._mem0 = _proc_status_mb("VmRSS") or 0.0
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._wall0
        if self.device.type == "cuda":
            self._ev1.record()
            torch.cuda.synchronize(self.device)
            self.device_time = self._ev0.elapsed_time(self._ev1) / 1000
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.device_time = time.process_time() - self._cpu0
            self.peak_mb = _rss_peak_mb()

    def summary(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall,
            "device_s": self.device_time,
            "device_time_kind": "cuda_events" if self.device.type == "cuda" else "process_cpu",
            "train_s": self.train_time,
            "eval_s": self.eval_time,
            "steps": self.steps,
            "step_s": self.train_time / max(self.steps, 1),
            "step_s_median": float(np.median(self.step_times)) if self.step_times else None,
            "data_wait_s": self.data_wait,
            "data_wait_fraction": self.data_wait / max(self.train_time, 1e-9),
            "peak_mem_mb": self.peak_mb,
            "peak_mem_kind": "cuda_max_allocated" if self.device.type == "cuda" else "process_rss",
            "peak_mem_increase_mb": self.peak_mb - self._mem0,
        }


# ----------------------------------------------------------------------------- optimization


def total_steps(budget: Budget, n_train: int) -> int:
    if budget.steps is not None:
        return budget.steps
    per_epoch = max(n_train // budget.batch_size, 1)
    return max(int(math.ceil(budget.epochs * per_epoch)), 1)


def build_optimizer(params: list[nn.Parameter], spec: OptimizerSpec, steps: int, steps_per_epoch: int, epochs_budget: bool) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer and a per-step LR schedule. Gradient clipping, when asked, runs as a
    pre-step hook so every method's step gets it without repeating it."""
    if spec.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.nesterov)
    elif spec.name == "adam":
        opt = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.grad_clip is not None:
        clip = spec.grad_clip
        opt.register_step_pre_hook(lambda o, a, k: nn.utils.clip_grad_norm_([p for g in o.param_groups for p in g["params"]], clip))
    warmup = int(spec.warmup_ratio * steps)
    milestones = [int(m * steps_per_epoch) if epochs_budget else int(m) for m in spec.milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec.schedule == "linear":
            return max(0.0, (steps - step) / max(steps - warmup, 1))
        if spec.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
        if spec.schedule == "multistep":
            return spec.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------- evaluation


def predict(model: KDModel, factory: ModelFactory, encoded: dict[str, torch.Tensor], batch_size: int, device: torch.device, need: frozenset[str] = frozenset()) -> torch.Tensor:
    """Logits for a whole split, batched, under inference mode, in eval mode. On a GPU
    that runs out of memory the batch is halved and the split predicted again, so the
    largest batch that fits is used (``eval_batch_size`` is the first try)."""
    was_training = model.training
    model.eval()
    n = next(iter(encoded.values())).shape[0]
    try:
        while True:
            try:
                out = []
                with torch.inference_mode():
                    for start in range(0, n, batch_size):
                        index = torch.arange(start, min(start + batch_size, n))
                        inputs = {k: v.to(device, non_blocking=True) for k, v in factory.collate(encoded, index).items()}
                        out.append(model(inputs, need=need).logits.float().cpu())
                return torch.cat(out)
            except torch.OutOfMemoryError:
                if batch_size == 1 or device.type != "cuda":
                    raise
                batch_size //= 2
                torch.cuda.empty_cache()
    finally:
        model.train(was_training)


def evaluate(model: KDModel, factory: ModelFactory, data: TaskData, encoded: dict[str, dict[str, torch.Tensor]], batch_size: int, device: torch.device) -> dict[str, dict[str, float]]:
    results = {}
    for split in data.eval_splits:
        logits = predict(model, factory, encoded[split], batch_size, device)
        preds = logits.squeeze(-1).numpy() if data.task.problem.is_regression else logits.argmax(-1).numpy()
        results[split] = {k: float(v) for k, v in data.task.compute_metrics(preds, data.labels(split)).items()}
    return results


# ----------------------------------------------------------------------------- the runner


@dataclass
class RunResult:
    status: str
    metrics: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    error: str | None = None
    diverged_step: int | None = None


class Runner:
    """Trains runs of one results folder. Teachers are fine-tuned once and cached as
    safetensors under ``<results>/teachers/<hash>/``; their train-split logits are cached
    beside them for methods that only read a fixed teacher's logits."""

    def __init__(self, results_dir: str | Path, store: ResultsStore, registry: Registry | None = None,
                 device: str = "auto", trackers: tuple[str, ...] = (), progress: bool | None = None,
                 share_teacher_outputs: bool = True):
        self.results_dir = Path(results_dir)
        self.store = store
        self.registry = registry or get_registry()
        self.device = pick_device(device)
        self.trackers = trackers
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.share_teacher_outputs = share_teacher_outputs
        self._teacher_logits: dict[str, torch.Tensor] = {}
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # -- building blocks --------------------------------------------------------------
    def _factory(self, spec: ModelSpec) -> tuple[ModelFactory, Any]:
        cls = self.registry.model(spec.model)
        return cls(), cls.Options(**spec.options)

    def _encoded(self, spec: RunSpec, data: TaskData, model_spec: ModelSpec, splits: list[str]) -> tuple[ModelFactory, dict[str, dict[str, torch.Tensor]]]:
        factory, options = self._factory(model_spec)
        key = {"task": spec.task.model_dump(mode="json"), "version": spec.task_version, "quiz": spec.quiz_fraction, "data_seed": spec.data_seed}
        return factory, {s: encode_split(factory, options, data, s, key) for s in splits if s in data.splits}

    def _autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext

    def _batches(self, factory: ModelFactory, encoded: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int,
                 generator: torch.Generator, task: Any, augment: bool, meter: CostMeter | None) -> Iterator[Batch]:
        pin = self.device.type == "cuda"
        for index in iter_batches(labels.shape[0], batch_size, generator):
            t0 = time.perf_counter()
            inputs = factory.collate(encoded, index)
            if pin:
                inputs = {k: v.pin_memory() for k, v in inputs.items()}
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
            if augment:
                inputs = task.augment(inputs, generator)
            batch = Batch(inputs, labels[index].to(self.device, non_blocking=True), index)
            if meter is not None:
                meter.data_wait += time.perf_counter() - t0
            yield batch

    def _train_loop(self, *, model: KDModel, step_fn: Callable[[Batch, int], dict[str, torch.Tensor]], batches: Iterator[Batch],
                    steps: int, budget: Budget, evaluate_fn: Callable[[], dict[str, dict[str, float]]], meter: CostMeter,
                    on_log: Callable[[int, dict[str, float]], None], on_eval: Callable[[int, dict], None], desc: str,
                    heartbeat: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """The loop shared by teacher fine-tuning and student runs. Losses stay on the
        device between log points so the step needs no host synchronisation."""
        eval_points = set(range(budget.eval_every, steps + 1, budget.eval_every)) if budget.eval_every else set()
        eval_points.add(steps)
        history: list[dict[str, Any]] = []
        pending: list[torch.Tensor] = []
        pending_start = 1
        bar = _progress(steps, desc, self.progress)
        model.train()
        last_beat = time.time()
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            batch = next(batches)
            values = step_fn(batch, step - 1)
            pending.append(values["loss"])
            if step % budget.log_every == 0 or step in eval_points:
                losses = torch.stack([p.float() for p in pending]).cpu()
                bad = (~torch.isfinite(losses)).nonzero()
                if bad.numel():
                    first = int(bad[0, 0])
                    raise Diverged(pending_start + first, float(losses[first]))
                on_log(step, {k: float(v) for k, v in values.items()})
                pending, pending_start = [], step + 1
                if heartbeat is not None and time.time() - last_beat > 30:
                    heartbeat()
                    last_beat = time.time()
            bar.update(1)
            elapsed = time.perf_counter() - t0
            meter.train_time += elapsed
            meter.step_times.append(elapsed)
            meter.steps += 1
            if step in eval_points:
                t1 = time.perf_counter()
                metrics = evaluate_fn()
                meter.eval_time += time.perf_counter() - t1
                history.append({"step": step, **metrics})
                on_eval(step, metrics)
        bar.close()
        return history

    # -- teacher ----------------------------------------------------------------------
    def teacher_path(self, teacher_hash: str) -> Path:
        return self.results_dir / "teachers" / teacher_hash / "model.safetensors"

    def ensure_teacher(self, spec: RunSpec, wait_s: float = 5.0) -> dict[str, Any]:
        """The fine-tuned teacher's store row, training it first if no one has. When another
        live process is training it, wait for it instead of training it twice."""
        th = spec.teacher_hash
        assert th is not None and spec.teacher is not None
        while True:
            row = self.store.teacher(th)
            if row is not None and row["status"] == DONE:
                if Path(row["path"]).exists():
                    return row
                self.store.finish_teacher(th, FAILED, error=f"checkpoint {row['path']} is missing; training it again")
            if self.store.claim_teacher(th, spec.task.name, spec.teacher.model_dump(mode="json")):
                break
            time.sleep(wait_s)
        try:
            metrics, cost, env = self._fine_tune_teacher(spec)
        except BaseException as exc:
            self.store.finish_teacher(th, FAILED, error="".join(traceback.format_exception(exc)))
            raise
        path = self.teacher_path(th)
        self.store.finish_teacher(th, DONE, path=str(path), metrics=metrics, cost=cost, env=env)
        return self.store.teacher(th)  # type: ignore[return-value]

    def _fine_tune_teacher(self, spec: RunSpec) -> tuple[dict, dict, dict]:
        assert spec.teacher is not None
        data = load_task_data(self.registry, spec.task, spec.quiz_fraction, spec.data_seed)
        factory, options = self._factory(spec.teacher)
        _, encoded = self._encoded(spec, data, spec.teacher, [TRAIN, *data.eval_splits])
        training = spec.teacher.train
        seed_everything(training.seed if training else 0)
        model = factory.build(options, data.task.problem).to(self.device)
        history: list[dict] = []
        meter = CostMeter(self.device)
        with meter:
            if training is not None:
                labels = labels_tensor(data, TRAIN)
                steps = total_steps(training.budget, labels.shape[0])
                per_epoch = max(labels.shape[0] // training.budget.batch_size, 1)
                opt, sched = build_optimizer(list(model.parameters()), training.optimizer, steps, per_epoch, training.budget.epochs is not None)
                gen = torch.Generator().manual_seed(training.seed)
                batches = self._batches(factory, encoded[TRAIN], labels, training.budget.batch_size, gen, data.task, data.task.has_augmentation, meter)
                autocast = self._autocast()

                def step_fn(batch: Batch, step: int) -> dict[str, torch.Tensor]:
                    with autocast():
                        loss = task_loss(model(batch.inputs).logits, batch.labels, data.task.problem)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    return {"loss": loss.detach()}

                history = self._train_loop(
                    model=model, step_fn=step_fn, batches=batches, steps=steps, budget=training.budget,
                    evaluate_fn=lambda: evaluate(model, factory, data, encoded, training.budget.eval_batch_size, self.device),
                    meter=meter, on_log=lambda s, v: None, on_eval=lambda s, m: None, desc=f"teacher {spec.task.name}")
            final = history[-1] if history else {"step": 0, **evaluate(model, factory, data, encoded, 256, self.device)}
        path = self.teacher_path(spec.teacher_hash)  # type: ignore[arg-type]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
        metrics = {k: v for k, v in final.items() if k != "step"}
        metrics["main_metric"] = data.task.main_metric
        return metrics, meter.summary(), environment(self.device)

    def load_teacher(self, spec: RunSpec, data: TaskData) -> KDModel:
        row = self.ensure_teacher(spec)
        factory, options = self._factory(spec.teacher)  # type: ignore[arg-type]
        model = factory.build(options, data.task.problem)
        state = load_file(row["path"])
        model.load_state_dict(state)
        return model.to(self.device).eval()

    def shared_teacher_logits(self, spec: RunSpec, data: TaskData, teacher: KDModel) -> torch.Tensor:
        """The fixed teacher's logits on the whole training split, computed once per teacher
        checkpoint (and kept on disk beside it), reused by every method and seed."""
        th = spec.teacher_hash
        assert th is not None and spec.teacher is not None
        if th not in self._teacher_logits:
            path = self.teacher_path(th).with_name("train_logits.safetensors")
            if path.exists():
                logits = load_file(str(path))["logits"]
            else:
                factory, encoded = self._encoded(spec, data, spec.teacher, [TRAIN])
                logits = predict(teacher, factory, encoded[TRAIN], spec.budget.eval_batch_size, self.device)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                save_file({"logits": logits.contiguous()}, str(tmp))
                os.replace(tmp, path)
            self._teacher_logits[th] = logits.to(self.device)
        return self._teacher_logits[th]

    # -- a student run ----------------------------------------------------------------
    def run(self, spec: RunSpec) -> RunResult:
        """Train and evaluate one run; never raises for a failed or diverged run."""
        env = environment(self.device)
        run_dir = self.results_dir / "runs" / spec.hash
        call_lifecycle(self.registry, "kdbench_run_start", spec=spec, run_dir=str(run_dir), trackers=list(self.trackers))
        try:
            with deterministic_cpu():
                result = self._run(spec, env)
        except Diverged as exc:
            result = RunResult(DIVERGED, error=str(exc), env=env, diverged_step=exc.step)
        except torch.OutOfMemoryError as exc:
            result = RunResult(FAILED, error=f"out of memory on {self.device}: {exc}", env=env)
        except MemoryError:
            result = RunResult(FAILED, error="out of host memory (MemoryError)", env=env)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            result = RunResult(FAILED, error="".join(traceback.format_exception(exc)), env=env)
        return result

    def _run(self, spec: RunSpec, env: dict[str, Any]) -> RunResult:
        method_cls = self.registry.method(spec.method)
        data = load_task_data(self.registry, spec.task, spec.quiz_fraction, spec.data_seed)
        problem = data.task.problem
        method: Method = method_cls(method_cls.Params(**spec.params), problem)
        teacher = self.load_teacher(spec, data) if method.uses_teacher else None
        factory, encoded = self._encoded(spec, data, spec.student, [TRAIN, QUIZ, *data.eval_splits])
        s_factory, s_options = self._factory(spec.student)
        seed_everything(spec.seed)
        student = s_factory.build(s_options, problem).to(self.device)
        method.check_models(student, teacher)

        labels = labels_tensor(data, TRAIN)
        steps = total_steps(spec.budget, labels.shape[0])
        augment = data.task.has_augmentation
        data_gen = torch.Generator().manual_seed(spec.seed)
        meter = CostMeter(self.device)
        train_batches = self._batches(factory, encoded[TRAIN], labels, spec.budget.batch_size, data_gen, data.task, augment, meter)
        quiz_iter: Iterator[Batch] | None = None

        def next_quiz_batch() -> Batch:
            nonlocal quiz_iter
            if QUIZ not in encoded:
                raise KDBenchError(f"method '{spec.method}' needs a quiz split; set quiz_fraction > 0")
            if quiz_iter is None:
                quiz_gen = torch.Generator().manual_seed(spec.seed + 1)
                quiz_iter = self._batches(factory, encoded[QUIZ], labels_tensor(data, QUIZ), spec.budget.batch_size, quiz_gen, data.task, False, None)
            return next(quiz_iter)

        shared = None
        if teacher is not None and self.share_teacher_outputs and method.can_share_teacher_outputs and not augment:
            shared = self.shared_teacher_logits(spec, data, teacher)
        if teacher is not None:
            t_factory, t_options = self._factory(spec.teacher)  # type: ignore[arg-type]
            if t_factory.encoder_id(t_options) != factory.encoder_id(s_options):
                raise KDBenchError(f"teacher ({t_factory.encoder_id(t_options)}) and student ({factory.encoder_id(s_options)}) "
                                   "encode inputs differently; kdbench feeds both the same batch, so they must share a tokenizer")

        def teacher_forward(batch: Batch, need: frozenset[str]) -> ModelOutput:
            assert teacher is not None
            if shared is not None and set(need) <= {LOGITS}:
                return ModelOutput(logits=shared[batch.index.to(shared.device)])
            was_training = teacher.training
            teacher.eval()
            with torch.no_grad():
                out = teacher(batch.inputs, need=need)
            teacher.train(was_training)
            return out

        sample = next(self._batches(factory, encoded[TRAIN], labels, spec.budget.batch_size, torch.Generator().manual_seed(spec.seed), data.task, False, None))
        extra = method.extra_modules(student, teacher, SetupInfo(sample=sample, train_size=labels.shape[0], device=self.device))
        if extra is not None:
            extra = extra.to(self.device)
        params = list(student.parameters()) + (list(extra.parameters()) if extra is not None else [])
        per_epoch = max(labels.shape[0] // spec.budget.batch_size, 1)
        optimizer, scheduler = build_optimizer(params, spec.optimizer, steps, per_epoch, spec.budget.epochs is not None)
        ctx = StepContext(student=student, teacher=teacher, extra=extra, student_optimizer=optimizer, scheduler=scheduler,
                          problem=problem, device=self.device, total_steps=steps, train_size=labels.shape[0],
                          teacher_forward=teacher_forward, next_quiz_batch=next_quiz_batch, autocast=self._autocast(),
                          seed=spec.seed, quiz_size=int(labels_tensor(data, QUIZ).shape[0]) if QUIZ in encoded else 0, build_teacher=(lambda: (lambda f, o: f.build(o, problem).to(self.device))(*self._factory(spec.teacher))) if teacher is not None else None)  # noqa: E501 (methods helper: one line until the train package lands)
        if teacher is not None:
            teacher.requires_grad_(method.updates_teacher)
        method.setup(ctx)

        def step_fn(batch: Batch, step: int) -> dict[str, torch.Tensor]:
            ctx.step = step
            values = method.train_step(ctx, batch)
            values.setdefault("lr", torch.tensor(optimizer.param_groups[0]["lr"]))
            return values

        def on_log(step: int, values: dict[str, float]) -> None:
            call_lifecycle(self.registry, "kdbench_train_log", spec=spec, step=step, values=values)

        def on_eval(step: int, metrics: dict[str, dict[str, float]]) -> None:
            for split, m in metrics.items():
                call_lifecycle(self.registry, "kdbench_eval_result", spec=spec, step=step, split=split, metrics=m)

        with meter:
            history = self._train_loop(
                model=student, step_fn=step_fn, batches=train_batches, steps=steps, budget=spec.budget,
                evaluate_fn=lambda: evaluate(student, factory, data, encoded, spec.budget.eval_batch_size, self.device),
                meter=meter, on_log=on_log, on_eval=on_eval, desc=f"{spec.method} {spec.task.name} seed {spec.seed}",
                heartbeat=lambda: self.store.heartbeat(spec.hash))
        metrics = select_metrics(history, spec.selection, data.task.main_metric)
        cost = meter.summary()
        cost["student_params"] = sum(p.numel() for p in params)
        cost["shared_teacher_outputs"] = shared is not None
        return RunResult(DONE, metrics=metrics, history=history, cost=cost, env=env)


def select_metrics(history: list[dict[str, Any]], selection: str, main_metric: str) -> dict[str, Any]:
    """The reported evaluation: the final one, or the one with the best *validation*
    score (earliest on ties). Never selected on the test split."""
    chosen = history[-1]
    if selection == "validation":
        chosen = max(history, key=lambda h: (h[VALIDATION][main_metric], -h["step"]))
    return {"step": chosen["step"], "selection": selection, "main_metric": main_metric,
            **{split: vals for split, vals in chosen.items() if split != "step"}}


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)
