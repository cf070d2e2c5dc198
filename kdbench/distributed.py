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
  its own Ray task (claimed in the store, so a concurrent process waits rather than
  trains it too); the driver writes its checkpoint atomically into
  ``<results>/teachers/<hash>/`` and only then submits the student runs that need it.
  Runs without a teacher start at once. A worker whose filesystem lacks the checkpoint
  fetches its bytes from Ray's object store.
* **Failure isolation.** A run that raises, diverges or runs out of memory comes back as a
  ``failed``/``diverged`` result (the runner never raises for them). A worker *process*
  that dies (SIGKILL, the kernel OOM killer, a lost node) surfaces as a Ray error: the
  driver claims the run again (its ``attempts`` go up) and resubmits it, at most
  ``max_attempts`` starts in all, then records it ``failed`` with a message saying the
  process died. Ray's own task retries are off so that every start is counted in the store.
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
from kdbench.executor import MAX_ATTEMPTS, SuiteOutcome, _say, describe_result, note_unclaimed, open_store, record
from kdbench.registry import ENTRY_POINT_GROUP, Registry, get_registry
from kdbench.runner import RunResult
from kdbench.spec import RunSpec, Suite
from kdbench.store import DONE, FAILED, FINISHED, ResultsStore

#: Environment variables a worker needs to find the same data and stay offline.
FORWARDED_ENV = ("KDBENCH_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM", "HF_HUB_CACHE", "TORCH_HOME")
HEARTBEAT_S = 60.0
POLL_S = 2.0


def teacher_file(results_dir: Path, teacher_hash: str) -> Path:
    """Where the teacher checkpoint lives (the same path as ``Runner.teacher_path``)."""
    return results_dir / "teachers" / teacher_hash / "model.safetensors"


def _atomic_write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


# ============================================================================ worker side


class _WorkerStore:
    """The few store calls a worker's Runner makes, kept in memory: workers never touch the
    SQLite file (the driver records everything). Teacher rows are handed in by the driver."""

    def __init__(self) -> None:
        self._teachers: dict[str, dict[str, Any]] = {}

    def teacher(self, teacher_hash: str) -> dict[str, Any] | None:
        return self._teachers.get(teacher_hash)

    def claim_teacher(self, teacher_hash: str, task: str, spec: dict) -> bool:
        return True  # the driver has claimed it in the real store

    def finish_teacher(self, teacher_hash: str, status: str, **fields: Any) -> None:
        self._teachers[teacher_hash] = {"hash": teacher_hash, "status": status, **fields}

    def set_teacher(self, teacher_hash: str, path: str) -> None:
        self._teachers[teacher_hash] = {"hash": teacher_hash, "status": DONE, "path": path}

    def heartbeat(self, spec_hash: str) -> None:
        pass  # the driver beats the heart of the claims it holds


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


def _worker_setup(ctx: dict[str, Any]) -> tuple[Any, _WorkerStore]:
    """A Runner (and its in-memory store) per worker process, reused across its tasks so
    the encoded data and the teacher's cached logits are loaded once."""
    os.environ.update(ctx["env"])
    import torch

    from kdbench.runner import Runner

    torch.set_num_threads(ctx["threads"])
    registry = _worker_registry(ctx["plugins"], ctx["plugin_objects"])
    key = ("runner", ctx["results_dir"], ctx["device"], tuple(ctx["trackers"]), id(registry))
    if key not in _WORKER_STATE:
        store = _WorkerStore()
        runner = Runner(ctx["results_dir"], store, registry, device=ctx["device"], trackers=tuple(ctx["trackers"]), progress=False)  # type: ignore[arg-type]
        _WORKER_STATE[key] = (runner, store)
    return _WORKER_STATE[key]


