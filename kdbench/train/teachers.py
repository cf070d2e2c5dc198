"""The teachers-first phase: every teacher a suite needs is fine-tuned once (or loaded),
before any student run that needs it starts, through :func:`fine_tune_teacher` in every
executor. A student run then receives a :class:`TeacherCheckpoint` and never touches the
store.

Layout (the one path rule): ``<results>/teachers/<hash>/model.safetensors`` (plus
``.sha256`` sidecar), and beside it ``train_logits.safetensors``, the fixed teacher's
train-split logits shared by methods that only read them. Teacher rows store the path
relative to the results folder, so a results folder can be moved or copied.
"""

from __future__ import annotations

import re
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, overload

import torch
from filelock import FileLock

from kdbench.api import Batch, KDBenchError, KDModel, task_loss
from kdbench.data import TRAIN, TaskData, labels_tensor, load_task_data
from kdbench.registry import Registry
from kdbench.spec import RunSpec, content_hash
from kdbench.store import DONE, FAILED, ResultsStore
import kdbench.train.artefacts as artefacts
from kdbench.train.cost import CostMeter, keep_freed_memory
from kdbench.train.environment import deterministic_cpu, environment, seed_everything
from kdbench.train.evaluation import METRIC_INFO, evaluate, metric_infos, predict
from kdbench.train.inputs import ResolvedModel, encoded_splits, model_factory
from kdbench.train.loop import Diverged, autocast_for, batches, train_loop
from kdbench.train.optim import build_optimizer, total_steps

TEACHERS_DIR = "teachers"
CHECKPOINT = "model.safetensors"
TRAIN_LOGITS = "train_logits.safetensors"


def relative_checkpoint(teacher_hash: str) -> str:
    """The checkpoint's path inside a results folder (what a teacher row stores)."""
    return f"{TEACHERS_DIR}/{teacher_hash}/{CHECKPOINT}"


def checkpoint_path(results_dir: str | Path, teacher_hash: str) -> Path:
    """Where the teacher ``teacher_hash`` of a results folder is kept."""
    return Path(results_dir) / relative_checkpoint(teacher_hash)


@dataclass(frozen=True)
class TeacherCheckpoint:
    """What a student run gets from the teachers-first phase: a verified checkpoint."""

    hash: str
    path: Path
    sha256: str | None = None  # None for checkpoints written before checksums

    @property
    def logits_path(self) -> Path:
        return self.path.with_name(TRAIN_LOGITS)


class TeacherFailed(Exception):
    """A teacher that could not be trained; its runs are blocked, not charged."""

    def __init__(self, teacher_hash: str, reason: str):
        self.teacher_hash, self.reason = teacher_hash, reason
        super().__init__(f"blocked by teacher {teacher_hash}: {reason}")


@dataclass
class TeacherOutcome:
    """The result of fine-tuning one teacher (the fields of its store row)."""

    status: str
    metrics: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    error: str | None = None
    sha256: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def needs_teacher(registry: Registry, spec: RunSpec) -> bool:
    """True when the run's method reads a fine-tuned teacher (the teachers-first phase
    provides one for it)."""
    return spec.teacher_hash is not None and registry.method(spec.method).uses_teacher


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1][:300]


# ------------------------------------------------------------------------ training


def fine_tune_teacher(spec: RunSpec, registry: Registry, device: torch.device, path: Path,
                      progress: bool = False) -> TeacherOutcome:
    """Fine-tune (or, without ``teacher.train``, just build) the teacher of ``spec`` on its
    task and write its checkpoint, with a checksum, to ``path``. Every executor trains
    teachers through this function. Never raises for a failed or diverged teacher: the
    outcome says so."""
    keep_freed_memory()
    try:
        with deterministic_cpu():
            return _fine_tune(spec, registry, device, path, progress)
    except Diverged as exc:
        return TeacherOutcome(FAILED, error=f"the teacher diverged during fine-tuning: {exc}")
    except (KeyboardInterrupt, artefacts.DiskFull):  # a full disk is the environment's, not the teacher's: exit 2
        raise
    except Exception as exc:
        return TeacherOutcome(FAILED, error="".join(traceback.format_exception(exc)))


