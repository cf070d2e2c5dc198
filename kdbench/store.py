"""The results store: one SQLite database per results folder.

One row per run, keyed by the run spec's hash, with its status (running, done, failed,
diverged), metrics, cost, environment and error text; one row per fine-tuned teacher.
Every write is a transaction; a run is *claimed* atomically before it trains, so two
processes on the same folder never train (or record) the same run twice. A run left
``running`` by a process that died is taken over by the next claim.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kdbench.spec import RunSpec

DONE, FAILED, DIVERGED, RUNNING = "done", "failed", "diverged", "running"
FINISHED = (DONE, DIVERGED)
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    method TEXT NOT NULL,
    student TEXT NOT NULL,
    seed INTEGER NOT NULL,
    params TEXT NOT NULL,
    teacher_hash TEXT,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    metrics TEXT,
    history TEXT,
    cost TEXT,
    env TEXT,
    error TEXT,
    diverged_step INTEGER,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS teachers (
    hash TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    heartbeat REAL,
    path TEXT,
    metrics TEXT,
    cost TEXT,
    env TEXT,
    error TEXT,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

#: A claim whose owner has not beaten its heart for this long is considered dead even
#: when the owner runs on another host (where its pid cannot be checked).
STALE_AFTER_S = 15 * 60


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None, heartbeat: float | None) -> bool:
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
        return True
    return heartbeat is not None and time.time() - heartbeat < STALE_AFTER_S


def crash_message(attempts: int, last_owner: str | None = None) -> str:
    """The error recorded for a run whose process kept dying under it."""
    who = f" (last: {last_owner})" if last_owner else ""
    return (f"the process running this run died during each of its {attempts} attempts{who}: it was killed "
            "(SIGKILL, the kernel's out-of-memory killer, a lost node) or crashed; not retried again "
            "(use --rerun to try once more)")


def _dumps(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, default=str)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class ResultsStore:
    """SQLite-backed store of runs and teachers. Safe for several processes at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: the write lock is taken up front, so read-then-write
        sequences (claims) are atomic across processes."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ runs
    def claim(self, spec: RunSpec, rerun: bool = False, max_attempts: int | None = None,
              max_crashes: int | None = None) -> bool:
        """Mark ``spec`` as running for this process. False if another live process holds
        it, it is already finished (unless ``rerun``), or it failed ``max_attempts`` times.

        ``max_crashes``: a run left ``running`` by a dead process that has already been
        started that many times is not started again (a run that kills its process, e.g.
        through the kernel's OOM killer, would otherwise kill every resume); it is recorded
        as failed with a message saying so, and False is returned."""
        me = owner_id()
        now = time.time()
        with self.transaction() as con:
            row = con.execute("SELECT status, owner, heartbeat, attempts FROM runs WHERE hash=?", (spec.hash,)).fetchone()
            if row is not None:
                if row["status"] == RUNNING and row["owner"] != me and owner_alive(row["owner"], row["heartbeat"]):
                    return False
                if (row["status"] == RUNNING and row["owner"] != me and max_crashes is not None
                        and row["attempts"] >= max_crashes and not rerun):
                    con.execute("UPDATE runs SET status=?, owner=NULL, error=?, finished_at=? WHERE hash=?",
                                (FAILED, crash_message(row["attempts"], row["owner"]), now, spec.hash))
                    return False
                if row["status"] in FINISHED and not rerun:
                    return False
                if row["status"] == FAILED and max_attempts is not None and row["attempts"] >= max_attempts and not rerun:
                    return False
                con.execute(
                    "UPDATE runs SET status=?, owner=?, heartbeat=?, attempts=attempts+1, started_at=?, error=NULL, "
                    "metrics=NULL, history=NULL, cost=NULL, diverged_step=NULL, finished_at=NULL WHERE hash=?",
                    (RUNNING, me, now, now, spec.hash),
                )
            else:
                con.execute(
                    "INSERT INTO runs (hash, task, method, student, seed, params, teacher_hash, spec, status, owner, heartbeat, attempts, started_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,1,?)",
                    (spec.hash, spec.task.name, spec.method, spec.student_label, spec.seed, _dumps(spec.params), spec.teacher_hash,
                     spec.model_dump_json(), RUNNING, me, now, now),
                )
        return True

    def heartbeat(self, spec_hash: str) -> None:
        with self.transaction() as con:
            con.execute("UPDATE runs SET heartbeat=? WHERE hash=? AND owner=?", (time.time(), spec_hash, owner_id()))

    def finish(self, spec: RunSpec, status: str, *, metrics: dict | None = None, history: list | None = None,
               cost: dict | None = None, env: dict | None = None, error: str | None = None,
               diverged_step: int | None = None, owner: str | None = None) -> None:
        """Record the outcome. Only the owner of the claim may finish it (a run taken over
        by another process after this one was presumed dead is not overwritten)."""
        with self.transaction() as con:
            cur = con.execute(
                "UPDATE runs SET status=?, metrics=?, history=?, cost=?, env=?, error=?, diverged_step=?, finished_at=?, owner=NULL "
                "WHERE hash=? AND status=? AND owner=?",
                (status, _dumps(metrics), _dumps(history), _dumps(cost), _dumps(env), error, diverged_step, time.time(),
                 spec.hash, RUNNING, owner or owner_id()),
            )
            if cur.rowcount != 1:
                raise RuntimeError(f"run {spec.hash} is no longer claimed by this process; its result was not recorded")

    def release(self, spec_hash: str) -> None:
        """Give a claim back without a result (e.g. interrupted by the user)."""
        with self.transaction() as con:
            con.execute("UPDATE runs SET status=?, owner=NULL, error='interrupted' WHERE hash=? AND status=? AND owner=?",
                        (FAILED, spec_hash, RUNNING, owner_id()))

    def block(self, spec: RunSpec, reason: str) -> bool:
        """Record a run that cannot start (e.g. its teacher failed) as failed with
        ``reason``, without charging it an attempt; the next claim starts it as usual.
        False (nothing written) when it is finished or held by a live process."""
        now = time.time()
        with self.transaction() as con:
            row = con.execute("SELECT status, owner, heartbeat FROM runs WHERE hash=?", (spec.hash,)).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO runs (hash, task, method, student, seed, params, teacher_hash, spec, status, attempts, error, finished_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,0,?,?)",
                    (spec.hash, spec.task.name, spec.method, spec.student_label, spec.seed, _dumps(spec.params), spec.teacher_hash,
                     spec.model_dump_json(), FAILED, reason, now),
                )
                return True
            if row["status"] in FINISHED or (row["status"] == RUNNING and owner_alive(row["owner"], row["heartbeat"])):
                return False
            con.execute("UPDATE runs SET status=?, owner=NULL, error=?, finished_at=? WHERE hash=?", (FAILED, reason, now, spec.hash))
        return True

    def get(self, spec_hash: str) -> dict[str, Any] | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM runs WHERE hash=?", (spec_hash,)).fetchone()
        return self._row(row) if row is not None else None

    def runs(self, hashes: list[str] | None = None) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM runs ORDER BY task, method, student, seed").fetchall()
        out = [self._row(r) for r in rows]
        if hashes is not None:
            wanted = set(hashes)
            out = [r for r in out if r["hash"] in wanted]
        return out

    def status_counts(self, hashes: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.runs(hashes):
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        counts["missing"] = len(set(hashes)) - sum(counts.values())
        return counts

    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        for key in ("params", "spec", "metrics", "history", "cost", "env"):
            d[key] = _loads(d[key])
        return d

    # ------------------------------------------------------------------ teachers
    def teacher(self, teacher_hash: str) -> dict[str, Any] | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM teachers WHERE hash=?", (teacher_hash,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        for key in ("spec", "metrics", "cost", "env"):
            d[key] = _loads(d[key])
        return d

    def teachers(self) -> list[dict[str, Any]]:
        with self._connect() as con:
            hashes = [r[0] for r in con.execute("SELECT hash FROM teachers WHERE status=?", (DONE,))]
        return [t for h in hashes if (t := self.teacher(h)) is not None]

    def claim_teacher(self, teacher_hash: str, task: str, spec: dict) -> bool:
        """True if this process should train the teacher now; False if it is done or a
        live process is training it (wait and look again)."""
        me, now = owner_id(), time.time()
        with self.transaction() as con:
            row = con.execute("SELECT status, owner, heartbeat FROM teachers WHERE hash=?", (teacher_hash,)).fetchone()
            if row is not None:
                if row["status"] == DONE:
                    return False
                if row["status"] == RUNNING and row["owner"] != me and owner_alive(row["owner"], row["heartbeat"]):
                    return False
                con.execute("UPDATE teachers SET status=?, owner=?, heartbeat=?, error=NULL WHERE hash=?", (RUNNING, me, now, teacher_hash))
            else:
                con.execute("INSERT INTO teachers (hash, task, spec, status, owner, heartbeat) VALUES (?,?,?,?,?,?)",
                            (teacher_hash, task, _dumps(spec), RUNNING, me, now))
        return True

    def finish_teacher(self, teacher_hash: str, status: str, *, path: str | None = None, metrics: dict | None = None,
                       cost: dict | None = None, env: dict | None = None, error: str | None = None) -> None:
        with self.transaction() as con:
            con.execute("UPDATE teachers SET status=?, path=?, metrics=?, cost=?, env=?, error=?, finished_at=?, owner=NULL WHERE hash=?",
                        (status, path, _dumps(metrics), _dumps(cost), _dumps(env), error, time.time(), teacher_hash))
