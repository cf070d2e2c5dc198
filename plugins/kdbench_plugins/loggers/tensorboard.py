"""``tensorboard`` tracker: every run's losses, evaluation metrics and cost as TensorBoard
scalars, so runs can be watched live in the tool people already use.

Enable it in a suite with ``trackers: [tensorboard]``; it stays silent otherwise. It uses
only the run lifecycle hooks (``kdbench_run_start``, ``kdbench_train_log``,
``kdbench_eval_result``, ``kdbench_run_end``) and writes event files under
``<results>/runs/<hash>/tensorboard/``; view them with
``tensorboard --logdir <results>/runs``. Tags: ``train/<name>`` (loss, its parts, lr),
``<split>/<metric>`` (e.g. ``validation/accuracy``), ``cost/<name>`` (wall_s, ...)
at the last step, and the run's spec and status as text.

Needs the optional ``tensorboard`` package (``pip install 'kdbench[tensorboard]'``); when
the tracker is enabled without it, run start fails with a message that says so (the core
reports a lifecycle plugin's error as a warning and the run goes on untracked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdbench.api import KDBenchError
from kdbench.hookspecs import hookimpl

TRACKER_NAME = "tensorboard"
SUBDIR = "tensorboard"

# spec hash -> (SummaryWriter, last step seen); one process trains one run at a time, but
# keying by hash keeps concurrent runs in one process apart too.
_writers: dict[str, list[Any]] = {}


def _summary_writer_class() -> type:
    try:
        import tensorboard  # noqa: F401  (torch's writer imports it lazily; fail early and clearly)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise KDBenchError("the 'tensorboard' tracker is enabled in the suite but the tensorboard package is not "
                           f"installed ({exc}); install it with: pip install 'kdbench[tensorboard]'") from None
    return SummaryWriter


@hookimpl
def kdbench_run_start(spec: Any, run_dir: str, trackers: list[str]) -> None:
    if TRACKER_NAME not in trackers:
        return
    writer_cls = _summary_writer_class()
    logdir = Path(run_dir) / SUBDIR
    logdir.mkdir(parents=True, exist_ok=True)
    writer = writer_cls(log_dir=str(logdir))
    writer.add_text("run/spec", "```\n" + json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True) + "\n```", 0)
    _writers[spec.hash] = [writer, 0]


@hookimpl
def kdbench_train_log(spec: Any, step: int, values: dict[str, float]) -> None:
    entry = _writers.get(spec.hash)
    if entry is None:
        return
    for name, value in values.items():
        entry[0].add_scalar(f"train/{name}", float(value), step)
    entry[1] = max(entry[1], step)


@hookimpl
def kdbench_eval_result(spec: Any, step: int, split: str, metrics: dict[str, float]) -> None:
    entry = _writers.get(spec.hash)
    if entry is None:
        return
    for name, value in metrics.items():
        entry[0].add_scalar(f"{split}/{name}", float(value), step)
    entry[1] = max(entry[1], step)


@hookimpl
def kdbench_run_end(spec: Any, status: str, record: dict[str, Any]) -> None:
    entry = _writers.pop(spec.hash, None)
    if entry is None:
        return
    writer, step = entry
    try:
        for name, value in sorted((record.get("cost") or {}).items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"cost/{name}", float(value), step)
        error = (record.get("error") or "").strip().splitlines()[-1:] or [""]
        writer.add_text("run/status", f"{status} {error[0]}".strip(), step)
    finally:
        writer.close()
