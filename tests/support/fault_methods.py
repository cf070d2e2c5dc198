"""Methods that misbehave on purpose, registered only by the tests."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import torch
from pydantic import Field

from kdbench.api import EMBEDDING, LOGITS, Method, Options, task_loss
from kdbench.hookspecs import hookimpl
from kdbench_plugins.methods.kd import KD


class NanAtStep3(Method):
    name = "nan-at-3"
    description = "labels only, but the loss is NaN from the 3rd step"
    uses_teacher = False

    def loss(self, student, teacher, batch, ctx):
        loss = task_loss(student.logits, batch.labels, self.problem)
        return (loss * float("nan") if ctx.step >= 2 else loss), {}


class Raises(Method):
    name = "raises"
    description = "raises at step 2"
    uses_teacher = False

    def loss(self, student, teacher, batch, ctx):
        if ctx.step == 1:
            raise ValueError("deliberate failure in a method")
        return task_loss(student.logits, batch.labels, self.problem), {}


class LiveKD(KD):
    """KD that asks the teacher for more than logits, so the runner must run it live."""

    name = "kd-live"
    teacher_needs = frozenset({LOGITS, EMBEDDING})


@hookimpl
def kdbench_methods():
    return [NanAtStep3, Raises, LiveKD]


class OutOfMemory(Method):
    name = "oom"
    description = "raises torch.OutOfMemoryError at step 2, as CUDA does when an allocation fails"
    uses_teacher = False

    def loss(self, student, teacher, batch, ctx):
        if ctx.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return task_loss(student.logits, batch.labels, self.problem), {}


class MarkerParams(Options):
    marker: str = Field("", description="a file: absent -> create it and die; present -> train normally")


class DiesOnce(Method):
    """Kills its own process (SIGKILL, like the OOM killer) on the first attempt only."""

    name = "dies-once"
    description = "SIGKILLs its process at step 2 unless the marker file exists (then trains)"
    uses_teacher = False
    Params = MarkerParams

    def loss(self, student, teacher, batch, ctx):
        marker = Path(self.params.marker)
        if ctx.step == 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return task_loss(student.logits, batch.labels, self.problem), {}


class DiesAlways(Method):
    name = "dies-always"
    description = "SIGKILLs its process at step 2, every time"
    uses_teacher = False

    def loss(self, student, teacher, batch, ctx):
        if ctx.step == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return task_loss(student.logits, batch.labels, self.problem), {}


class DiskFullOnce(Method):
    """Meets a full disk writing an artefact (ENOSPC from the file system, turned into
    ``DiskFull`` by kdbench's own writer, as a teacher-logits or checkpoint write would be)
    unless the marker file exists: the marker stands for the space freed afterwards."""

    name = "disk-full-once"
    description = "its artefact write at step 2 meets a full disk unless the marker file exists (then trains)"
    uses_teacher = False
    Params = MarkerParams

    def loss(self, student, teacher, batch, ctx):
        marker = Path(self.params.marker)
        if ctx.step == 1 and not marker.exists():
            from unittest import mock

            from kdbench.train import artefacts

            def full(path, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            marker.write_text(str(os.getpid()))
            with mock.patch.object(Path, "write_bytes", full):
                artefacts.write_bytes(marker.with_name("artefact.bin"), b"x" * 64)
        return task_loss(student.logits, batch.labels, self.problem), {}


@hookimpl(specname="kdbench_methods")
def more_methods():
    return [OutOfMemory, DiesOnce, DiesAlways, DiskFullOnce]