def train_teacher_task(ctx: dict[str, Any], spec_json: str) -> tuple[dict[str, Any], bytes]:
    """Fine-tune one teacher in a scratch folder; return its row fields and checkpoint bytes."""
    try:
        from kdbench.runner import Runner, deterministic_cpu

        base, _ = _worker_setup(ctx)
        spec = RunSpec.model_validate_json(spec_json)
        with tempfile.TemporaryDirectory(prefix="kdbench-teacher-") as scratch:
            store = _WorkerStore()
            runner = Runner(scratch, store, base.registry, device=ctx["device"], progress=False)  # type: ignore[arg-type]
            with deterministic_cpu():  # as the local executor trains it (inside Runner.run)
                row = runner.ensure_teacher(spec)
            blob = Path(row["path"]).read_bytes()
        return {"status": DONE, "metrics": row.get("metrics"), "cost": row.get("cost"), "env": row.get("env")}, blob
    except Exception as exc:
        return {"status": FAILED, "error": "".join(traceback.format_exception(exc))}, b""


def train_run_task(ctx: dict[str, Any], spec_json: str, teacher: list[Any] | None) -> dict[str, Any]:
    """Train one run; ``teacher`` is ``[ObjectRef of the checkpoint bytes]`` (wrapped in a
    list so that Ray fetches the bytes only when this node's filesystem lacks the file)."""
    try:
        runner, store = _worker_setup(ctx)
        spec = RunSpec.model_validate_json(spec_json)
        if teacher is not None and spec.teacher_hash is not None:
            path = teacher_file(Path(ctx["results_dir"]), spec.teacher_hash)
            if not path.exists():
                import ray

                _atomic_write(path, ray.get(teacher[0]))
            store.set_teacher(spec.teacher_hash, str(path))
        return asdict(runner.run(spec))
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
            ray.init(**kwargs)
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
        self.teacher_blob: dict[str, Any] = {}  # teacher hash -> ObjectRef of the checkpoint bytes
        self.ready: deque[RunSpec] = deque()
        self.blocked: dict[str, list[RunSpec]] = {}  # teacher hash -> runs waiting for it
        self.waiting_teachers: dict[str, RunSpec] = {}  # trained by another live process
        self.n_done = 0

    # -- bookkeeping -------------------------------------------------------------------
    def _needs_teacher(self, spec: RunSpec) -> bool:
        return spec.teacher_hash is not None and self.registry.method(spec.method).uses_teacher

    def _teacher_ready(self, th: str) -> bool:
        row = self.store.teacher(th)
        return row is not None and row["status"] == DONE and bool(row.get("path")) and Path(row["path"]).exists()

    def _release_blocked(self, th: str) -> None:
        self.ready.extend(self.blocked.pop(th, []))

    def _fail_blocked(self, th: str, error: str) -> None:
        for spec in self.blocked.pop(th, []):
            if self.store.claim(spec, rerun=self.rerun, max_crashes=self.max_attempts):
                self._record(spec, RunResult(FAILED, error=f"its teacher {th} could not be trained:\n{error}"))
            else:
                note_unclaimed(self.store, spec, self.outcome)

    def _record(self, spec: RunSpec, result: RunResult) -> None:
        record(self.store, self.registry, spec, result)
        self.outcome.trained.append(spec.hash)
        self.outcome.statuses[spec.hash] = result.status
        self.n_done += 1
        _say(f"[{self.n_done}/{len(self.specs)}] {spec.method} {spec.params_label()} | {spec.task.name} | {spec.student_label} "
             f"| seed {spec.seed} ({spec.hash}) -> {describe_result(spec, result)}")

    # -- submission --------------------------------------------------------------------
    def _submit_teacher(self, th: str, spec: RunSpec) -> None:
        meta, blob = self.teacher_task.remote(self.ctx, spec.model_dump_json())
        self.inflight[meta] = ("teacher", th, spec, blob)

    def _submit_run(self, spec: RunSpec) -> None:
        teacher = None
        if self._needs_teacher(spec):
            th = spec.teacher_hash
            assert th is not None
            if th not in self.teacher_blob:  # trained before this session: ship the file's bytes
                self.teacher_blob[th] = self.ray.put(Path(self.store.teacher(th)["path"]).read_bytes())  # type: ignore[index]
            teacher = [self.teacher_blob[th]]
        ref = self.run_task.remote(self.ctx, spec.model_dump_json(), teacher)
        self.inflight[ref] = ("run", spec)

    def _plan(self) -> None:
        """Skip finished runs; start (or wait for) each distinct teacher the rest need."""
        teachers: dict[str, RunSpec] = {}
        for spec in self.specs:
            row = self.store.get(spec.hash)
            if row is not None and row["status"] in FINISHED and not self.rerun:
                self.outcome.skipped.append(spec.hash)
                self.outcome.statuses[spec.hash] = row["status"]
            elif self._needs_teacher(spec):
                th = spec.teacher_hash
                assert th is not None
                teachers.setdefault(th, spec)
                self.blocked.setdefault(th, []).append(spec)
            else:
                self.ready.append(spec)
        for th, spec in teachers.items():
            self._start_teacher(th, spec)

    def _start_teacher(self, th: str, spec: RunSpec) -> None:
        row = self.store.teacher(th)
        if row is not None and row["status"] == DONE and not self._teacher_ready(th):
            # recorded but its checkpoint is gone: train it again rather than wait forever
            self.store.finish_teacher(th, FAILED, error=f"checkpoint {row.get('path')} is missing")
        if self._teacher_ready(th):
            self.waiting_teachers.pop(th, None)
            self._release_blocked(th)
        elif self.store.claim_teacher(th, spec.task.name, spec.teacher.model_dump(mode="json")):  # type: ignore[union-attr]
            self.waiting_teachers.pop(th, None)
            _say(f"teacher {th} ({spec.task.name}): training once for {len(self.blocked.get(th, []))} run(s)")
            self._submit_teacher(th, spec)
        else:
            self.waiting_teachers[th] = spec  # another live process trains it: look again later

    def _fill(self) -> None:
        while self.ready and len(self.inflight) < self.window:
            spec = self.ready.popleft()
            if not self.store.claim(spec, rerun=self.rerun, max_crashes=self.max_attempts):
                note_unclaimed(self.store, spec, self.outcome)
                continue
            self._submit_run(spec)

    # -- results -----------------------------------------------------------------------
    def _crashed(self, key: str, exc: Exception) -> bool:
        """Count a dead worker; True if the task should be started again."""
        self.crashes[key] = self.crashes.get(key, 0) + 1
        n = self.crashes[key]
        _say(f"    {key}: the worker process died ({type(exc).__name__}); attempt {n} of {self.max_attempts}")
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
                result = RunResult(**self.ray.get(ref))
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
            meta = self.ray.get(ref)
        except RayTaskError as exc:
            meta = {"status": FAILED, "error": str(exc)}
        except RayError as exc:
            if self._crashed(f"teacher {th}", exc):
                self._submit_teacher(th, spec)
                return
            meta = {"status": FAILED, "error": self._crash_error(f"teacher {th}", exc)}
        if meta["status"] != DONE:
            self.store.finish_teacher(th, FAILED, error=meta["error"])
            _say(f"teacher {th} failed: {meta['error'].strip().splitlines()[-1][:200]}")
            self._fail_blocked(th, meta["error"])
            return
        path = teacher_file(self.results_dir, th)
        _atomic_write(path, self.ray.get(blob_ref))
        self.store.finish_teacher(th, DONE, path=str(path), metrics=meta["metrics"], cost=meta["cost"], env=meta["env"])
        self.teacher_blob[th] = blob_ref
        main = meta["metrics"].get("main_metric")
        _say(f"teacher {th}: done, test {main} {meta['metrics'].get('test', {}).get(main, float('nan')):.4f}")
        self._release_blocked(th)

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