def _fine_tune(spec: RunSpec, registry: Registry, device: torch.device, path: Path, progress: bool) -> TeacherOutcome:
    assert spec.teacher is not None
    t0 = time.perf_counter()
    data = load_task_data(registry, spec.task, spec.quiz_fraction, spec.data_seed)
    resolved = ResolvedModel.of(registry, spec.teacher)
    factory, encoded = encoded_splits(registry, spec, data, spec.teacher, [TRAIN, *data.eval_splits], resolved)
    training = spec.teacher.train
    seed_everything(training.seed if training else 0)
    model = factory.build(resolved.options, data.objective).to(device)
    meter = CostMeter(device)
    meter.prep_s = time.perf_counter() - t0
    history: list[dict[str, Any]] = []
    with meter:
        if training is not None:
            history = _train_teacher(model, factory, data, encoded, spec, device, meter, progress)
        final = history[-1] if history else {"step": 0, **evaluate(model, factory, data, encoded, 256, device)}
    sha = artefacts.write_tensors(path, model.state_dict())
    metrics = {k: v for k, v in final.items() if k != "step"}
    metrics["main_metric"] = data.task.main_metric
    metrics[METRIC_INFO] = {k: v.to_dict() for k, v in metric_infos(data.objective, history or [final], data.task.main_metric).items()}
    cost = meter.summary()
    cost["params_deployed"] = cost["params_training"] = sum(p.numel() for p in model.parameters())
    env = environment(device, data)
    env["checkpoint_sha256"] = sha
    return TeacherOutcome(DONE, metrics=metrics, cost=cost, env=env, sha256=sha, history=history)


