"""Run a suite on Ray: each run spec is a Ray task with the suite's resources.

Design (why the driver is the only writer):

* The driver (the ``kdbench run --executor ray`` process) is the **single writer** of the
  results store and of the teacher checkpoints. Workers never open the SQLite file: they
  receive a run spec, train it, and return its result (or a teacher's safetensors bytes)
  through Ray. SQLite's locking is unreliable on network filesystems and WAL mode needs
  shared memory on one host, so a cluster whose nodes share no filesystem, or share NFS,
  must not write it concurrently; with one writer the store only has to live beside the
  driver. The claim protocol still runs (in the driver, ``BEGIN IMMEDIATE``), so a local
  ``kdbench run`` and a Ray driver on the same folder never train a run twice, and a
  driver killed with SIGKILL leaves claims owned by a dead pid that the next ``run``
  takes over: it completes exactly the missing runs.
* **Teachers first.** Every distinct teacher the pending runs need is fine-tuned once, as
  its own Ray task running :func:`kdbench.train.teachers.fine_tune_teacher` (the same
  function the local executor uses), claimed in the store so a concurrent process waits
  rather than trains it too; the driver writes its checkpoint atomically, with its
  checksum, into ``<results>/teachers/<hash>/`` and only then submits the student runs
  that need it, each with the checkpoint. A teacher that fails is recorded on its row
  and its runs are marked blocked by it, without an attempt.
  Runs without a teacher start at once. A worker whose filesystem lacks the checkpoint
  fetches its bytes from Ray's object store.
* **Failure isolation.** A run that raises, diverges or runs out of memory comes back as a
  ``failed``/``diverged`` result (the runner never raises for them). A worker *process*
  that dies (SIGKILL, the kernel OOM killer, a lost node) surfaces as a Ray error: the
  driver claims the run again (its ``attempts`` go up) and resubmits it, at most
  ``max_attempts`` starts in all, then records it ``failed`` with a message saying the
  process died. Ray's own task retries are off so that every start is counted in the store.
  A full disk (``DiskFull``) is no run's fault: the worker answers with the message and its
  host, the driver gives the run back (or marks the teacher) and stops with exit code 2.
* At most as many runs are submitted (and claimed) as the cluster can run at once, so
  ``running`` in the store means running, and the rest stay free for other drivers.

Lifecycle hooks: ``kdbench_run_start``/``train_log``/``eval_result`` fire in the worker,
``kdbench_run_end`` in the driver (after the row is written). Extra plugins registered by
module (not installed as entry points) are re-imported in workers by name; on a local
cluster or a shared filesystem their folder is put on the worker's ``sys.path``.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import asdict
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from kdbench.api import KDBenchError
from kdbench.display import SuiteProgress, run_line, run_titles
from kdbench.executors.phases import (MAX_ATTEMPTS, SuiteOutcome, describe_result, note_blocked, note_unclaimed, open_store,
                                      pending_runs, record, release_for_full_disk, say, stop_teacher_for_full_disk, teachers_needed)
from kdbench.hookspecs import hookimpl
from kdbench.protocols import Executor
from kdbench.registry import ENTRY_POINT_GROUP, Registry, get_registry
from kdbench.spec import RunSpec, Suite
from kdbench.store import DONE, FAILED, ResultsStore
import kdbench.train.artefacts as artefacts
from kdbench.train.runner import RunResult
from kdbench.train.teachers import (CHECKPOINT, TeacherCheckpoint, TeacherFailed, TeacherOutcome, checkpoint_path, needs_teacher,
                                    ready_teacher, record_teacher)

#: Environment variables a worker needs to find the same data and stay offline.
FORWARDED_ENV = ("KDBENCH_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM", "HF_HUB_CACHE", "TORCH_HOME")
HEARTBEAT_S = 60.0
POLL_S = 2.0
#: The key of a worker's answer when a full disk stopped its task (its value: the message).
DISK_FULL_KEY = "disk_full"


def _disk_full(exc: artefacts.DiskFull) -> dict[str, str]:
    """A worker's answer for a full disk, naming its host (the driver's disk may be fine)."""
    return {DISK_FULL_KEY: f"on worker host {socket.gethostname()}: {exc}"}


# ============================================================================ worker side


_WORKER_STATE: dict[tuple, Any] = {}


def _worker_registry(plugins: list[tuple[str, str | None]], objects: list[Any]) -> Registry:
    from kdbench.registry import make_plugin_manager, set_registry

    key = ("registry", tuple(plugins), tuple(id(o) for o in objects))
    if key not in _WORKER_STATE:
        for name, root in plugins:
            if root and root not in sys.path:
                try:
                    importlib.import_module(name)
                except ImportError:
                    sys.path.append(root)
        pm, broken = make_plugin_manager(extra_plugins=[name for name, _ in plugins] + list(objects))
        registry = Registry(pm, broken)
        set_registry(registry)
        _WORKER_STATE[key] = registry
    return _WORKER_STATE[key]


def _worker_runner(ctx: dict[str, Any]) -> Any:
    """A Runner per worker process, reused across its tasks so the encoded data and the
    teacher's cached logits are loaded once."""
    os.environ.update(ctx["env"])
    import torch

    from kdbench.train.runner import Runner

    torch.set_num_threads(ctx["threads"])
    registry = _worker_registry(ctx["plugins"], ctx["plugin_objects"])
    key = ("runner", ctx["results_dir"], ctx["device"], tuple(ctx["trackers"]), id(registry))
    if key not in _WORKER_STATE:
        _WORKER_STATE[key] = Runner(ctx["results_dir"], registry, device=ctx["device"], trackers=tuple(ctx["trackers"]), progress=False)
    return _WORKER_STATE[key]


