"""``example-serial`` executor: the runs one after another in this process, newest seed
first, built from kdbench's public executor pieces. The template for a third-party
executor (Slurm, Dask, ...): skip finished runs, train the teachers first, then claim
each run, train it with its teacher checkpoint while its heartbeat beats, record it."""

from __future__ import annotations

from kdbench.executors.phases import SuiteOutcome, heartbeat, note_blocked, note_unclaimed, open_store, pending_runs, record, teachers_first
from kdbench.hookspecs import hookimpl
from kdbench.protocols import Executor
from kdbench.registry import get_registry
from kdbench.train import Runner
from kdbench.train.teachers import needs_teacher


class SerialExecutor(Executor):
    name = "example-serial"
    description = "one run after another, highest seed first (example third-party executor)"

    def run(self, suite, results_dir, *, rerun=False, only=None, registry=None, address=None) -> SuiteOutcome:
        registry = registry or get_registry()
        store, outcome = open_store(results_dir), SuiteOutcome()
        runner = Runner(results_dir, registry, device=suite.spec.device, trackers=tuple(suite.spec.trackers), progress=False)
        specs = sorted((s for s in suite.runs if only is None or only(s)), key=lambda s: -s.seed)
        pending = pending_runs(store, specs, rerun, outcome)
        checkpoints, failures = teachers_first(runner, store, pending)
        for spec in pending:
            needs = needs_teacher(registry, spec)
            if needs and spec.teacher_hash in failures:
                note_blocked(store, spec, failures[spec.teacher_hash], outcome)
            elif not store.claim(spec, rerun=rerun):
                note_unclaimed(store, spec, outcome)
            else:
                with heartbeat(store, spec.hash):
                    result = runner.run(spec, checkpoints.get(spec.teacher_hash) if needs else None)
                record(store, registry, spec, result)
                outcome.trained.append(spec.hash)
                outcome.statuses[spec.hash] = result.status
        return outcome


@hookimpl
def kdbench_executors():
    return [SerialExecutor]
