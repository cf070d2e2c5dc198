"""Deprecated location of the runner; kept so code written against it keeps working.

The training code lives in :mod:`kdbench.train` (one module per concern). The old
``Runner(results_dir, store, ...)`` fine-tuned its teacher on demand through the store;
this compatibility class does the same through the teachers-first function
(:func:`kdbench.train.teachers.provide_teacher`) before handing the run to the new runner,
which never touches the store. New code: use an executor, or ``kdbench.train.Runner``
with a :class:`~kdbench.train.teachers.TeacherCheckpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdbench.registry import Registry
from kdbench.spec import RunSpec
from kdbench.store import ResultsStore
from kdbench.train import Runner as _Runner
from kdbench.train import RunResult, predict, select_metrics  # noqa: F401  (re-exported)
from kdbench.train.teachers import TeacherCheckpoint, TeacherFailed, needs_teacher, provide_teacher


class Runner(_Runner):
    """``Runner(results_dir, store, registry, ...)``: runs that provide their own teacher."""

    def __init__(self, results_dir: str | Path, store: ResultsStore, registry: Registry | None = None, **kwargs: Any):
        super().__init__(results_dir, registry, **kwargs)
        self.store = store

    def run(self, spec: RunSpec, teacher: TeacherCheckpoint | None = None) -> RunResult:
        if teacher is None and needs_teacher(self.registry, spec):
            try:
                teacher = provide_teacher(spec, self.results_dir, self.store, self.registry, self.device, progress=self.progress)
            except TeacherFailed as exc:
                return RunResult("failed", error=str(exc))
        return super().run(spec, teacher)
