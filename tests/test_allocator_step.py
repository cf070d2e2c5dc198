"""benchmarks/allocator_step.py --tiny --json: two worker processes, one with glibc's default
allocator and one with keep_freed_memory (each reports its own setting; the script stops
if either is wrong), paired step by step; nothing here times anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_tiny_json_pairs_a_default_and_a_kept_worker():
    done = subprocess.run([sys.executable, "allocator_step.py", "--tiny", "--json", "--rounds", "2", "--steps", "2", "--threads", "1"],
                          cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    r = out["kept_over_default"]
    assert r["min"] <= r["median"] <= r["max"] and r["min"] > 0
    assert set(out["seconds"]) == {"default", "kept"} and all(v > 0 for v in out["seconds"].values())
    assert (out["rounds"], out["steps"]) == (2, 2) and done.stderr.count("round ") == 2
