"""Run a suite's specs: the teachers-first phase, then claim each run in the store, train
it, record the outcome.

The local executor trains runs one after another in this process. First every teacher
the pending runs need is fine-tuned (or found ready) through
:func:`kdbench.train.teachers.provide_teacher`; only then are student runs claimed, so a
process killed while a teacher trains charges no run an attempt. A teacher that another
process is fine-tuning is not waited for there: this process trains the runs whose
teachers are ready and waits for that teacher (before claiming) only when nothing else is
left. A teacher that fails or diverges is recorded on its own row and its runs are marked
failed "blocked by teacher <hash>: <reason>" without an attempt (they are tried again once the teacher trains).
Finished runs (done or diverged) are skipped, so a killed suite resumes where it stopped;
failed runs and runs left ``running`` by a dead process are done again, up to
:data:`MAX_ATTEMPTS` starts in all for a run whose process keeps dying under it (then it
is recorded as failed). The Ray executor (:mod:`kdbench.distributed`) shares the phase,
the outcome type and the bound.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kdbench.api import KDBenchError
from kdbench.hookspecs import hookimpl
from kdbench.protocols import Executor
from kdbench.registry import Registry, call_lifecycle, get_registry
from kdbench.spec import RunSpec, Suite
from kdbench.store import DIVERGED, FAILED, FINISHED, ResultsStore
from kdbench.train.runner import RunResult, Runner
from kdbench.train.teachers import TeacherCheckpoint, TeacherFailed, needs_teacher, provide_teacher

STORE_NAME = "store.sqlite"
#: Starts of a run whose process died under it before it is recorded as failed.
MAX_ATTEMPTS = 3
#: Seconds between heartbeats of a claimed run (so other hosts see its owner alive).
HEARTBEAT_S = 30.0


@dataclass
class SuiteOutcome:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # claimed by another live process
    given_up: list[str] = field(default_factory=list)  # its process died MAX_ATTEMPTS times: recorded failed
    blocked: list[str] = field(default_factory=list)  # its teacher could not be trained: recorded failed
    statuses: dict[str, str] = field(default_factory=dict)

    @property
    def unsuccessful(self) -> bool:
        """True when any run of this session ended failed or diverged (or stayed blocked)."""
        return bool(self.blocked or self.given_up) or any(s in (FAILED, DIVERGED) for s in self.statuses.values())


def open_store(results_dir: str | Path) -> ResultsStore:
    return ResultsStore(Path(results_dir) / STORE_NAME)


def record(store: ResultsStore, registry: Registry, spec: RunSpec, result: RunResult) -> None:
    """Write a run's outcome and tell the lifecycle plugins."""
    store.finish(spec, result.status, metrics=result.metrics, history=result.history, cost=result.cost,
                 env=result.env, error=result.error, diverged_step=result.diverged_step)
    row = store.get(spec.hash) or {}
    call_lifecycle(registry, "kdbench_run_end", spec=spec, status=result.status, record=row)


def note_unclaimed(store: ResultsStore, spec: RunSpec, outcome: SuiteOutcome) -> None:
    """File a run that could not be claimed: finished, given up, or held by another process."""
    status = (store.get(spec.hash) or {}).get("status")
    if status in FINISHED:
        outcome.skipped.append(spec.hash)
        outcome.statuses[spec.hash] = status
    elif status == FAILED:
        outcome.given_up.append(spec.hash)
        outcome.statuses[spec.hash] = status
        _say(f"    {spec.hash}: {(store.get(spec.hash) or {}).get('error')}")
    else:
        outcome.busy.append(spec.hash)


def note_blocked(store: ResultsStore, spec: RunSpec, failure: TeacherFailed, outcome: SuiteOutcome) -> None:
    """Mark a run whose teacher failed: failed, "blocked by teacher ...", no attempt charged."""
    if store.block(spec, str(failure)):
        outcome.blocked.append(spec.hash)
        outcome.statuses[spec.hash] = FAILED
    else:
        note_unclaimed(store, spec, outcome)


def pending_runs(store: ResultsStore, specs: list[RunSpec], rerun: bool, outcome: SuiteOutcome) -> list[RunSpec]:
    """The specs still to train (finished ones are filed as skipped unless ``rerun``)."""
    pending = []
    for spec in specs:
        existing = store.get(spec.hash)
        if existing is not None and existing["status"] in FINISHED and not rerun:
            outcome.skipped.append(spec.hash)
            outcome.statuses[spec.hash] = existing["status"]
        else:
            pending.append(spec)
    return pending


def teachers_needed(registry: Registry, specs: list[RunSpec]) -> dict[str, RunSpec]:
    """Each distinct teacher the runs need (hash -> the first run that needs it)."""
    needed: dict[str, RunSpec] = {}
    for spec in specs:
        if needs_teacher(registry, spec):
            needed.setdefault(spec.teacher_hash, spec)
    return needed


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def describe_result(spec: RunSpec, result: RunResult) -> str:
    if result.status == "done" and result.metrics:
        main = result.metrics["main_metric"]
        score = result.metrics.get("test", {}).get(main)
        return f"done, test {main} {score:.4f}, {result.cost['wall_s']:.1f} s" if result.cost else "done"
    first_line = (result.error or "").strip().splitlines()[-1:] or [""]
    return f"{result.status}: {first_line[0][:200]}"


