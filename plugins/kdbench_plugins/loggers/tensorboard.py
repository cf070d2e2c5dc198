"""``tensorboard`` tracker: every run's losses, evaluation metrics and cost as TensorBoard
scalars, so runs can be watched live in the tool people already use.

Enable it in a suite with ``trackers: [tensorboard]``; it stays silent otherwise. It is a
:class:`kdbench.protocols.Tracker` contributed through the ``kdbench_trackers`` hook (one
instance per run, in the process that trains it) and writes event files under
``<results>/runs/<hash>/tensorboard/``; view them with
``tensorboard --logdir <results>/runs``. Tags: ``train/<name>`` (loss, its parts, lr),
``<split>/<metric>`` (e.g. ``validation/accuracy``), ``cost/<name>`` (wall_s, ...)
at the last step, and the run's spec and status as text.

Needs the optional ``tensorboard`` package (``pip install 'kdbench[tensorboard]'``); when
the tracker is enabled without it, creating it fails with a message that says so (the core
reports a tracker's error as a warning and the run goes on untracked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdbench.api import KDBenchError
from kdbench.hookspecs import hookimpl
from kdbench.protocols import Tracker

SUBDIR = "tensorboard"


def _summary_writer_class() -> type:
    try:
        import tensorboard  # noqa: F401  (torch's writer imports it lazily; fail early and clearly)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise KDBenchError("the 'tensorboard' tracker is enabled in the suite but the tensorboard package is not "
                           f"installed ({exc}); install it with: pip install 'kdbench[tensorboard]'") from None
    return SummaryWriter


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    description = "losses, evaluation metrics and cost as TensorBoard scalars under <results>/runs/<hash>/tensorboard/"

    def __init__(self, spec: Any, run_dir: Path):
        super().__init__(spec, run_dir)
        logdir = Path(run_dir) / SUBDIR
        writer_cls = _summary_writer_class()
        logdir.mkdir(parents=True, exist_ok=True)
        self.writer = writer_cls(log_dir=str(logdir))
        self.writer.add_text("run/spec", "```\n" + json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True) + "\n```", 0)
        self.last_step = 0

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", float(value), step)
        self.last_step = max(self.last_step, step)

    def eval_result(self, step: int, split: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", float(value), step)
        self.last_step = max(self.last_step, step)

    def end(self, status: str, record: dict[str, Any]) -> None:
        try:
            for name, value in sorted((record.get("cost") or {}).items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"cost/{name}", float(value), self.last_step)
            error = (record.get("error") or "").strip().splitlines()[-1:] or [""]
            self.writer.add_text("run/status", f"{status} {error[0]}".strip(), self.last_step)
        finally:
            self.writer.close()


@hookimpl
def kdbench_trackers() -> list[type[Tracker]]:
    return [TensorBoardTracker]
