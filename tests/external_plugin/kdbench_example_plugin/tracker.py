"""``jsonl`` tracker: every training log and evaluation of a run as one JSON line in
``<results>/runs/<hash>/events.jsonl``. The template for a tracker: one class, one hook,
one entry point; enable it in a suite with ``trackers: [jsonl]``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdbench.hookspecs import hookimpl
from kdbench.protocols import Tracker


class JsonlTracker(Tracker):
    name = "jsonl"
    description = "training logs and evaluations as JSON lines in runs/<hash>/events.jsonl (example plugin)"

    def __init__(self, spec: Any, run_dir: Path):
        super().__init__(spec, run_dir)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(run_dir) / "events.jsonl", "w")

    def _write(self, **event: Any) -> None:
        self.file.write(json.dumps(event, sort_keys=True) + "\n")

    def log(self, step: int, values: dict[str, float]) -> None:
        self._write(kind="train", step=step, values=values)

    def eval_result(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self._write(kind="eval", step=step, split=split, metrics=metrics)

    def end(self, status: str, record: dict[str, Any]) -> None:
        self._write(kind="end", status=status)
        self.file.close()


@hookimpl
def kdbench_trackers():
    return [JsonlTracker]