def _train_teacher(model: KDModel, factory: Any, data: TaskData, encoded: dict, spec: RunSpec, device: torch.device,
                   meter: CostMeter, progress: bool) -> list[dict[str, Any]]:
    training = spec.teacher.train  # type: ignore[union-attr]
    labels = labels_tensor(data, TRAIN)
    steps = total_steps(training.budget, labels.shape[0])
    per_epoch = max(labels.shape[0] // training.budget.batch_size, 1)
    opt, sched = build_optimizer(list(model.parameters()), training.optimizer, steps, per_epoch, training.budget.epochs is not None)
    gen = torch.Generator().manual_seed(training.seed)
    train_batches = batches(factory, encoded[TRAIN], labels, training.budget.batch_size, gen, device, data.task, data.task.has_augmentation, meter)
    autocast = autocast_for(device)

    def step_fn(batch: Batch, step: int) -> dict[str, torch.Tensor]:
        with autocast():
            out = model(batch.inputs)
            loss = task_loss(out.logits, data.objective.targets(batch), data.objective, out.mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.detach()}

    return train_loop(model=model, step_fn=step_fn, batches=train_batches, steps=steps, budget=training.budget,
                      evaluate_fn=lambda step, last: evaluate(model, factory, data, encoded, training.budget.eval_batch_size, device),
                      meter=meter, desc=f"teacher {spec.task.name}", progress=progress)


# ------------------------------------------------------------------------ the store side


def record_teacher(store: ResultsStore, teacher_hash: str, outcome: TeacherOutcome) -> None:
    """Write a teacher's outcome on its row (path relative to the results folder)."""
    if outcome.status == DONE:
        store.finish_teacher(teacher_hash, DONE, path=relative_checkpoint(teacher_hash), metrics=outcome.metrics,
                             cost=outcome.cost, env=outcome.env)
    else:
        store.finish_teacher(teacher_hash, FAILED, error=outcome.error)


def ready_teacher(store: ResultsStore, results_dir: Path, teacher_hash: str) -> TeacherCheckpoint | None:
    """The verified checkpoint of a finished teacher, or None when it must be trained:
    never trained, failed, or its file is missing or damaged (then its row is marked
    failed with the file named, so it is rebuilt). Stale temp files are removed first."""
    folder = checkpoint_path(results_dir, teacher_hash).parent
    artefacts.remove_stale_temps(folder)
    row = store.teacher(teacher_hash)
    if row is None or row["status"] != DONE:
        return None
    path = resolve_row_path(results_dir, row)
    sha = (row.get("env") or {}).get("checkpoint_sha256")
    what = f"checkpoint of teacher {teacher_hash}"
    try:
        artefacts.verify(path, what, sha)
        if sha is None and artefacts.expected_sha(path) is None:  # written before checksums: readable?
            artefacts.read_tensors(path, what)
            artefacts.write_sidecar(path)
    except artefacts.ArtefactError as exc:
        warnings.warn(f"{exc}; training it again", stacklevel=2)
        store.finish_teacher(teacher_hash, FAILED, error=f"{exc}; training it again")
        return None
    return TeacherCheckpoint(teacher_hash, path, sha or artefacts.expected_sha(path))


def resolve_row_path(results_dir: Path, row: dict[str, Any]) -> Path:
    """A teacher row's checkpoint: relative rows are inside ``results_dir``; old rows
    hold an absolute path, used while it exists (else the path rule's place)."""
    stored = Path(row.get("path") or relative_checkpoint(row["hash"]))
    if stored.is_absolute():
        return stored if stored.exists() else checkpoint_path(results_dir, row["hash"])
    return Path(results_dir) / stored


@overload
def provide_teacher(spec: RunSpec, results_dir: Path, store: ResultsStore, registry: Registry, device: torch.device,
                    progress: bool = ..., wait_s: float = ..., *, wait: Literal[True] = ...) -> TeacherCheckpoint: ...
@overload
def provide_teacher(spec: RunSpec, results_dir: Path, store: ResultsStore, registry: Registry, device: torch.device,
                    progress: bool = ..., wait_s: float = ..., *, wait: bool) -> TeacherCheckpoint | None: ...


def provide_teacher(spec: RunSpec, results_dir: Path, store: ResultsStore, registry: Registry, device: torch.device,
                    progress: bool = False, wait_s: float = 1.0, *, wait: bool = True) -> TeacherCheckpoint | None:
    """The teacher of ``spec``, fine-tuned once per results folder. When another live
    process is training it, wait for it instead of training it twice (``wait=False``:
    return None at once, so the caller can train another teacher meanwhile). Raises
    :class:`TeacherFailed` when it cannot be trained (recorded on the teacher's row)."""
    th = spec.teacher_hash
    assert th is not None and spec.teacher is not None
    while True:
        ready = ready_teacher(store, results_dir, th)
        if ready is not None:
            return ready
        if store.claim_teacher(th, spec.task.name, spec.teacher.model_dump(mode="json")):
            break
        if not wait:
            return None
        time.sleep(wait_s)
    path = checkpoint_path(results_dir, th)
    try:
        with store.keep_claim(th, teacher=True):  # a long fine-tuning is not taken for a dead claim
            outcome = fine_tune_teacher(spec, registry, device, path, progress)
    except BaseException as exc:  # interrupted: the row must not stay claimed by us
        why = f"{artefacts.DISK_FULL_PREFIX} ({str(exc)[:300]})" if isinstance(exc, artefacts.DiskFull) else f"interrupted: {type(exc).__name__}"
        store.finish_teacher(th, FAILED, error=why)
        raise
    record_teacher(store, th, outcome)
    if outcome.status != DONE:
        raise TeacherFailed(th, _last_line(outcome.error or ""))
    return TeacherCheckpoint(th, path, outcome.sha256)


# ------------------------------------------------------------------------ reading


def load_teacher(checkpoint: TeacherCheckpoint, spec: RunSpec, registry: Registry, data: TaskData, device: torch.device,
                 resolved: ResolvedModel | None = None) -> KDModel:
    """Build the teacher model of ``spec`` (``resolved``: its factory and options, when the
    run has resolved them) with the verified fine-tuned weights."""
    factory, options = (resolved.factory, resolved.options) if resolved is not None else model_factory(registry, spec.teacher)  # type: ignore[arg-type]
    model = factory.build(options, data.objective)
    model.load_state_dict(artefacts.read_tensors(checkpoint.path, f"checkpoint of teacher {checkpoint.hash}", checkpoint.sha256))
    return model.to(device).eval()


def pretrained_teacher(spec: RunSpec, registry: Registry, data: TaskData, device: torch.device) -> KDModel:
    """A fresh teacher from the suite's teacher model spec: its pretrained weights and a
    new head, never fine-tuned by kdbench (``StepContext.build_teacher``)."""
    factory, options = model_factory(registry, spec.teacher)  # type: ignore[arg-type]
    return factory.build(options, data.objective).to(device)


#: safetensors metadata key of the cached logits: what they were computed from.
LOGITS_KEY = "kdbench_inputs"


def logits_inputs(checkpoint: TeacherCheckpoint, spec: RunSpec, registry: Registry, data: TaskData) -> str:
    """What the teacher's train-split logits are computed from, as one content hash: the
    checkpoint's sha256 (a retrained teacher is new weights), the train split's content
    fingerprint (new data at the same path), and the teacher's encoder with its files and
    the task's ``max_length`` (another tokenisation). The teacher's hash alone leaves data
    locations out, so it cannot key this cache."""
    factory, options = model_factory(registry, spec.teacher)  # type: ignore[arg-type]
    return content_hash({"checkpoint": checkpoint.sha256 or artefacts.sha256_file(checkpoint.path),
                         "train": data.fingerprints[TRAIN]["sha256"], "encoder": factory.encoder_id(options),
                         "encoder_files": factory.encoder_fingerprint(options), "max_length": data.task.max_length})


def shared_train_logits(checkpoint: TeacherCheckpoint, compute: Callable[[], torch.Tensor], inputs: str) -> torch.Tensor:
    """The fixed teacher's train-split logits, kept beside its checkpoint with a checksum
    and the key of what they were computed from (``inputs``: :func:`logits_inputs`), and
    reused by every method and seed while that key matches; a damaged, unverifiable or
    stale file is named and rebuilt from ``compute``."""
    path = checkpoint.logits_path
    with computed_once(path):
        what = f"train-split logits of teacher {checkpoint.hash}"
        if path.exists():
            if artefacts.expected_sha(path) is None:
                warnings.warn(f"{what}: {path} has no checksum (written by an older kdbench); computing them again", stacklevel=2)
            else:
                try:  # damage first (named as such), then whether they are this run's logits at all
                    logits = artefacts.read_tensors(path, what)["logits"]
                    if artefacts.read_metadata(path).get(LOGITS_KEY) == inputs:
                        return logits
                    warnings.warn(f"{what}: {path} was computed from another checkpoint, data or tokenisation than this run's; "
                                  "computing them again", stacklevel=2)
                except (artefacts.ArtefactError, KeyError) as exc:
                    warnings.warn(f"{exc}; computing them again", stacklevel=2)
        logits = compute()
        artefacts.write_tensors(path, {"logits": logits}, metadata={LOGITS_KEY: inputs})
        return logits


def shared_teacher_tensors(checkpoint: TeacherCheckpoint, name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Tensors a fixed teacher produced for a method over the training split (its greedy
    responses, its top-k log-probabilities), named ``name`` (which says everything they
    depend on besides the teacher), kept beside the checkpoint with a checksum and reused
    by every method and seed (``StepContext.teacher_cache``); a damaged or unverifiable
    file is named and rebuilt from ``compute``."""
    if not re.fullmatch(r"[A-Za-z0-9_.=-]{1,120}", name):
        raise KDBenchError(f"teacher cache name {name!r}: use letters, digits and _ . = - only (it names a file)")
    path = checkpoint.path.with_name(f"teacher-{name}.safetensors")
    what = f"teacher {checkpoint.hash}'s {name}"
    with computed_once(path):
        if path.exists():
            try:
                if artefacts.expected_sha(path) is not None:
                    return artefacts.read_tensors(path, what)
                warnings.warn(f"{what}: {path} has no checksum; computing it again", stacklevel=2)
            except artefacts.ArtefactError as exc:
                warnings.warn(f"{exc}; computing it again", stacklevel=2)
        tensors = compute()
        artefacts.write_tensors(path, tensors)
        return tensors


def computed_once(path: Path) -> FileLock:
    """An exclusive lock on ``<path>.lock`` (the ``filelock`` package): held while a shared
    teacher artefact is read or computed, so that several ``kdbench run`` processes of one
    suite that reach the same cache together compute it once (the first) and the others
    wait, then read it. The lock file is left beside the artefact (removing it could race
    with a waiting process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def train_logits(teacher: KDModel, spec: RunSpec, registry: Registry, data: TaskData, device: torch.device) -> torch.Tensor:
    """The teacher's logits on the whole training split (eval mode, no grad)."""
    factory, encoded = encoded_splits(registry, spec, data, spec.teacher, [TRAIN])  # type: ignore[arg-type]
    return predict(teacher, factory, encoded[TRAIN], spec.budget.eval_batch_size, device)
