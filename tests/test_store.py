"""The SQLite results store: claims, resume after a dead owner, concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
from pathlib import Path

import pytest
import yaml

from kdbench.spec import build_suite
from kdbench.store import DONE, FAILED, RUNNING, ResultsStore

SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.yaml"


@pytest.fixture(scope="module")
def specs():
    return build_suite(yaml.safe_load(SMOKE.read_text())).runs


def test_claim_finish_and_skip(tmp_path, specs):
    store = ResultsStore(tmp_path / "s.sqlite")
    spec = specs[0]
    assert store.claim(spec)
    assert store.get(spec.hash)["status"] == RUNNING
    assert store.claim(spec)  # the same process may re-claim its own run
    store.finish(spec, DONE, metrics={"test": {"accuracy": 0.5}, "main_metric": "accuracy"}, cost={"wall_s": 1.0})
    row = store.get(spec.hash)
    assert row["status"] == DONE and row["metrics"]["test"]["accuracy"] == 0.5 and row["attempts"] == 2
    assert not store.claim(spec)  # finished: skipped
    assert store.claim(spec, rerun=True)  # unless forced
    assert store.get(spec.hash)["metrics"] is None


def test_failed_runs_are_retried_up_to_a_bound(tmp_path, specs):
    store = ResultsStore(tmp_path / "s.sqlite")
    spec = specs[1]
    for _ in range(2):
        assert store.claim(spec, max_attempts=2)
        store.finish(spec, FAILED, error="boom")
    assert not store.claim(spec, max_attempts=2)
    assert store.get(spec.hash)["error"] == "boom"


def test_dead_owner_is_taken_over(tmp_path, specs):
    store = ResultsStore(tmp_path / "s.sqlite")
    spec = specs[2]
    assert store.claim(spec)
    # pretend a process that has exited holds it
    proc = mp.get_context("fork").Process(target=lambda: None)
    proc.start()
    proc.join()
    with sqlite3.connect(store.path) as con:
        con.execute("UPDATE runs SET owner=? WHERE hash=?", (f"{os.uname().nodename}:{proc.pid}", spec.hash))
    assert store.claim(spec)
    assert store.get(spec.hash)["attempts"] == 2


def test_live_owner_blocks_claim_and_finish(tmp_path, specs):
    store = ResultsStore(tmp_path / "s.sqlite")
    spec = specs[3]
    assert store.claim(spec)
    with sqlite3.connect(store.path) as con:  # another live process (our parent) holds it
        con.execute("UPDATE runs SET owner=? WHERE hash=?", (f"{os.uname().nodename}:{os.getppid()}", spec.hash))
    assert not store.claim(spec)
    with pytest.raises(RuntimeError, match="no longer claimed"):
        store.finish(spec, DONE)


def _claim_all(path: str, hashes_out, specs) -> None:
    store = ResultsStore(path)
    mine = []
    for spec in specs:
        if store.claim(spec):
            store.finish(spec, DONE, metrics={"by": os.getpid()})
            mine.append(spec.hash)
    hashes_out.extend(mine)


def test_concurrent_processes_never_share_a_run(tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    data["seeds"] = list(range(40))
    specs = build_suite(data).runs
    path = str(tmp_path / "s.sqlite")
    ResultsStore(path)
    ctx = mp.get_context("fork")
    with ctx.Manager() as manager:
        out = manager.list()
        procs = [ctx.Process(target=_claim_all, args=(path, out, specs)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        claimed = list(out)
    assert sorted(claimed) == sorted(s.hash for s in specs)  # every run exactly once
    rows = ResultsStore(path).runs()
    assert len(rows) == len(specs) and all(r["status"] == DONE and r["attempts"] == 1 for r in rows)
