"""Run a suite's specs: claim each in the store, train it, record the outcome.

The local executor trains runs one after another in this process. Finished runs (done or
diverged) are skipped, so a killed suite resumes where it stopped; failed runs and runs
left ``running`` by a dead process are done again, up to :data:`MAX_ATTEMPTS` starts in
all for a run whose process keeps dying under it (then it is recorded as failed). The Ray
executor (:mod:`kdbench.distributed`) shares the outcome type and the bound.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdbench.registry import Registry, call_lifecycle, get_registry
from kdbench.runner import RunResult, Runner
from kdbench.spec import RunSpec, Suite
from kdbench.store import FAILED, FINISHED, ResultsStore

STORE_NAME = "store.sqlite"
#: Starts of a run whose process died under it before it is recorded as failed.
MAX_ATTEMPTS = 3


@dataclass
class SuiteOutcome:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # claimed by another live process
    given_up: list[str] = field(default_factory=list)  # its process died MAX_ATTEMPTS times: recorded failed
    statuses: dict[str, str] = field(default_factory=dict)


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


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def describe_result(spec: RunSpec, result: RunResult) -> str:
    if result.status == "done" and result.metrics:
        main = result.metrics["main_metric"]
        score = result.metrics.get("test", {}).get(main)
        return f"done, test {main} {score:.4f}, {result.cost['wall_s']:.1f} s" if result.cost else "done"
    first_line = (result.error or "").strip().splitlines()[-1:] or [""]
    return f"{result.status}: {first_line[0][:200]}"


def run_local(suite: Suite, results_dir: str | Path, *, rerun: bool = False, registry: Registry | None = None,
              progress: bool | None = None, only: Callable[[RunSpec], bool] | None = None,
              max_attempts: int = MAX_ATTEMPTS) -> SuiteOutcome:
    registry = registry or get_registry()
    store = open_store(results_dir)
    runner = Runner(results_dir, store, registry, device=suite.spec.device, trackers=tuple(suite.spec.trackers), progress=progress)
    outcome = SuiteOutcome()
    specs = [s for s in suite.runs if only is None or only(s)]
    bar = suite_progress(len(specs), suite.name, runner.progress)
    for i, spec in enumerate(specs, 1):
        bar.update(1)
        existing = store.get(spec.hash)
        if existing is not None and existing["status"] in FINISHED and not rerun:
            outcome.skipped.append(spec.hash)
            outcome.statuses[spec.hash] = existing["status"]
            continue
        if not store.claim(spec, rerun=rerun, max_crashes=max_attempts):
            note_unclaimed(store, spec, outcome)
            continue
        _say(f"[{i}/{len(specs)}] {spec.method} {spec.params_label()} | {spec.task.name} | {spec.student_label} | seed {spec.seed} ({spec.hash})")
        t0 = time.time()
        try:
            result = runner.run(spec)
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
