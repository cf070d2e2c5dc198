"""Faults with the local executor: raise / NaN / out of memory isolated, a process that
keeps dying under a run is given up after a bounded number of starts, and two
`kdbench run` processes on one results folder neither lose nor duplicate a row."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from kdbench import cli
from kdbench.executors.local import run_local
from kdbench.executors.phases import MAX_ATTEMPTS, open_store
from kdbench.registry import Registry
from kdbench.spec import build_suite
from kdbench.store import RUNNING, ResultsStore
from support.suites import image_data, write_image_suite

ROOT = Path(__file__).resolve().parents[1]
KDBENCH = [sys.executable, "-m", "kdbench.cli"]


@pytest.fixture(scope="module")
def registry(fault_registry) -> Registry:
    return fault_registry


def suite_data(**changes) -> dict:
    data = yaml.safe_load((ROOT / "benchmarks" / "smoke.yaml").read_text())
    data.update(teacher=None, baseline="none", seeds=[0], budget={"steps": 8, "batch_size": 16, "eval_every": 4, "log_every": 2})
    data.update(changes)
    return data


def test_raise_nan_and_out_of_memory_are_recorded_and_the_suite_goes_on(tmp_path, registry):
    methods = [{"name": "oom"}, {"name": "raises"}, {"name": "nan-at-3"}, {"name": "none"}]
    outcome = run_local(build_suite(suite_data(methods=methods), registry=registry), tmp_path, registry=registry, progress=False)
    rows = {r["method"]: r for r in open_store(tmp_path).runs()}
    assert len(outcome.trained) == 4 and len(rows) == 4
    assert rows["oom"]["status"] == "failed"
    assert rows["oom"]["error"] == "out of memory on cpu: CUDA out of memory. Tried to allocate 20.00 GiB (simulated)"
    assert rows["raises"]["status"] == "failed" and "Traceback (most recent call last)" in rows["raises"]["error"]
    assert rows["raises"]["error"].rstrip().endswith("ValueError: deliberate failure in a method")
    assert rows["nan-at-3"]["status"] == "diverged" and rows["nan-at-3"]["diverged_step"] == 3
    assert rows["nan-at-3"]["error"] == "loss became nan at step 3"
    assert rows["none"]["status"] == "done" and rows["none"]["metrics"]["test"]["accuracy"] > 0
    # failed runs are tried again by the next run, finished ones are not
    again = run_local(build_suite(suite_data(methods=methods), registry=registry), tmp_path, registry=registry, progress=False)
    assert sorted(again.trained) == sorted([rows["oom"]["hash"], rows["raises"]["hash"]])
    assert {r["method"]: r["attempts"] for r in open_store(tmp_path).runs()} == {"oom": 2, "raises": 2, "nan-at-3": 1, "none": 1}


def test_a_run_left_running_by_dead_processes_is_retried_then_given_up(tmp_path, registry):
    suite = build_suite(suite_data(methods=[{"name": "none"}], seeds=[0, 1]), registry=registry)
    a, b = suite.runs
    store = ResultsStore(tmp_path / "store.sqlite")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    for spec, attempts in ((a, MAX_ATTEMPTS), (b, MAX_ATTEMPTS - 1)):
        assert store.claim(spec)
        with store.transaction() as con:  # as left by a process that died during its last attempt
            con.execute("UPDATE runs SET owner=?, attempts=? WHERE hash=?", (f"{os.uname().nodename}:{dead}", attempts, spec.hash))
    outcome = run_local(suite, tmp_path, registry=registry, progress=False)
    ra, rb = store.get(a.hash), store.get(b.hash)
    assert outcome.given_up == [a.hash] and outcome.trained == [b.hash]
    assert ra["status"] == "failed" and ra["attempts"] == MAX_ATTEMPTS and ra["owner"] is None
    assert ra["error"].startswith(f"the process running this run died during each of its {MAX_ATTEMPTS} attempts")
    assert rb["status"] == "done" and rb["attempts"] == MAX_ATTEMPTS  # the last allowed start
    # --rerun gives a given-up run one more start
    assert store.claim(a, rerun=True, max_crashes=MAX_ATTEMPTS) and store.get(a.hash)["status"] == RUNNING


DRIVER = textwrap.dedent("""
    import sys, yaml
    sys.path.insert(0, {tests!r})
    from kdbench.executors.local import run_local
    from kdbench.registry import Registry, make_plugin_manager
    from kdbench.spec import build_suite
    reg = Registry(*make_plugin_manager(extra_plugins=["support.fault_methods"]))
    out = run_local(build_suite(yaml.safe_load(open({suite!r})), registry=reg), {results!r}, registry=reg, progress=False,
                    max_attempts=2)
    print("trained", len(out.trained), "given up", len(out.given_up))
