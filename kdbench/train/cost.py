"""What a run costs: wall and device time, time per step with its spread, time waiting
for data, and the run's own memory (see :class:`CostMeter`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import time
from typing import Any

import numpy as np
import torch


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_peak_mb() -> float:
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_rss_peak() -> None:
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


_LIBC: Any = None


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``),
    so a run's baseline does not include what the previous run freed but the allocator
    kept: without it, the second of two identical runs looks cheaper than the first."""
    gc.collect()
    libc = _libc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


#: Freed blocks up to this size stay in the process's heap (see :func:`keep_freed_memory`).
KEEP_FREED_MB = 1024
_KEPT: bool | None = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    return _LIBC


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks (up to :data:`KEEP_FREED_MB`) in the process's heap for
    the next allocation instead of handing each large one back to the OS as it is freed
    (``mallopt`` ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``); process-wide, once (the
    runner and teacher fine-tuning call it). By default glibc maps every block above its
    dynamic threshold (at most 32 MB) freshly and unmaps it on free, so a tensor of that
    size, made again every step (the gradient of a 30,522 x 384 word embedding: 47 MB),
    pays its page faults again every step (``benchmarks/allocator_step.py`` measures the
    difference; results/perf-cpu-2026-11-30 holds what it printed). Results do not change;
    memory figures stay each run's own, as :class:`CostMeter` returns freed memory to the
    OS (``malloc_trim``) before taking a run's baseline. Returns whether glibc took it
    (False elsewhere: other C libraries are left alone)."""
    global _KEPT
    if _KEPT is None:
        libc = _libc()
        limit = KEEP_FREED_MB * 2**20
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        _KEPT = bool(libc and hasattr(libc, "mallopt") and libc.mallopt(m_mmap_threshold, limit) == 1
                     and libc.mallopt(m_trim_threshold, limit) == 1)
    return _KEPT


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process (recorded with
    every run's environment: step times depend on it)."""
    return bool(_KEPT)


class CostMeter:
    """Measures the training of one run (or teacher): enter it after the one-off
    preparation, which the caller times into :attr:`prep_s`.

    Device time: CUDA events on GPU, process CPU time otherwise. Memory is the run's
    own: on GPU ``torch.cuda.max_memory_allocated`` reset when the meter starts; on CPU
    the peak resident set size above the run's own baseline, taken after freed memory is
    returned to the OS, so that runs in one process do not inherit each other's peaks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.prep_s = 0.0
        self.data_wait = 0.0
        self.train_time = 0.0
        self.eval_time = 0.0
        self.steps = 0
        self.step_times: list[float] = []

    def __enter__(self) -> "CostMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._ev0 = torch.cuda.Event(enable_timing=True)
            self._ev1 = torch.cuda.Event(enable_timing=True)
            self._ev0.record()
            self._mem0 = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            release_free_memory()
            _reset_rss_peak()
            self._mem0 = _proc_status_mb("VmRSS") or 0.0
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._wall0
        if self.device.type == "cuda":
            self._ev1.record()
            torch.cuda.synchronize(self.device)
            self.device_time = self._ev0.elapsed_time(self._ev1) / 1000
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.device_time = time.process_time() - self._cpu0
            self.peak_mb = _rss_peak_mb()

    def record_step(self, seconds: float) -> None:
        self.train_time += seconds
        self.step_times.append(seconds)
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        """The ``cost`` dict stored with the run (fields: README, "Cost")."""
        cuda = self.device.type == "cuda"
        q25, median, q75 = (float(q) for q in np.percentile(self.step_times, [25, 50, 75])) if self.step_times else (None,) * 3
        increase = self.peak_mb - self._mem0
        return {
            "wall_s": self.wall,
            "device_s": self.device_time,
            "device_time_kind": "cuda_events" if cuda else "process_cpu",
            "train_s": self.train_time,
            "eval_s": self.eval_time,
            "prep_s": self.prep_s,
            "steps": self.steps,
            "step_s": self.train_time / max(self.steps, 1),
            "step_s_median": median,
            "step_s_q25": q25,
            "step_s_q75": q75,
            "data_wait_s": self.data_wait,
            "data_wait_fraction": self.data_wait / max(self.train_time, 1e-9),
            "mem_mb": self.peak_mb if cuda else increase,
            "mem_kind": "cuda_max_allocated" if cuda else "cpu_rss_increase",
            "peak_mem_mb": self.peak_mb,
            "peak_mem_kind": "cuda_max_allocated" if cuda else "process_rss",
            "peak_mem_increase_mb": increase,
        }
