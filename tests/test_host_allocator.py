"""kdbench.train.keep_freed_memory: a freed large tensor stays in the heap for the next one
(no fresh pages every step), and release_free_memory still hands it back to the OS before a
run's memory baseline. Measured on the process's resident set in a fresh interpreter (the
setting is process-wide and cannot be undone)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COST = Path(__file__).resolve().parents[1] / "kdbench" / "train" / "cost.py"
PROBE = textwrap.dedent("""
    import importlib.util, json
    import torch
    spec = importlib.util.spec_from_file_location("cost", COST_PATH)  # torch and numpy only: no kdbench package import
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    _proc_status_mb, release_free_memory = cost._proc_status_mb, cost.release_free_memory
    keep_freed_memory, freed_memory_kept = cost.keep_freed_memory, cost.freed_memory_kept

    def rss():
        return _proc_status_mb("VmRSS")

    def alloc_free():  # a 64 MB tensor, touched, then freed: resident before, with it, after
        before = rss()
        x = torch.ones(16 * 2**20)
        during = rss()
        del x
        return before, during, rss()

    out = {"default": alloc_free(), "kept_before": freed_memory_kept()}
    out["set"] = keep_freed_memory()
    out["again"] = keep_freed_memory()
    out["kept"] = alloc_free()
    release_free_memory()
    out["trimmed"] = rss()
    print(json.dumps(out))
""").replace("COST_PATH", repr(str(COST)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc/self/status")
def test_freed_blocks_stay_until_trimmed_only_after_keep_freed_memory():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    before, during, after = out["default"]
    assert during - before > 56 and after - before < 8  # glibc's default: a 64 MB block is unmapped on free
    assert out["kept_before"] is False and out["set"] is True and out["again"] is True
    before, during, after = out["kept"]
    assert during - before > 56 and after - before > 56  # kept in the heap for the next allocation
    assert after - out["trimmed"] > 56  # ... and handed back by the trim a run's baseline starts with