""")


def test_a_process_killed_by_its_run_is_restarted_a_bounded_number_of_times(tmp_path, monkeypatch):
    """The real thing: a method SIGKILLs its own process (as the kernel's OOM killer would).
    Tiny CNNs on generated images (no transformers to import in each of the three processes)."""
    suite = write_image_suite(tmp_path, methods=[{"name": "none"}, {"name": "dies-always"}], teacher=None, baseline="none",
                              seeds=[0], budget={"steps": 8, "batch_size": 16, "eval_every": 4, "log_every": 2})
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    script = DRIVER.format(tests=str(ROOT / "tests"), suite=str(suite), results=str(results))
    codes = []
    for _ in range(2 + 1):  # max_attempts=2: two starts killed, the third process gives up
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
        codes.append(proc.returncode)
    assert codes == [-9, -9, 0], proc.stderr
    assert "trained 0 given up 1" in proc.stdout
    rows = {r["method"]: r for r in open_store(results).runs()}
    assert rows["none"]["status"] == "done" and rows["none"]["attempts"] == 1  # finished before the first kill, kept
    assert rows["dies-always"]["status"] == "failed" and rows["dies-always"]["attempts"] == 2
    assert "died during each of its 2 attempts" in rows["dies-always"]["error"]


def open_store_in_thread(path: Path) -> tuple[threading.Thread, list]:
    """Open a :class:`ResultsStore` at ``path`` in a thread; half a second later, what it
    gave (the store or the exception) is in the returned list, or nothing if it waits."""
    outcome: list = []

    def open_it():
        try:
            outcome.append(ResultsStore(path))
        except Exception as exc:  # noqa: BLE001 - the failure is what the tests assert
            outcome.append(exc)

    opener = threading.Thread(target=open_it)
    opener.start()
    time.sleep(0.5)
    return opener, outcome


def test_a_store_being_upgraded_by_another_process_opens_without_a_duplicate_column(tmp_path):
    """Opening a store is one write transaction. CI once saw two `kdbench run` processes
    create one new store and both add its checksum column ("duplicate column name:
    checksum"). Here the race is forced: a store without checksum columns, another
    connection holding the write lock while this one opens it, then adding the columns."""
    path = tmp_path / "store.sqlite"
    ResultsStore(path)
    with sqlite3.connect(path) as con:  # a store as the first statements of the schema leave it
        con.execute("ALTER TABLE runs DROP COLUMN checksum")
        con.execute("ALTER TABLE teachers DROP COLUMN checksum")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    opener, outcome = open_store_in_thread(path)  # now waiting for the write lock (before the fix: after reading the columns)
    assert not outcome
    other.execute("ALTER TABLE runs ADD COLUMN checksum TEXT")
    other.execute("ALTER TABLE teachers ADD COLUMN checksum TEXT")
    other.execute("COMMIT")
    other.close()
    opener.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], ResultsStore), outcome
    with sqlite3.connect(path) as con:
        assert [r[1] for r in con.execute("PRAGMA table_info(runs)")].count("checksum") == 1


def test_a_new_store_opened_while_another_connection_writes_to_it_waits_for_the_lock(tmp_path):
    """Turning a new store into WAL mode needs the database to itself, and SQLite answers
    "database is locked" at once while another connection writes (no busy wait), so
    processes creating one store at once failed at random. Opening now waits for the lock
    like every other statement."""
    path = tmp_path / "store.sqlite"
    other = sqlite3.connect(path, isolation_level=None)  # a new database, rollback journal
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    opener, outcome = open_store_in_thread(path)
    assert not outcome  # still waiting (before the fix: StoreError "... held its lock ..." at once)
    other.execute("COMMIT")
    other.close()
    opener.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], ResultsStore), outcome
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {"runs", "teachers", "meta"} <= {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_two_kdbench_run_processes_on_one_folder_lose_and_duplicate_nothing(tmp_path, monkeypatch, capsys):
    # tiny CNNs on generated images: the processes import no transformers; each run still
    # outlasts the 1 s teacher poll (150 steps, about 1 s), so both processes train runs
    data = image_data(tmp_path / "images", seeds=[0, 1, 2], budget={"steps": 150, "batch_size": 16, "eval_every": 150, "log_every": 50})
    data["teacher"]["train"]["budget"] = {"steps": 10, "batch_size": 16}
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    cmd = [*KDBENCH, "run", str(suite), "--results", str(results), "--no-report"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    found = [re.search(r"trained (\d+), skipped (\d+) finished, (\d+) held by another process", err) for _, err in outs]
    assert all(found), [(p.returncode, err[-3000:]) for p, (_, err) in zip(procs, outs)]  # a process that ended early says why
    counts = [m.groups() for m in found]
    # 0, or 4 (EXIT_RUNS_HELD) from a process that left runs to the other one still training them
    assert [p.returncode for p in procs] == [4 if int(c[2]) else 0 for c in counts], outs
    trained = [int(c[0]) for c in counts]
    assert sum(trained) == 6  # every run trained by exactly one of the two
    assert min(trained) >= 1  # and they really ran at the same time
    for t, s, h in counts:  # and each process accounted for all six
        assert int(t) + int(s) + int(h) == 6
    rows = open_store(results).runs()
    assert len(rows) == 6 and len({r["hash"] for r in rows}) == 6
    assert all(r["status"] == "done" and r["attempts"] == 1 and r["owner"] is None for r in rows)
    (teacher,) = open_store(results).teachers()  # fine-tuned once, the other process waited
    assert teacher["status"] == "done"
    # the report sees each (method, seed) exactly once (made in this process: the command's
    # own process is covered by test_cli)
    capsys.readouterr()
    assert cli.main(["report", str(suite), "--results", str(results)]) == 0
    report = capsys.readouterr().out
    assert report.count("(n=3)") == 2, report
