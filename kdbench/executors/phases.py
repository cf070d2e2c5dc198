"""The store side of running a suite, shared by every executor: the teachers-first phase,
claiming and recording runs, the outcome of a session.

First every teacher the pending runs need is fine-tuned (or found ready) through
:func:`kdbench.train.teachers.provide_teacher`; only then are student runs claimed, so a
process killed while a teacher trains charges no run an attempt. A teacher that fails or
diverges is recorded on its own row and its runs are marked failed "blocked by teacher
<hash>: <reason>" without an attempt (they are tried again once the teacher trains).
Finished runs (done or diverged) are skipped, so a killed suite resumes where it stopped;
failed runs and runs left ``running`` by a dead process are done again, up to
:data:`MAX_ATTEMPTS` starts in all for a run whose process keeps dying under it (then it
is recorded as failed).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kdbench.api import KDBenchError
from kdbench.display import say  # executors print through it (above the suite's progress bar)
from kdbench.registry import Registry, call_lifecycle
from kdbench.spec import RunSpec
from kdbench.store import DIVERGED, FAILED, FINISHED, ResultsStore
from kdbench.train.artefacts import DISK_FULL_PREFIX, DiskFull
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
        say(f"    {spec.hash}: {(store.get(spec.hash) or {}).get('error')}")
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


def release_for_full_disk(store: ResultsStore, spec_hash: str, exc: DiskFull) -> None:
    """Give back the claim of a run stopped by a full disk: ``failed`` with
    ``interrupted: disk full (...)`` until the next command trains it, never a result. The
    store may be on the full disk too: then the claim stays, owned by this process, and
    the next command takes it over once this process has ended."""
    try:
        store.release(spec_hash, f"{DISK_FULL_PREFIX} ({str(exc)[:300]})")
    except (OSError, KDBenchError):
        pass


def stop_teacher_for_full_disk(store: ResultsStore, teacher_hash: str, exc: DiskFull) -> None:
    """The teacher-row twin of :func:`release_for_full_disk` (trained again by the next command)."""
    try:
        store.finish_teacher(teacher_hash, FAILED, error=f"{DISK_FULL_PREFIX} ({str(exc)[:300]})")
    except (OSError, KDBenchError):
        pass


def describe_result(spec: RunSpec, result: RunResult) -> str:
    if result.status == "done" and result.metrics:
        main = result.metrics["main_metric"]
        score = result.metrics.get("test", {}).get(main)
        return f"done, test {main} {score:.4f}, {result.cost['wall_s']:.1f} s" if result.cost else "done"
    first_line = (result.error or "").strip().splitlines()[-1:] or [""]
    return f"{result.status}: {first_line[0][:200]}"


@contextlib.contextmanager
def heartbeat(store: ResultsStore, spec_hash: str, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Beat a claimed run's heart from a background thread while it trains."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                store.heartbeat(spec_hash)
            except Exception as exc:  # a busy or full disk must not kill the run
                say(f"    {spec_hash}: heartbeat not written ({type(exc).__name__}: {exc})")

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
                say(f"teacher {th} ({spec.task.name}) failed: {exc.reason}")
                continue
            if got is not None:
                ready[th] = got
    return ready, failed