def train_teacher_task(ctx: dict[str, Any], spec_json: str) -> tuple[dict[str, Any], bytes]:
    """Fine-tune one teacher (with the executors' one teacher function) in a scratch
    folder; return its outcome's fields and the checkpoint's bytes."""
    try:
        from kdbench.train.teachers import fine_tune_teacher

        runner = _worker_runner(ctx)
        spec = RunSpec.model_validate_json(spec_json)
        with tempfile.TemporaryDirectory(prefix="kdbench-teacher-") as scratch:
            path = Path(scratch) / CHECKPOINT
            outcome = fine_tune_teacher(spec, runner.registry, runner.device, path)
            blob = path.read_bytes() if outcome.status == DONE else b""
        return asdict(outcome), blob
    except artefacts.DiskFull as exc:  # the environment's, not the teacher's: the driver stops (exit 2)
        return _disk_full(exc), b""
    except Exception as exc:
        return asdict(TeacherOutcome(FAILED, error="".join(traceback.format_exception(exc)))), b""


def train_run_task(ctx: dict[str, Any], spec_json: str, teacher: list[Any] | None, sha: str | None = None) -> dict[str, Any]:
    """Train one run; ``teacher`` is ``[ObjectRef of the checkpoint bytes]`` (wrapped in a
    list so that Ray fetches the bytes only when this node's file is missing or differs
    from ``sha``)."""
    try:
        runner = _worker_runner(ctx)
        spec = RunSpec.model_validate_json(spec_json)
        checkpoint = None
        if teacher is not None and spec.teacher_hash is not None:
            path = checkpoint_path(ctx["results_dir"], spec.teacher_hash)
            try:
                artefacts.verify(path, f"checkpoint of teacher {spec.teacher_hash}", sha)
            except artefacts.ArtefactError:
                import ray

                artefacts.write_bytes(path, ray.get(teacher[0]))
            checkpoint = TeacherCheckpoint(spec.teacher_hash, path, sha)
        return asdict(runner.run(spec, checkpoint))
    except artefacts.DiskFull as exc:  # the environment's, not the run's: the driver stops (exit 2)
        return _disk_full(exc)
    except Exception as exc:  # the runner catches run errors; this is the set-up around it
        return asdict(RunResult(FAILED, error="worker set-up failed:\n" + "".join(traceback.format_exception(exc))))


# ============================================================================ driver side


def _import_root(module: ModuleType) -> str | None:
    """The folder to put on ``sys.path`` so that ``import <module.__name__>`` finds it."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve().parent
    depth = module.__name__.count(".") + (1 if Path(file).name == "__init__.py" else 0)
    for _ in range(depth):
        path = path.parent
    return str(path)


def plugins_for_workers(registry: Registry) -> tuple[list[tuple[str, str | None]], list[Any]]:
    """The plugins a worker must register beyond the installed entry points: modules by
    name (with their import root), other plugin objects as they are (pickled by Ray)."""
    installed = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    modules, objects = [], []
    for plugin in registry.pm.get_plugins():
        if registry.pm.get_name(plugin) in installed:
            continue
        if isinstance(plugin, ModuleType):
            modules.append((plugin.__name__, _import_root(plugin)))
        else:
            objects.append(plugin)
    return modules, objects


#: Ray starts its worker processes at niceness 15, below its own daemons. Here the workers
#: do all the training, and at 15 any normal-priority process on the machine starves them
#: (a busy machine slows a sweep many times over). A cluster kdbench starts runs them at the
#: driver's priority; a cluster you start yourself keeps its own setting
#: (``RAY_worker_niceness``).
LOCAL_CLUSTER_SYSTEM_CONFIG: dict[str, Any] = {"worker_niceness": 0}


def local_cluster_options() -> dict[str, Any]:
    """The ``ray.init`` options of a local cluster kdbench starts (no ``--address``)."""
    return {"include_dashboard": False, "_system_config": dict(LOCAL_CLUSTER_SYSTEM_CONFIG)}


def _connect(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (and must stop it)."""
    try:
        import ray
    except ImportError:
        raise KDBenchError("the ray executor needs Ray: pip install 'kdbench[ray]' (or 'ray[default]')") from None
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "configure_logging": True}
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(**{**kwargs, **local_cluster_options()})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise KDBenchError(f"cannot connect to the Ray cluster at {address or '(a new local one)'}: {exc}") from None
    return True


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "ray://..." and other forms are left to Ray
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise KDBenchError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                           "start one with 'ray start --head' or omit --address to start a local one") from None


