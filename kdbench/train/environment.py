"""Seeding, the device and the environment record stored with every run and teacher."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from kdbench.api import KDBenchError
from kdbench.train.cost import freed_memory_kept


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(choice: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cuda`` (an error without it) or ``cpu``."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise KDBenchError("device: 'cuda' was asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def deterministic_cpu() -> Iterator[None]:
    """Deterministic kernels where PyTorch has them (warn rather than fail elsewhere).
    PyTorch's deterministic mode also fills every newly allocated tensor with NaN
    (``torch.utils.deterministic.fill_uninitialized_memory``), a debugging aid that changes
    no result of correct kernels but costs a memory pass per tensor (about a tenth of a KD
    step on CPU): it is switched off here."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def _version(package: str) -> str:
    """An installed package's version without importing it (importing transformers costs
    seconds, and a run that builds no transformers model never needs it); the imported
    module's own ``__version__`` when it is loaded already."""
    module = sys.modules.get(package)
    if module is not None and getattr(module, "__version__", None):
        return module.__version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


_GIT: str | None = None
#: Changed tracked files that do not make a checkout's code differ from its commit: results
#: stores (SQLite and its journal files), which a suite committed with its results writes
#: to whenever runs are added to it.
STORE_SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm", ".sqlite-journal")


def code_changes(porcelain: str) -> list[str]:
    """The paths of ``git status --porcelain -z`` output that change the code: every changed
    tracked file except results stores (:data:`STORE_SUFFIXES`). ``-z`` separates entries
    with NUL and leaves names as they are (no quoting of spaces or non-ASCII letters); a
    renamed or copied file's entry is followed by its old name, which is skipped."""
    paths = []
    fields = porcelain.split("\0")
    i = 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:
            continue
        if entry[0] in "RC" or entry[1] in "RC":
            i += 1  # the old name
        path = entry[3:]
        if not path.endswith(STORE_SUFFIXES):
            paths.append(path)
    return paths


def git_commit() -> str:
    """The commit of the kdbench checkout (``+dirty`` with uncommitted changes to its code;
    a results store committed with its suite and written to by the runs being added is
    not a change to the code: :func:`code_changes`), once per process."""
    global _GIT
    if _GIT is None:
        try:
            here = Path(__file__).resolve().parent
            _GIT = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
            status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "-z", "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout
            _GIT += "+dirty" if code_changes(status) else ""
        except (OSError, subprocess.SubprocessError):
            _GIT = "unknown"
    return _GIT


def environment(device: torch.device, data: Any = None) -> dict[str, Any]:
    """Versions, hardware and data fingerprints a number came from (stored with every run
    and teacher). ``data`` is the run's :class:`~kdbench.data.TaskData`; its
    ``fingerprints`` (per split: sha256 and size of what was read) go to ``env["data"]``."""
    import kdbench

    return {
        "kdbench": kdbench.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "host_allocator": "glibc, freed blocks kept" if freed_memory_kept() else "default",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}",
        "data": getattr(data, "fingerprints", None),
    }
