"""The trackers a suite enabled, for one run: created at its start, fed its logs and
evaluations, closed at its end. A tracker's exception is a warning naming it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from kdbench.protocols import Tracker
from kdbench.registry import Registry
from kdbench.spec import RunSpec


class RunTrackers:
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    @classmethod
    def start(cls, registry: Registry, names: tuple[str, ...], spec: RunSpec, run_dir: Path) -> "RunTrackers":
        started = []
        for name in names:
            try:
                started.append(registry.tracker(name)(spec, run_dir))
            except Exception as exc:
                _warn(name, "start", exc)
        return cls(started)

    def _each(self, what: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, what)(*args)
            except Exception as exc:
                _warn(tracker.name, what, exc)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._each("log", step, values)

    def eval_result(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self._each("eval_result", step, split, metrics)

    def end(self, status: str, record: dict[str, Any]) -> None:
        self._each("end", status, record)
        self.trackers = []


def _warn(name: str, what: str, exc: Exception) -> None:
    warnings.warn(f"kdbench tracker '{name}' raised in {what}: {type(exc).__name__}: {exc}", stacklevel=3)
