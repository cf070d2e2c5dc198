"""Two ``kdbench run`` processes of one suite that reach the same teacher cache together
compute it once: the first holds ``<cache>.lock`` while it computes, the other waits and
then reads the file (before the lock, llm-real-cpu's two processes each computed the same
top-k cache, minutes of a 135M teacher twice)."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import torch

import kdbench.train.artefacts as artefacts
from kdbench.train.teachers import TeacherCheckpoint, shared_teacher_tensors, shared_train_logits


def _checkpoint(folder: Path) -> TeacherCheckpoint:
    path = folder / "model.safetensors"
    return TeacherCheckpoint("t0", path, artefacts.write_tensors(path, {"w": torch.ones(2)}) if not path.exists() else None)


def _worker(folder: str, barrier: "mp.Barrier", out: "mp.Queue") -> None:
    checkpoint = TeacherCheckpoint("t0", Path(folder) / "model.safetensors")
    barrier.wait(timeout=120)  # both start reading together, whatever each one's import took
    out.put({kind: _read(folder, checkpoint, kind) for kind in ("tensors", "logits")})


def _read(folder: str, checkpoint: TeacherCheckpoint, kind: str) -> list:
    def compute():
        with open(Path(folder) / f"computed-{kind}.log", "a") as log:  # one line per computation
            log.write("x\n")
        time.sleep(1.0)  # long enough that the second process arrives while the first computes
        return {"top": torch.arange(6.0).reshape(2, 3)} if kind == "tensors" else torch.full((2, 3), 7.0)

    if kind == "tensors":
        return shared_teacher_tensors(checkpoint, "topk-k3-abc", compute)["top"].tolist()
    return shared_train_logits(checkpoint, compute, "key-1").tolist()


def test_two_processes_compute_each_shared_teacher_cache_once_and_read_the_same_values(tmp_path):
    _checkpoint(tmp_path)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    values = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # the top-k style cache (shared_teacher_tensors) and the train-split logits, each once
    assert (tmp_path / "computed-tensors.log").read_text() == "x\n"
    assert (tmp_path / "computed-logits.log").read_text() == "x\n"
    for v in values:
        assert v == {"tensors": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], "logits": [[7.0] * 3] * 2}