def _slots(cpus: float, gpus: float) -> int:
    """How many runs the cluster can hold at once with these per-run resources; refuses a
    suite no node can ever fit (Ray would otherwise wait forever)."""
    import ray

    total = 0
    for node in ray.nodes():
        if not node.get("Alive", True):
            continue
        res = node.get("Resources", {})
        fit = int(res.get("CPU", 0) // cpus) if cpus else 10**6
        if gpus:
            fit = min(fit, int(res.get("GPU", 0) // gpus))
        total += fit
    if total < 1:
        have = ray.cluster_resources()
        raise KDBenchError(f"resources: each run asks for {cpus} CPU(s) and {gpus} GPU(s), but no node of the Ray cluster "
                           f"has that much (cluster: {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs)")
    return total


class _Driver:
    def __init__(self, suite: Suite, results_dir: Path, store: ResultsStore, registry: Registry, rerun: bool,
                 max_attempts: int, specs: list[RunSpec]):
        import ray

        self.ray = ray
        self.suite, self.results_dir, self.store, self.registry = suite, results_dir, store, registry
        self.rerun, self.max_attempts, self.specs = rerun, max_attempts, specs
        self.titles = run_titles(suite, registry)
        res = suite.spec.resources
        modules, objects = plugins_for_workers(registry)
        self.ctx = {
            "results_dir": str(results_dir), "device": suite.spec.device, "trackers": list(suite.spec.trackers),
            "threads": max(1, int(res.cpus)), "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
            "plugins": modules, "plugin_objects": objects,
        }
        opts = {"num_cpus": res.cpus, "num_gpus": res.gpus, "max_retries": 0}
        self.run_task = ray.remote(train_run_task).options(**opts)
        self.teacher_task = ray.remote(train_teacher_task).options(num_returns=2, **opts)
        self.window = _slots(res.cpus, res.gpus)
        self.outcome = SuiteOutcome()
        self.inflight: dict[Any, tuple] = {}  # result ref -> ("run", spec) | ("teacher", hash, spec, bytes ref)
        self.crashes: dict[str, int] = {}
        self.checkpoints: dict[str, tuple[Any, TeacherCheckpoint]] = {}  # hash -> (ObjectRef of the bytes, checkpoint)
        self.ready: deque[RunSpec] = deque()
        self.blocked: dict[str, list[RunSpec]] = {}  # teacher hash -> runs waiting for it
        self.waiting_teachers: dict[str, RunSpec] = {}  # trained by another live process
        self.n_done = 0

    # -- bookkeeping -------------------------------------------------------------------
    def _release_blocked(self, th: str) -> None:
        self.ready.extend(self.blocked.pop(th, []))

    def _fail_blocked(self, th: str, reason: str) -> None:
        """The teacher failed: its runs are marked blocked by it (no attempt charged)."""
        failure = TeacherFailed(th, (reason.strip().splitlines() or [""])[-1][:300])
        for spec in self.blocked.pop(th, []):
            note_blocked(self.store, spec, failure, self.outcome)
            self.bar.finished("blocked")

    def _record(self, spec: RunSpec, result: RunResult) -> None:
        record(self.store, self.registry, spec, result)
        self.outcome.trained.append(spec.hash)
        self.outcome.statuses[spec.hash] = result.status
        self.n_done += 1
        title = self.titles.get(spec.hash, spec.method)
        say(f"[{self.n_done}/{len(self.specs)}] {run_line(spec, title)} -> {describe_result(spec, result)}")
        self.bar.finished(result.status)

    # -- submission --------------------------------------------------------------------
    def _submit_teacher(self, th: str, spec: RunSpec) -> None:
        meta, blob = self.teacher_task.remote(self.ctx, spec.model_dump_json())
        self.inflight[meta] = ("teacher", th, spec, blob)

    def _submit_run(self, spec: RunSpec) -> None:
        teacher, sha = None, None
        if needs_teacher(self.registry, spec):
            blob, checkpoint = self.checkpoints[spec.teacher_hash]  # type: ignore[index]
            teacher, sha = [blob], checkpoint.sha256
        ref = self.run_task.remote(self.ctx, spec.model_dump_json(), teacher, sha)
        self.inflight[ref] = ("run", spec)

    def _plan(self) -> None:
        """Skip finished runs; start (or wait for) each distinct teacher the rest need."""
        pending = pending_runs(self.store, self.specs, self.rerun, self.outcome)
        self.bar = SuiteProgress(len(pending), self.suite.name, None)  # the suite's one bar (on a terminal)
        for spec in pending:
            if needs_teacher(self.registry, spec):
                self.blocked.setdefault(spec.teacher_hash, []).append(spec)  # type: ignore[arg-type]
            else:
                self.ready.append(spec)
        for th, spec in teachers_needed(self.registry, pending).items():
            self._start_teacher(th, spec)

    def _teacher_is_ready(self, th: str) -> bool:
        checkpoint = ready_teacher(self.store, self.results_dir, th)  # verified; a damaged file is marked for rebuilding
        if checkpoint is None:
            return False
        if th not in self.checkpoints:  # trained before this session: ship the file's bytes
            self.checkpoints[th] = (self.ray.put(checkpoint.path.read_bytes()), checkpoint)
        return True

    def _start_teacher(self, th: str, spec: RunSpec) -> None:
        if self._teacher_is_ready(th):
            self.waiting_teachers.pop(th, None)
            self._release_blocked(th)
        elif self.store.claim_teacher(th, spec.task.name, spec.teacher.model_dump(mode="json")):  # type: ignore[union-attr]
            self.waiting_teachers.pop(th, None)
            say(f"teacher {th} ({spec.task.name}): training once for {len(self.blocked.get(th, []))} run(s)")
            self._submit_teacher(th, spec)
        else:
            self.waiting_teachers[th] = spec  # another live process trains it: look again later

    def _fill(self) -> None:
        while self.ready and len(self.inflight) < self.window:
            spec = self.ready.popleft()
            if not self.store.claim(spec, rerun=self.rerun, max_crashes=self.max_attempts):
                note_unclaimed(self.store, spec, self.outcome)
                self.bar.skipped()
                continue
            self._submit_run(spec)

    # -- results -----------------------------------------------------------------------
    def _crashed(self, key: str, exc: Exception) -> bool:
        """Count a dead worker; True if the task should be started again."""
        self.crashes[key] = self.crashes.get(key, 0) + 1
        n = self.crashes[key]
        say(f"    {key}: the worker process died ({type(exc).__name__}); attempt {n} of {self.max_attempts}")
        return n < self.max_attempts

    def _crash_error(self, key: str, exc: Exception) -> str:
        n = self.crashes.get(key, 0)
        return (f"the worker process running it died during each of its {n} attempt(s) in this session "
                f"({type(exc).__name__}: {str(exc).strip()[:500]}); it was killed (SIGKILL, out of host memory, a lost node) "
                f"or crashed; not retried again (use --rerun to try once more)")

    def _on_done(self, ref: Any) -> None:
        from ray.exceptions import RayError, RayTaskError

        entry = self.inflight.pop(ref)
        if entry[0] == "run":
            spec = entry[1]
            try:
                answer = self.ray.get(ref)
                if DISK_FULL_KEY in answer:  # given back, as the local executor does; the command stops
                    full = artefacts.DiskFull(answer[DISK_FULL_KEY])
                    release_for_full_disk(self.store, spec.hash, full)
                    raise full
                result = RunResult(**answer)
            except RayTaskError as exc:  # the task raised past our own handler
                result = RunResult(FAILED, error=str(exc))
            except RayError as exc:
                if self._crashed(spec.hash, exc) and self.store.claim(spec, rerun=True):  # attempts + 1
                    self._submit_run(spec)
                    return
                result = RunResult(FAILED, error=self._crash_error(spec.hash, exc))
            self._record(spec, result)
            return
        _, th, spec, blob_ref = entry
        try:
            answer = self.ray.get(ref)
            if DISK_FULL_KEY in answer:
                full = artefacts.DiskFull(answer[DISK_FULL_KEY])
                stop_teacher_for_full_disk(self.store, th, full)
                raise full
            outcome = TeacherOutcome(**answer)
        except RayTaskError as exc:
            outcome = TeacherOutcome(FAILED, error=str(exc))
        except RayError as exc:
            if self._crashed(f"teacher {th}", exc):
                self._submit_teacher(th, spec)
                return
            outcome = TeacherOutcome(FAILED, error=self._crash_error(f"teacher {th}", exc))
        if outcome.status == DONE:
            try:
                outcome = self._write_teacher(th, outcome, blob_ref)
            except artefacts.DiskFull as exc:  # the driver's own disk
                stop_teacher_for_full_disk(self.store, th, exc)
                raise
        record_teacher(self.store, th, outcome)
        if outcome.status != DONE:
            say(f"teacher {th} failed: {(outcome.error or '').strip().splitlines()[-1][:200]}")
            self._fail_blocked(th, outcome.error or "")
            return
        main = outcome.metrics["main_metric"]  # type: ignore[index]
        say(f"teacher {th}: done, test {main} {outcome.metrics.get('test', {}).get(main, float('nan')):.4f}")  # type: ignore[union-attr]
        self._release_blocked(th)

    def _write_teacher(self, th: str, outcome: TeacherOutcome, blob_ref: Any) -> TeacherOutcome:
        """Write the checkpoint the worker sent (the driver is the only writer) and check
        it arrived intact."""
        path = checkpoint_path(self.results_dir, th)
        sha = artefacts.write_bytes(path, self.ray.get(blob_ref))
        if sha != outcome.sha256:
            return TeacherOutcome(FAILED, error=f"checkpoint of teacher {th}: {path} arrived with sha256 {sha[:12]}..., "
                                                f"the worker wrote {str(outcome.sha256)[:12]}...")
        self.checkpoints[th] = (blob_ref, TeacherCheckpoint(th, path, sha))
        return outcome

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> SuiteOutcome:
        self._plan()
        last_beat = last_poll = time.time()
        try:
            while self.ready or self.inflight or self.waiting_teachers:
                self._fill()
                if self.waiting_teachers and time.time() - last_poll > POLL_S:
                    for th, spec in list(self.waiting_teachers.items()):
                        self._start_teacher(th, spec)
                    last_poll = time.time()
                    self._fill()
                if not self.inflight:
                    if self.waiting_teachers:
                        time.sleep(POLL_S)
                    continue
                done, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=POLL_S)
                for ref in done:
                    self._on_done(ref)
                if time.time() - last_beat > HEARTBEAT_S:
                    for entry in self.inflight.values():
                        if entry[0] == "run":
                            self.store.heartbeat(entry[1].hash)
                    last_beat = time.time()
        except BaseException:  # Ctrl-C or a driver bug: give the claims back, stop the tasks
            for ref, entry in list(self.inflight.items()):
                self.ray.cancel(ref, force=True)
                if entry[0] == "run":
                    self.store.release(entry[1].hash)
            raise
        for th in list(self.blocked):  # a teacher that no one could train (should not happen)
            self._fail_blocked(th, "the teacher was never trained")
        self.bar.close()
        return self.outcome


def run_ray(suite: Suite, results_dir: str | Path, *, rerun: bool = False, address: str | None = None,
            only: Callable[[RunSpec], bool] | None = None, registry: Registry | None = None,
            max_attempts: int = MAX_ATTEMPTS) -> SuiteOutcome:
    """Run ``suite`` on Ray (a new local cluster, the one this process is connected to, or
    the cluster at ``address``). Same skipping, claims and outcome as ``run_local``."""
    registry = registry or get_registry()
    results_dir = Path(results_dir).resolve()  # workers may run in another directory
    store = open_store(results_dir)
    specs = [s for s in suite.runs if only is None or only(s)]
    started = _connect(address)
    try:
        return _Driver(suite, results_dir, store, registry, rerun, max_attempts, specs).run()
    finally:
        if started:
            import ray

            ray.shutdown()


class RayExecutor(Executor):
    name = "ray"
    description = "each run a Ray task on a local or remote cluster (--address); teachers first, the driver writes the store"

    def run(self, suite: Any, results_dir: str | Path, *, rerun: bool = False, only: Callable[[Any], bool] | None = None,
            registry: Any = None, address: str | None = None) -> SuiteOutcome:
        return run_ray(suite, results_dir, rerun=rerun, address=address, only=only, registry=registry)


@hookimpl
def kdbench_executors() -> list[type[Executor]]:
    return [RayExecutor]
