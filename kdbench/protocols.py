"""Base classes of the pluggable parts that are not methods, tasks or models: executors
(how a suite's runs are scheduled) and trackers (where a run's progress is logged).

Plugins contribute them through the ``kdbench_executors`` and ``kdbench_trackers`` hooks
(:mod:`kdbench.hookspecs`); the built-ins are registered the same way, through entry
points. This module imports nothing heavy so the registry can check contributions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

# The types below are named in docstrings, not imported: the registry imports this module,
# and spec/executor import the registry, so importing them here would close a loop.


class Executor:
    """Runs a suite's specs and records each outcome in the results store.

    Contract (what the local and Ray executors do, and the tests check): skip finished
    runs (unless ``rerun``); train every teacher the pending runs need first, once, with
    :func:`kdbench.train.teachers.fine_tune_teacher`; claim a run in the store before
    starting it and keep its heartbeat while it runs; hand the run its teacher checkpoint;
    record its :class:`~kdbench.train.runner.RunResult` with
    :func:`kdbench.executors.phases.record`. Subclass it, give it a unique ``name`` and return the
    class from ``kdbench_executors``; ``kdbench run --executor NAME`` then uses it."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def run(self, suite: Any, results_dir: str | Path, *, rerun: bool = False,
            only: Callable[[Any], bool] | None = None, registry: Any = None,
            address: str | None = None) -> Any:
        """Run ``suite`` (a :class:`~kdbench.spec.Suite`) into ``results_dir``; ``only``
        filters its :class:`~kdbench.spec.RunSpec`s; ``registry`` defaults to the process's;
        ``address`` names a cluster for executors that have one (``--address``). Returns a
        :class:`~kdbench.executors.phases.SuiteOutcome` (trained, skipped, held, given up, statuses)."""
        raise NotImplementedError


class Tracker:
    """Receives one run's training scalars and evaluations while it trains (for example
    TensorBoard or an experiment tracker). One instance per run, created when the run
    starts if the suite lists the tracker's ``name`` under ``trackers``; it lives in the
    process that trains the run. Its exceptions are warnings, never a failed run."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, spec: Any, run_dir: Path):
        """``spec``: the run's :class:`~kdbench.spec.RunSpec`; ``run_dir``: a folder inside
        the results folder this run may write to."""
        self.spec, self.run_dir = spec, run_dir

    def log(self, step: int, values: dict[str, float]) -> None:
        """Training scalars (loss and its parts, learning rate) at a logging step."""

    def eval_result(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """Metrics of one evaluation of the student on ``split`` after ``step`` steps."""

    def end(self, status: str, record: dict[str, Any]) -> None:
        """The run ended with ``status``; ``record`` holds its metrics, cost and error."""
