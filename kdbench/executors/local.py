"""The local executor: a suite's runs one after another in this process.

Teachers come first (:mod:`kdbench.executors.phases`). A teacher that another process is
fine-tuning is not waited for there: this process trains the runs whose teachers are
ready and waits for that teacher (before claiming) only when nothing else is left.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from kdbench.api import KDBenchError
from kdbench.display import SuiteProgress, run_line, run_titles
from kdbench.executors.phases import (MAX_ATTEMPTS, SuiteOutcome, describe_result, heartbeat, note_blocked, note_unclaimed, release_for_full_disk,
                                      open_store, pending_runs, record, say, teachers_first)
from kdbench.hookspecs import hookimpl
from kdbench.protocols import Executor
from kdbench.registry import Registry, get_registry
from kdbench.spec import RunSpec, Suite
from kdbench.store import ResultsStore
from kdbench.train.artefacts import DiskFull
from kdbench.train.runner import RunResult, Runner
from kdbench.train.teachers import TeacherCheckpoint, needs_teacher


def _train_claimed(runner: Runner, store: ResultsStore, spec: RunSpec, checkpoint: TeacherCheckpoint | None) -> RunResult:
    """Train a run this process has claimed, its heart beating; an interrupt gives the claim
    back, and so does a full disk (the same command trains it once there is room)."""
    try:
        with heartbeat(store, spec.hash):
            return runner.run(spec, checkpoint)
    except KeyboardInterrupt:
        store.release(spec.hash)
        raise
    except DiskFull as exc:
        release_for_full_disk(store, spec.hash, exc)
        raise


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

    bar = SuiteProgress(len(pending), suite.name, runner.progress)
    runner.progress = runner.progress and len(pending) < 2  # the suite's bar is the one bar: no step bars under it
    titles = run_titles(suite, registry)
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
        if needs and spec.teacher_hash in failures:
            note_blocked(store, spec, failures[spec.teacher_hash], outcome)
            bar.finished("blocked")
            continue
        if not store.claim(spec, rerun=rerun, max_crashes=max_attempts):
            note_unclaimed(store, spec, outcome)
            bar.skipped()
            continue
        say(f"[{i}/{len(pending)}] {run_line(spec, titles.get(spec.hash, spec.method))}")
        t0 = time.time()
        result = _train_claimed(runner, store, spec, checkpoints.get(spec.teacher_hash) if needs else None)  # type: ignore[arg-type]
        record(store, registry, spec, result)
        outcome.trained.append(spec.hash)
        outcome.statuses[spec.hash] = result.status
        say(f"    -> {describe_result(spec, result)} ({time.time() - t0:.0f} s in all)")
        bar.finished(result.status)
    bar.close()
    return outcome


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
