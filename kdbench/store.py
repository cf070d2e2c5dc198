"""The results store: one SQLite database per results folder.

One row per run, keyed by the run spec's hash, with its status (running, done, failed,
diverged), metrics, cost, environment and error text; one row per fine-tuned teacher.
Every write is a transaction; a run is *claimed* atomically before it trains, so two
processes on the same folder never train (or record) the same run twice. A run left
``running`` by a process that died is taken over by the next claim (on the same host the
owner is identified by PID *and* process start time, so a reused PID does not keep a dead
claim alive).

Integrity: every finished run row and teacher row carries a ``checksum`` (sha256 over its
stored content) written with it and verified whenever it is read. A row whose content no
longer matches (a flipped digit, a bit flip SQLite's own check does not see) is never
used: :meth:`ResultsStore.runs` leaves it out with a warning naming the store file and the
run hash, and :meth:`ResultsStore.get` returns it with ``integrity = "corrupt"``. Rows
written before checksums existed read as ``integrity = "unverified"``.

Two checksum schemes: ``2:<sha256>`` (rows finished from checksum scheme 2 on) covers every
column a report reads, the identity columns (task, method, student, seed, params, teacher)
included; a bare ``<sha256>`` (scheme 1, older rows, committed stores among them) covers
the spec, status and results but not the identity columns. Those are checked on every
row against the spec (which both schemes cover): a row whose task, method, student, seed,
params or teacher disagree with its own spec is corrupt, so a changed byte there can
never make a phantom method, split a baseline or re-pair seeds. Old rows are re-checked
under their own scheme, never re-checksummed (:func:`integrity_counts` says how many).

Every SQLite or file-system problem (corrupt file, not a database, unreadable, read-only,
disk full, locked) becomes one :class:`StoreError` naming the file and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kdbench.api import KDBenchError
from kdbench.spec import RunSpec

DONE, FAILED, DIVERGED, RUNNING = "done", "failed", "diverged", "running"
FINISHED = (DONE, DIVERGED)
#: 2: ``checksum`` columns on runs and teachers (added to older stores when opened writable).
SCHEMA_VERSION = 2
#: Run-row columns covered by its checksum (everything that says what happened; not the
#: claim bookkeeping: owner, heartbeat, attempts, times).
RUN_CHECKED = ("hash", "spec", "status", "metrics", "history", "cost", "env", "error", "diverged_step")
TEACHER_CHECKED = ("hash", "spec", "status", "path", "metrics", "cost", "env", "error")
#: What a report groups, pairs and labels runs by: covered by checksum scheme 2, and
#: checked against the (checksummed) spec on every row of either scheme.
RUN_IDENTITY = ("task", "method", "student", "seed", "params", "teacher_hash")
RUN_CHECKED_2 = RUN_CHECKED + RUN_IDENTITY
TEACHER_CHECKED_2 = TEACHER_CHECKED + ("task",)
#: Prefix of scheme-2 checksums (scheme 1: a bare sha256).
CHECKSUM_2 = "2:"
VERIFIED, UNVERIFIED, CORRUPT = "verified", "unverified", "corrupt"

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


class StoreError(KDBenchError):
    """The results store cannot be used; the message names the file, what is wrong and the fix."""


def process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, from /proc), or None where unknown.
    With the PID it identifies a process: a PID reused by a new process has a new start."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return stat.rpartition(")")[2].split()[19]  # field 22 of stat, after the command name
    except (OSError, IndexError):
        return None


def owner_id() -> str:
    """``host:pid/start`` (``host:pid`` where the start time is unknown)."""
    start = process_start(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}" + (f"/{start}" if start else "")


def owner_alive(owner: str | None, heartbeat: float | None) -> bool:
    if not owner:
        return False
    host, _, rest = owner.rpartition(":")
    pid, _, start = rest.partition("/")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            pass
        # the PID is in use: by the same process only if it started at the same time
        now_start = process_start(int(pid))
        if start and now_start is not None:
            return now_start == start
        # the owner cannot be identified (no start time recorded, or /proc unreadable): a
        # reused PID must not hold the claim forever, so its heartbeat decides, as across hosts
    return heartbeat is not None and time.time() - heartbeat < STALE_AFTER_S


def row_checksum(values: dict[str, Any], columns: tuple[str, ...]) -> str:
    """sha256 over the row's stored text (exactly what is in the file, so no float round trip)."""
    blob = json.dumps([values.get(c) for c in columns], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def row_checksum_2(values: dict[str, Any], columns: tuple[str, ...]) -> str:
    """The scheme-2 checksum written on new rows (``columns``: :data:`RUN_CHECKED_2` or
    :data:`TEACHER_CHECKED_2`)."""
    return CHECKSUM_2 + row_checksum(values, columns)


def identity_problems(row: dict[str, Any]) -> list[str]:
    """The identity columns of a run row (stored text) that disagree with its own spec
    column; [] when they agree or the row has no spec. ``teacher_hash`` is rebuilt from the
    spec only for scheme-1 rows (scheme 2 covers it directly)."""
    try:
        spec = json.loads(row["spec"]) if isinstance(row.get("spec"), str) else row.get("spec")
    except ValueError:
        return ["spec"]
    if not isinstance(spec, dict):
        return []
    from kdbench.spec import ModelSpec, RunSpec, describe_model

    problems = []
    try:
        params = json.loads(row["params"]) if isinstance(row.get("params"), str) else row.get("params")
    except ValueError:
        params = None
    student = spec.get("student") if isinstance(spec.get("student"), dict) else {}
    try:
        label = student.get("label") or describe_model(ModelSpec.model_validate(student))
    except ValueError:
        label = None
    expected = {"task": (spec.get("task") or {}).get("name"), "method": spec.get("method"), "student": label,
                "params": spec.get("params")}
    got = {"task": row.get("task"), "method": row.get("method"), "student": row.get("student"), "params": params}
    problems += [k for k in expected if got[k] != expected[k]]
    seed = row.get("seed")
    if type(seed) is not int or seed != spec.get("seed") or type(spec.get("seed")) is not int:
        problems.append("seed")
    if not str(row.get("checksum") or "").startswith(CHECKSUM_2) and row.get("checksum") is not None:
        try:
            teacher_hash = RunSpec.model_validate(spec).teacher_hash
        except ValueError:
            teacher_hash = row.get("teacher_hash")  # a spec this kdbench cannot rebuild: not checkable here
        if teacher_hash != row.get("teacher_hash"):
            problems.append("teacher_hash")
    return problems


#: How long a writer waits for another process's lock before the store reports it held.
LOCK_TIMEOUT_S = 60.0


def _store_problem(path: Path, exc: BaseException) -> StoreError:
    """One message per kind of failure, with the fix."""
    text = str(exc)
    low = text.lower()
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "disk is full" in low or "disk i/o" in low and "full" in low:
        why, fix = "the disk is full", "free space on that disk (or use --results on another disk) and run the same command again"
    elif "readonly" in low or "read-only" in low:
        why, fix = ("it is read-only", "make the file and its folder writable (chmod u+w), or copy the results folder; "
                    "'kdbench report' and 'show' work on a read-only store")
    elif "not a database" in low or "malformed" in low or "corrupt" in low:
        why, fix = (f"it is damaged ({text})", "restore it from a backup, or move it away and run again "
                    "(finished runs are then trained again)")
    elif "unable to open" in low or isinstance(exc, PermissionError) or "permission" in low:
        why, fix = (f"it cannot be opened ({text})", "check that the file and its folder exist and are readable "
                    "(and writable for 'kdbench run')")
    elif "locked" in low or "busy" in low:
        why, fix = f"another process has held its lock for over {LOCK_TIMEOUT_S:g} s", "wait for the other kdbench process, or stop it"
    elif isinstance(exc, OSError):
        why, fix = f"a file-system error ({exc.strerror or text})", "check the results folder's path and permissions"
    else:
        why, fix = f"SQLite error: {text}", "check the file; if it is damaged, restore it from a backup or move it away"
    return StoreError(f"results store {path}: {why}. Fix: {fix}")


def crash_message(attempts: int, last_owner: str | None = None) -> str:
    """The error recorded for a run whose process kept dying under it."""
    who = f" (last: {last_owner})" if last_owner else ""
    return (f"the process running this run died during each of its {attempts} attempts{who}: it was killed "
            "(SIGKILL, the kernel's out-of-memory killer, a lost node) or crashed; not retried again "
            "(use --rerun to try once more)")


class StoreIntegrityWarning(UserWarning):
    """A store row failed its checksum and is not used."""


def _integrity(row: dict[str, Any], columns: tuple[str, ...], since: float | None,
               columns_2: tuple[str, ...] | None = None) -> str:
    checksum = row.get("checksum")
    if checksum is None:
        # a finished row written after checksums began must have one: a NULLed checksum is damage
        late = since is not None and row.get("status") in FINISHED and (row.get("finished_at") or 0) > since
        return CORRUPT if late else UNVERIFIED
    if columns_2 is not None and checksum.startswith(CHECKSUM_2):
        return VERIFIED if checksum == row_checksum_2(row, columns_2) else CORRUPT
    return VERIFIED if checksum == row_checksum(row, columns) else CORRUPT


def _dumps(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, default=str)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _journal_to_wal(con: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, waiting like every other statement for a lock another
    process holds. Turning a new store (rollback journal) into WAL needs the database to
    itself, and SQLite answers "database is locked" at once, without its busy wait, while
    another connection writes to it: two ``kdbench run`` processes creating one store then
    failed at random. Once the store is in WAL mode the pragma needs no lock."""
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class ResultsStore:
    """SQLite-backed store of runs and teachers. Safe for several processes at once.

    ``readonly=True`` (report, show) never creates or changes the file: a missing store is
    a :class:`StoreError`, and a store on a read-only file system or without write
    permission can still be read."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        #: legacy run hash -> current hash (see :meth:`alias_legacy`)
        self.aliases: dict[str, str] = {}
        self._immutable = False
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"results store {self.path}: there is no such file. Fix: run 'kdbench run' first, "
                                 "or give the right folder with --results")
            with self._connect() as con:  # fails here, with the fix, if it is not a usable database
                con.execute("SELECT count(*) FROM runs").fetchone()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _store_problem(self.path, exc) from None
        # one write transaction: two processes opening a new (or pre-checksum) store at
        # once would otherwise both see no checksum column and both add it ("duplicate
        # column name"); executescript would commit the transaction, so one statement each
        with self.transaction() as con:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                con.execute(statement)
            for table in ("runs", "teachers"):  # stores from before checksums
                if "checksum" not in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN checksum TEXT")
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            # rows finished after this moment must carry a checksum (a NULLed one is tampering)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('checksums_since', ?)", (repr(time.time()),))
            con.execute("UPDATE meta SET value=? WHERE key='schema_version' AND CAST(value AS INTEGER) < ?",
                        (str(SCHEMA_VERSION), SCHEMA_VERSION))

    def _open(self) -> sqlite3.Connection:
        if not self.readonly:
            con = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
            _journal_to_wal(con)
            con.execute("PRAGMA synchronous=NORMAL")
            return con
        # read-only: no journal change, nothing created; a WAL store in a folder we cannot
        # write (no -shm file possible) is opened as immutable
        mode = "immutable=1" if self._immutable else "mode=ro"
        con = sqlite3.connect(f"{self.path.resolve().as_uri()}?{mode}", uri=True, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            con.close()
            if self._immutable or not ("readonly" in str(exc).lower() or "unable to open" in str(exc).lower()):
                raise
            self._immutable = True
            return self._open()
        return con

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection; any SQLite or OS error inside becomes a :class:`StoreError`."""
        try:
            con = self._open()
        except (sqlite3.Error, OSError) as exc:
            raise _store_problem(self.path, exc) from None
        try:
            con.row_factory = sqlite3.Row
            yield con
        except (sqlite3.Error, OSError) as exc:
            raise _store_problem(self.path, exc) from None
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: the write lock is taken up front, so read-then-write
        sequences (claims) are atomic across processes."""
        if self.readonly:
            raise StoreError(f"results store {self.path}: opened read-only (report/show); nothing can be written")
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (disk full): never let "cannot
                # rollback - no transaction is active" hide the first error
                try:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
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
                    con.execute("UPDATE runs SET status=?, owner=NULL, error=?, finished_at=?, checksum=NULL WHERE hash=?",
                                (FAILED, crash_message(row["attempts"], row["owner"]), now, spec.hash))
                    return False
                if row["status"] in FINISHED and not rerun:
                    return False
                if row["status"] == FAILED and max_attempts is not None and row["attempts"] >= max_attempts and not rerun:
                    return False
                # the identity columns are written again from the spec: a row retrained because they
                # were damaged must not keep the damage under a fresh checksum
                con.execute(
                    "UPDATE runs SET status=?, owner=?, heartbeat=?, attempts=attempts+1, started_at=?, error=NULL, "
                    "metrics=NULL, history=NULL, cost=NULL, diverged_step=NULL, finished_at=NULL, checksum=NULL, "
                    "task=?, method=?, student=?, seed=?, params=?, teacher_hash=?, spec=? WHERE hash=?",
                    (RUNNING, me, now, now, spec.task.name, spec.method, spec.student_label, spec.seed, _dumps(spec.params),
                     spec.teacher_hash, spec.model_dump_json(), spec.hash),
                )
            else:
                con.execute(
                    "INSERT INTO runs (hash, task, method, student, seed, params, teacher_hash, spec, status, owner, heartbeat, attempts, started_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,1,?)",
                    (spec.hash, spec.task.name, spec.method, spec.student_label, spec.seed, _dumps(spec.params), spec.teacher_hash,
                     spec.model_dump_json(), RUNNING, me, now, now),
                )
        return True

    def heartbeat(self, spec_hash: str, *, teacher: bool = False) -> None:
        """Record that this process still holds its claim on a run (or a teacher)."""
        with self.transaction() as con:
            con.execute(f"UPDATE {'teachers' if teacher else 'runs'} SET heartbeat=? WHERE hash=? AND owner=?",
                        (time.time(), spec_hash, owner_id()))

    @contextmanager
    def keep_claim(self, spec_hash: str, *, teacher: bool = False, every_s: float = 30.0) -> Iterator[None]:
        """Beat the claim's heart from a background thread while the body runs, so other
        processes (on other hosts, or where this owner's start time is unknown) see it
        held; a failed beat (a busy disk) is skipped, never fatal."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every_s):
                try:
                    self.heartbeat(spec_hash, teacher=teacher)
                except Exception:  # noqa: BLE001 - the next beat tries again
                    pass

        thread = threading.Thread(target=beat, name=f"kdbench-claim-{spec_hash}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def finish(self, spec: RunSpec, status: str, *, metrics: dict | None = None, history: list | None = None,
               cost: dict | None = None, env: dict | None = None, error: str | None = None,
               diverged_step: int | None = None, owner: str | None = None) -> None:
        """Record the outcome. Only the owner of the claim may finish it (a run taken over
        by another process after this one was presumed dead is not overwritten)."""
        with self.transaction() as con:
            row = con.execute(f"SELECT spec, {', '.join(RUN_IDENTITY)} FROM runs WHERE hash=?", (spec.hash,)).fetchone()
            values = {"hash": spec.hash, "spec": row["spec"] if row else None, "status": status, "metrics": _dumps(metrics),
                      "history": _dumps(history), "cost": _dumps(cost), "env": _dumps(env), "error": error,
                      "diverged_step": diverged_step, **{c: row[c] for c in RUN_IDENTITY if row is not None}}
            cur = con.execute(
                "UPDATE runs SET status=?, metrics=?, history=?, cost=?, env=?, error=?, diverged_step=?, finished_at=?, owner=NULL, "
                "checksum=? WHERE hash=? AND status=? AND owner=?",
                (status, values["metrics"], values["history"], values["cost"], values["env"], error, diverged_step, time.time(),
                 row_checksum_2(values, RUN_CHECKED_2), spec.hash, RUNNING, owner or owner_id()),
            )
            if cur.rowcount != 1:
                raise RuntimeError(f"run {spec.hash} is no longer claimed by this process; its result was not recorded")

    def release(self, spec_hash: str, why: str = "interrupted") -> None:
        """Give a claim back without a result (e.g. interrupted by the user); ``why`` is
        the row's error until the next claim trains it."""
        with self.transaction() as con:
            con.execute("UPDATE runs SET status=?, owner=NULL, error=?, checksum=NULL WHERE hash=? AND status=? AND owner=?",
                        (FAILED, why, spec_hash, RUNNING, owner_id()))

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
        """One run row, with ``integrity`` (verified, unverified or corrupt: see the module
        docstring); a corrupt row is also warned about."""
        legacy = [old for old, new in self.aliases.items() if new == spec_hash]
        with self._connect() as con:
            since = self._checksums_since(con)
            rows = [con.execute("SELECT * FROM runs WHERE hash=?", (h,)).fetchone() for h in [spec_hash, *legacy]]
        row = next((r for r in rows if r is not None), None)
        if row is None:
            return None
        out = self._row(row, since)
        if out["integrity"] == CORRUPT:
            self._warn_corrupt([out])
        out["hash"] = self.aliases.get(out["hash"], out["hash"])
        return out

    def runs(self, hashes: list[str] | None = None, *, include_corrupt: bool = False) -> list[dict[str, Any]]:
        """Run rows (of ``hashes``, or all). Rows whose checksum does not match their content
        are left out with a warning naming the store and the runs (``include_corrupt`` keeps
        them, marked, for tools that list problems)."""
        with self._connect() as con:
            since = self._checksums_since(con)
            rows = con.execute("SELECT * FROM runs ORDER BY task, method, student, seed").fetchall()
        out = [self._row(r, since) for r in rows]
        present = {r["hash"] for r in out}
        for r in out:  # rows stored under a run's scheme-1 hash stand for the run
            if r["hash"] in self.aliases and self.aliases[r["hash"]] not in present:
                r["hash"] = self.aliases[r["hash"]]
        if hashes is not None:
            wanted = set(hashes)
            out = [r for r in out if r["hash"] in wanted]
        corrupt = [r for r in out if r["integrity"] == CORRUPT]
        if corrupt and not include_corrupt:
            self._warn_corrupt(corrupt)
            out = [r for r in out if r["integrity"] != CORRUPT]
        return out

    def corrupt_runs(self, hashes: list[str] | None = None) -> list[dict[str, Any]]:
        """Rows whose content no longer matches their checksum (quietly: the caller reports)."""
        return [r for r in self.runs(hashes, include_corrupt=True) if r["integrity"] == CORRUPT]

    def retrain_corrupt(self, hashes: list[str]) -> int:
        """Set runs whose row failed its checksum to be trained again (status failed, with
        the reason); returns how many."""
        n = 0
        with self.transaction() as con:
            for h in hashes:
                n += con.execute("UPDATE runs SET status=?, owner=NULL, checksum=NULL, error=? WHERE hash=? AND status!=?",
                                 (FAILED, "its stored result failed its checksum (changed since it was written); trained again",
                                  h, RUNNING)).rowcount
        return n

    def invalidate_teacher(self, teacher_hash: str, why: str) -> None:
        """Mark a finished teacher as failed (``why``), so the next run trains it again."""
        with self.transaction() as con:
            con.execute("UPDATE teachers SET status=?, error=?, checksum=NULL WHERE hash=? AND status=?",
                        (FAILED, why, teacher_hash, DONE))

    def _warn_corrupt(self, rows: list[dict[str, Any]]) -> None:
        hashes = ", ".join(r["hash"] for r in rows[:20]) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
        message = (f"results store {self.path}: {len(rows)} run row(s) changed since they were written "
                   f"(checksum mismatch): {hashes}. They are left out; 'kdbench run --rerun' trains them again")
        warnings.warn(message, StoreIntegrityWarning, stacklevel=3)

    def _checksums_since(self, con: sqlite3.Connection) -> float | None:
        row = con.execute("SELECT value FROM meta WHERE key='checksums_since'").fetchone()
        try:
            return float(row[0]) if row is not None else None
        except ValueError:
            return None

    def alias_legacy(self, specs: list[RunSpec]) -> None:
        """Read rows stored under a run's scheme-1 hash (``RunSpec.legacy_hash``: before
        teacher-free runs left the teacher out of their hash) as that run's rows."""
        self.aliases.update({s.legacy_hash: s.hash for s in specs if s.legacy_hash})

    def adopt_legacy(self, specs: list[RunSpec]) -> int:
        """Move rows stored under a run's scheme-1 hash to its current hash (when the
        current one has no row), re-checksummed after verifying the old checksum. Returns
        how many rows moved."""
        moved = 0
        for spec in specs:
            old = spec.legacy_hash
            if not old:
                continue
            with self.transaction() as con:
                row = con.execute("SELECT * FROM runs WHERE hash=?", (old,)).fetchone()
                if row is None or con.execute("SELECT 1 FROM runs WHERE hash=?", (spec.hash,)).fetchone():
                    continue
                if self._row(row, self._checksums_since(con))["integrity"] == CORRUPT:
                    continue  # left for the corrupt-row check to name
                values = dict(row) | {"hash": spec.hash}  # verified above under its own scheme, kept in it
                checksum = (None if not row["checksum"] else row_checksum_2(values, RUN_CHECKED_2)
                            if row["checksum"].startswith(CHECKSUM_2) else row_checksum(values, RUN_CHECKED))
                con.execute("UPDATE runs SET hash=?, checksum=? WHERE hash=?", (spec.hash, checksum, old))
                moved += 1
        return moved

    def _row(self, row: sqlite3.Row, since: float | None = None) -> dict[str, Any]:
        d = dict(row)
        d["integrity"] = _integrity(d, RUN_CHECKED, since, RUN_CHECKED_2)
        mismatched = identity_problems(d)
        if mismatched:  # a column the report groups by disagrees with the row's own spec
            d["integrity"], d["integrity_problem"] = CORRUPT, f"{', '.join(mismatched)} disagree with the row's spec"
        for key in ("params", "spec", "metrics", "history", "cost", "env"):
            try:
                d[key] = _loads(d[key])
            except ValueError:  # damaged text: the checksum (when there is one) already says so
                d[key], d["integrity"] = None, CORRUPT
        return d

    # ------------------------------------------------------------------ teachers
    def teacher(self, teacher_hash: str) -> dict[str, Any] | None:
        """A teacher row with ``integrity`` like a run row's. A corrupt done row is reported
        as failed (with the reason), so the runner trains the teacher again."""
        with self._connect() as con:
            since = self._checksums_since(con)
            row = con.execute("SELECT * FROM teachers WHERE hash=?", (teacher_hash,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["integrity"] = _integrity(d, TEACHER_CHECKED, since, TEACHER_CHECKED_2)
        for key in ("spec", "metrics", "cost", "env"):
            try:
                d[key] = _loads(d[key])
            except ValueError:
                d[key], d["integrity"] = None, CORRUPT
        if d["integrity"] == CORRUPT and d["status"] == DONE:
            warnings.warn(f"results store {self.path}: teacher row {teacher_hash} changed since it was written "
                          "(checksum mismatch); it is not used and will be trained again", StoreIntegrityWarning, stacklevel=2)
            d["status"], d["error"] = FAILED, "its store row failed its checksum: trained again"
        return d

    def teachers(self) -> list[dict[str, Any]]:
        with self._connect() as con:
            hashes = [r[0] for r in con.execute("SELECT hash FROM teachers WHERE status=?", (DONE,))]
        return [t for h in hashes if (t := self.teacher(h)) is not None and t["status"] == DONE]

    def claim_teacher(self, teacher_hash: str, task: str, spec: dict) -> bool:
        """True if this process should train the teacher now; False if it is done or a
        live process is training it (wait and look again)."""
        me, now = owner_id(), time.time()
        with self.transaction() as con:
            row = con.execute("SELECT * FROM teachers WHERE hash=?", (teacher_hash,)).fetchone()
            if row is not None:
                if row["status"] == DONE and _integrity(dict(row), TEACHER_CHECKED, self._checksums_since(con), TEACHER_CHECKED_2) != CORRUPT:
                    return False
                if row["status"] == RUNNING and row["owner"] != me and owner_alive(row["owner"], row["heartbeat"]):
                    return False
                con.execute("UPDATE teachers SET status=?, owner=?, heartbeat=?, error=NULL, checksum=NULL WHERE hash=?", (RUNNING, me, now, teacher_hash))
            else:
                con.execute("INSERT INTO teachers (hash, task, spec, status, owner, heartbeat) VALUES (?,?,?,?,?,?)",
                            (teacher_hash, task, _dumps(spec), RUNNING, me, now))
        return True

    def finish_teacher(self, teacher_hash: str, status: str, *, path: str | None = None, metrics: dict | None = None,
                       cost: dict | None = None, env: dict | None = None, error: str | None = None) -> None:
        with self.transaction() as con:
            row = con.execute("SELECT spec, task FROM teachers WHERE hash=?", (teacher_hash,)).fetchone()
            values = {"hash": teacher_hash, "spec": row["spec"] if row else None, "status": status, "path": path,
                      "metrics": _dumps(metrics), "cost": _dumps(cost), "env": _dumps(env), "error": error,
                      "task": row["task"] if row else None}
            con.execute("UPDATE teachers SET status=?, path=?, metrics=?, cost=?, env=?, error=?, finished_at=?, owner=NULL, "
                        "checksum=? WHERE hash=?",
                        (status, path, values["metrics"], values["cost"], values["env"], error, time.time(),
                         row_checksum_2(values, TEACHER_CHECKED_2), teacher_hash))