@contextlib.contextmanager
def heartbeat(store: ResultsStore, spec_hash: str, every_s: float = HEARTBEAT_S, teacher: bool = False) -> Iterator[None]:
    """Beat a claimed run's (or ``teacher``'s) heart from a background thread while it trains."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                store.heartbeat(spec_hash, teacher=teacher)
            except Exception as exc:  # a busy or full disk must not kill the run
                _say(f"    {spec_hash}: heartbeat not written ({type(exc).__name__}: {exc})")

    thread = threading.Thread(target=beat, name=f"kdbench-heartbeat-{spec_hash}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def teachers_first(runner: Runner, store: ResultsStore, specs: list[RunSpec], *,
                   wait: bool = True) -> tuple[dict[str, TeacherCheckpoint], dict[str, TeacherFailed]]:
    """The teachers-first phase of the local executor: every teacher the runs need, ready
    or fine-tuned now (once), before any student run is claimed. A teacher that another
    process is fine-tuning is passed over on the first pass and waited for only after this
    process has fine-tuned every teacher nobody had claimed, so two processes started on
    one suite train its teachers side by side instead of one waiting for the other.
    ``wait=False`` skips the waiting pass: such a teacher is then in neither dict, and the
    caller waits for it (:func:`provide_teacher`) when a run first needs it."""
    ready: dict[str, TeacherCheckpoint] = {}
    failed: dict[str, TeacherFailed] = {}
    needed = teachers_needed(runner.registry, specs)
    for wait_now in (False, True) if wait else (False,):
        for th, spec in needed.items():
            if th in ready or th in failed:
                continue
            try:
                got = provide_teacher(spec, runner.results_dir, store, runner.registry, runner.device,
                                      progress=runner.progress, wait=wait_now)
            except TeacherFailed as exc:
                failed[th] = exc
                _say(f"teacher {th} ({spec.task.name}) failed: {exc.reason}")
                continue
            if got is not None:
                ready[th] = got
    return ready, failed


def run_local(suite: Suite, results_dir: str | Path, *, rerun: bool = False, registry: Registry | None = None,
              progress: bool | None = None, only: Callable[[RunSpec], bool] | None = None,
              max_attempts: int = MAX_ATTEMPTS) -> SuiteOutcome:
    """Run ``suite`` in this process (see the module docstring)."""
    registry = registry or get_registry()
    store = open_store(results_dir)
    runner = Runner(results_dir, registry, device=suite.spec.device, trackers=tuple(suite.spec.trackers), progress=progress)
    outcome = SuiteOutcome()
    specs = [s for s in suite.runs if only is None or only(s)]
    pending = pending_runs(store, specs, rerun, outcome)
    # A teacher another process is fine-tuning is not waited for up front: this process
    # first trains the runs whose teachers are ready (in suite order), looking again at
    # the held teacher before each run, and waits for it only when nothing else is left.
    checkpoints, failures = teachers_first(runner, store, pending, wait=False)

    def teacher_known(spec: RunSpec, wait: bool) -> bool:
        """Look (or wait) for ``spec``'s teacher; True once it is ready or failed."""
        if spec.teacher_hash not in checkpoints and spec.teacher_hash not in failures:
            more, failed = teachers_first(runner, store, [spec], wait=wait)
            checkpoints.update(more)
            failures.update(failed)
        return spec.teacher_hash in checkpoints or spec.teacher_hash in failures

    bar = suite_progress(len(pending), suite.name, runner.progress)
    queue, held, i = list(pending), [], 0
    while queue or held:
        if not queue:  # only runs whose teacher another process holds: wait for it
            queue, held = held, []
            teacher_known(queue[0], wait=True)
        spec = queue.pop(0)
        needs = needs_teacher(registry, spec)
        if needs and not teacher_known(spec, wait=False):
            held.append(spec)
            continue
        i += 1
        bar.update(1)
        if needs and spec.teacher_hash in failures:
            note_blocked(store, spec, failures[spec.teacher_hash], outcome)
            continue
        if not store.claim(spec, rerun=rerun, max_crashes=max_attempts):
            note_unclaimed(store, spec, outcome)
            continue
        _say(f"[{i}/{len(pending)}] {spec.method} {spec.params_label()} | {spec.task.name} | {spec.student_label} | seed {spec.seed} ({spec.hash})")
        t0 = time.time()
        try:
            with heartbeat(store, spec.hash):
                result = runner.run(spec, checkpoints.get(spec.teacher_hash) if needs else None)  # type: ignore[arg-type]
        except KeyboardInterrupt:
            store.release(spec.hash)
            raise
        record(store, registry, spec, result)
        outcome.trained.append(spec.hash)
        outcome.statuses[spec.hash] = result.status
        _say(f"    -> {describe_result(spec, result)} ({time.time() - t0:.0f} s in all)")
    bar.close()
    return outcome


def suite_progress(total: int, name: str, enabled: bool):
    """The suite-level progress bar (silent when not writing to a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"suite {name}", position=0, disable=not enabled, dynamic_ncols=True)


class LocalExecutor(Executor):
    name = "local"
    description = "one run after another in this process (teachers first)"

    def run(self, suite: Any, results_dir: str | Path, *, rerun: bool = False, only: Callable[[Any], bool] | None = None,
            registry: Any = None, address: str | None = None) -> SuiteOutcome:
        if address:
            raise KDBenchError("--address is for executors that run on a cluster (e.g. ray), not 'local'")
        return run_local(suite, results_dir, rerun=rerun, registry=registry, only=only)


@hookimpl
def kdbench_executors() -> list[type[Executor]]:
    return [LocalExecutor]
