"""Fault injection for issue 15 (store, suite loader, data layer, CLI error paths).

Each test's name and first docstring line say the case it covers; the README's fault table
counts these cases. Nothing here trains a model: faults are injected into store rows,
cache files, data files and suite texts, and the answer (a named error, exit code 2, a
row left out with a warning, a rebuilt file) is checked.
"""

from __future__ import annotations

import copy
import os
import sqlite3
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import kdbench.data as data_module
from kdbench import cli
from kdbench.api import DataError
from kdbench.data import ENCODED_CHECKSUM, TaskData, encode_split, load_task_data, read_encoded, tensors_sha256
from kdbench.integrity import DataChangedError, check_results_folder, estimate, inside, preflight
from kdbench.loader import LoadError, parse_yaml
from kdbench.spec import HASH_SCHEME, SuiteError, build_suite, load_suite
from kdbench.store import (CORRUPT, DONE, FAILED, RUNNING, UNVERIFIED, VERIFIED, ResultsStore, StoreError,
                           StoreIntegrityWarning, owner_id, process_start)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "benchmarks" / "smoke.yaml").read_text())
METRICS = {"main_metric": "accuracy", "test": {"accuracy": 0.533}, "validation": {"accuracy": 0.5}}


def smoke(**changes) -> dict:
    data = copy.deepcopy(SMOKE)
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def specs():
    return build_suite(smoke()).runs


def finished_store(path: Path, specs, env=None) -> ResultsStore:
    store = ResultsStore(path)
    for spec in specs:
        assert store.claim(spec)
        store.finish(spec, DONE, metrics=METRICS, cost={"wall_s": 2.0, "train_s": 1.0}, env=env or {})
    return store


def write_suite(tmp_path: Path, data: dict | str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# ============================================================ 1. integrity of stored rows


def test_store_row_with_one_flipped_digit_is_named_and_left_out(tmp_path, specs):
    """case: one flipped digit in a stored metric (SQLite's own integrity check passes)."""
    store = finished_store(tmp_path / "store.sqlite", specs[:2])
    assert {r["integrity"] for r in store.runs()} == {VERIFIED}
    with sqlite3.connect(store.path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.execute("UPDATE runs SET metrics=replace(metrics, '0.533', '0.633') WHERE hash=?", (specs[0].hash,))
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"  # SQLite sees nothing wrong
    with pytest.warns(StoreIntegrityWarning, match=rf"{store.path}.*{specs[0].hash}.*left out"):
        rows = store.runs()
    assert [r["hash"] for r in rows] == [specs[1].hash]  # never silently used
    with pytest.warns(StoreIntegrityWarning):
        assert store.get(specs[0].hash)["integrity"] == CORRUPT  # show: printed, marked corrupt


@pytest.mark.parametrize("column,value", [("status", "'diverged'"), ("cost", "'{\"wall_s\": 0.1}'"),
                                          ("history", "'[]'"), ("env", "'{\"x\": 1}'"), ("checksum", "NULL"),
                                          ("metrics", "'{not json'"), ("hash", "'0000000000000000'")])
def test_store_row_changed_in_any_checked_column_is_corrupt(tmp_path, specs, column, value):
    """case: a changed status, cost, history, env, a NULLed checksum, damaged JSON, a swapped hash."""
    store = finished_store(tmp_path / "store.sqlite", specs[:1])
    with sqlite3.connect(store.path) as con:
        con.execute(f"UPDATE runs SET {column}={value}")
    assert [r["integrity"] for r in store.runs(include_corrupt=True)] == [CORRUPT]


def test_store_from_before_checksums_reads_as_unverified(tmp_path, specs):
    """case: an old store (schema 1, no checksum column) still reads, rows marked unverified."""
    path = tmp_path / "store.sqlite"
    store = finished_store(path, specs[:1])
    with sqlite3.connect(path) as con:  # make it look like a schema-1 store
        con.execute("ALTER TABLE runs DROP COLUMN checksum")
        con.execute("ALTER TABLE teachers DROP COLUMN checksum")
        con.execute("DELETE FROM meta WHERE key='checksums_since'")
    assert [r["integrity"] for r in ResultsStore(path, readonly=True).runs()] == [UNVERIFIED]
    store = ResultsStore(path)  # writable: the column is added, old rows stay unverified
    assert [r["integrity"] for r in store.runs()] == [UNVERIFIED]
    assert store.claim(specs[1])
    store.finish(specs[1], DONE, metrics=METRICS)
    assert store.get(specs[1].hash)["integrity"] == VERIFIED


def test_corrupt_teacher_row_is_retrained_not_used(tmp_path, specs):
    """case: a teacher row changed in the store."""
    store = ResultsStore(tmp_path / "store.sqlite")
    th = next(s.teacher_hash for s in specs if s.method == "kd")
    assert store.claim_teacher(th, "movie-sentiment", {})
    store.finish_teacher(th, DONE, path="teachers/x/model.safetensors", metrics={"test": {"accuracy": 0.9}})
    assert store.teacher(th)["integrity"] == VERIFIED and not store.claim_teacher(th, "movie-sentiment", {})
    with sqlite3.connect(store.path) as con:
        con.execute("UPDATE teachers SET metrics=replace(metrics, '0.9', '0.1')")
    with pytest.warns(StoreIntegrityWarning, match=th):
        assert store.teacher(th)["status"] == FAILED
    with pytest.warns(StoreIntegrityWarning):
        assert store.teachers() == []
    assert store.claim_teacher(th, "movie-sentiment", {})  # trained again


def test_run_preflight_requeues_corrupt_rows(tmp_path, specs):
    """case: kdbench run over a store with a corrupt finished row trains that run again."""
    store = finished_store(tmp_path / "store.sqlite", specs[:2])
    with sqlite3.connect(store.path) as con:
        con.execute("UPDATE runs SET metrics=replace(metrics, '0.533', '0.633') WHERE hash=?", (specs[0].hash,))
    out = preflight(build_suite(smoke()), store, specs[:2], rerun=False, load_data=lambda s: None)
    assert out.corrupt == 1
    row = store.get(specs[0].hash)
    assert row["status"] == FAILED and "checksum" in row["error"]
    assert store.claim(specs[0])  # retried


# ============================================================ 1. encoded splits


class _Factory:
    name = "fake"
    calls = 0

    def encoder_id(self, options):
        return "fake-encoder"

    def encoder_fingerprint(self, options):
        return ""

    def encode(self, options, examples, max_length):
        _Factory.calls += 1
        return {"input_ids": torch.arange(len(examples["label"]) * 4).reshape(-1, 4)}


def test_encoded_split_changed_on_disk_is_rebuilt_with_a_warning_naming_it(tmp_path, monkeypatch):
    """case: token ids altered in an encoded split (cache)."""
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(data_module, "_ENCODED", {})
    data = TaskData(SimpleNamespace(max_length=8), {"train": {"label": np.zeros(5)}})  # type: ignore[arg-type]
    first = encode_split(_Factory(), None, data, "train", {"task": "t"})
    (path,) = (tmp_path / "encoded").glob("*.safetensors")
    assert read_encoded(path) is not None
    save_file({"input_ids": first["input_ids"] + 1}, str(path), metadata={ENCODED_CHECKSUM: tensors_sha256(first)})
    monkeypatch.setattr(data_module, "_ENCODED", {})
    calls = _Factory.calls
    with pytest.warns(UserWarning, match=rf"encoded split {path}.*checksum.*rebuilding"):
        again = encode_split(_Factory(), None, data, "train", {"task": "t"})
    assert _Factory.calls == calls + 1 and torch.equal(again["input_ids"], first["input_ids"])
    assert read_encoded(path) is not None  # the rebuilt file verifies


def test_encoded_split_truncated_or_without_checksum_is_rebuilt(tmp_path):
    """case: a torn encoded split, and one written before checksums."""
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(3)}, str(path))
    assert read_encoded(path) is None  # no checksum: rebuilt once, quietly
    save_file({"a": torch.ones(3)}, str(path), metadata={ENCODED_CHECKSUM: tensors_sha256({"a": torch.ones(3)})})
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.warns(UserWarning, match="cannot be read"):
        assert read_encoded(path) is None


# ============================================================ 1. data fingerprints

LINES = [f"{i}\t{(-1) ** i * 1.5}\tsnippet number {i} is {'good' if i % 2 == 0 else 'bad'}" for i in range(60)]


def movie_suite(tmp_path: Path, source: Path, **changes) -> dict:
    return smoke(tasks=[{"name": "movie-sentiment", "options": {"source_file": str(source), "max_length": 16}}],
                 results=None, **changes)


def test_data_fingerprints_change_with_flipped_labels_but_not_with_the_path(tmp_path, monkeypatch):
    """case: fingerprint of local data files (PLAN interface 5)."""
    monkeypatch.setattr(data_module, "_TASK_DATA", {})
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(LINES))
    b.write_text("\n".join(LINES))
    spec_a, spec_b = (build_suite(movie_suite(tmp_path, p)).runs[0] for p in (a, b))
    assert spec_a.hash == spec_b.hash  # a location is not what a run is...
    from kdbench.registry import get_registry

    fa = load_task_data(get_registry(), spec_a.task, 0.1, 0).fingerprints
    assert set(fa) == {"train", "validation", "test", "quiz"} and fa["quiz"]["n"] == 5
    fb = load_task_data(get_registry(), spec_b.task, 0.1, 0).fingerprints
    assert fa == fb  # ...and the same content has the same fingerprint
    b.write_text("\n".join(line.replace("\t-1.5\t", "\tX\t").replace("\t1.5\t", "\t-1.5\t").replace("\tX\t", "\t1.5\t") for line in LINES))
    monkeypatch.setattr(data_module, "_TASK_DATA", {})
    fc = load_task_data(get_registry(), spec_b.task, 0.1, 0).fingerprints
    assert all(fc[s]["sha256"] != fa[s]["sha256"] and fc[s]["n"] == fa[s]["n"] for s in fa)


def test_run_refuses_finished_runs_trained_on_other_data(tmp_path, monkeypatch, capsys):
    """case: source_file pointed at a copy with every label flipped after some seeds finished."""
    monkeypatch.setattr(data_module, "_TASK_DATA", {})
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "snippets.txt"
    src.write_text("\n".join(LINES))
    suite_path = write_suite(tmp_path, movie_suite(tmp_path, src))
    suite = load_suite(suite_path)
    from kdbench.registry import get_registry

    fps = load_task_data(get_registry(), suite.runs[0].task, 0.1, 0).fingerprints
    finished_store(tmp_path / "results" / "smoke" / "store.sqlite", suite.runs[:1], env={"data": fps})
    src.write_text("\n".join(line.replace("\t1.5\t", "\t-9\t").replace("\t-1.5\t", "\t1.5\t") for line in LINES))
    monkeypatch.setattr(data_module, "_TASK_DATA", {})
    assert cli.main(["run", str(suite_path), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "data changed" in err and suite.runs[0].hash in err and "movie-sentiment" in err and "split 'train'" in err
    assert "--rerun" in err
    store = ResultsStore(tmp_path / "results" / "smoke" / "store.sqlite", readonly=True)
    assert [r["status"] for r in store.runs()] == [DONE]  # nothing trained, nothing changed


def test_rerun_after_data_change_retrains_the_teacher_too(tmp_path, specs):
    """case: --rerun after a data change (the teacher trained on the old data is not reused)."""
    store = finished_store(tmp_path / "store.sqlite", specs, env={"data": {"train": {"sha256": "old", "n": 3}}})
    th = next(s.teacher_hash for s in specs if s.method == "kd")
    store.claim_teacher(th, "movie-sentiment", {})
    store.finish_teacher(th, DONE, path="p", env={"data": {"train": {"sha256": "old", "n": 3}}})
    now = SimpleNamespace(fingerprints={"train": {"sha256": "new", "n": 3}})
    with pytest.raises(DataChangedError, match="teacher"):
        preflight(build_suite(smoke()), store, specs, rerun=False, load_data=lambda s: now)
    out = preflight(build_suite(smoke()), store, specs, rerun=True, load_data=lambda s: now)
    assert out.changed and store.teacher(th)["status"] == FAILED


# ============================================================ 2. bounded inputs

BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))


def calls_made(fn) -> int:
    """How many Python and C function calls ``fn()`` makes: the work it does, counted the
    same on any machine (a wall-clock bound would test the machine's speed). ``fn`` runs
    once uncounted first, so lazy imports and the plugin registry's first load do not count."""
    fn()
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        count += event in ("call", "c_call")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def bounded_work(text: str) -> int:
    """The work a refused suite may cost: linear in its size (reading it once), far below
    what expanding an alias bomb (9^10 nodes) or building 10^10 runs would cost. A valid
    smoke suite costs about 460 000 calls, nearly all of it validation."""
    return 10 * len(text) + 100_000


def test_alias_bomb_is_refused_before_anything_is_expanded(tmp_path, monkeypatch):
    """case: a 1 KB YAML alias bomb in a free-form field (was: past 90 s and toward all memory)."""
    from kdbench import loader

    text = BOMB + yaml.safe_dump({k: v for k, v in smoke().items() if k != "description"}) + "description: *j\n"
    assert len(text.encode()) < 1500
    path = write_suite(tmp_path, text)
    constructed = []
    monkeypatch.setattr(loader._BoundedLoader, "construct_document", lambda self, node: constructed.append(node))

    def refuse():
        with pytest.raises(SuiteError, match="alias") as err:
            load_suite(path)
        assert len(str(err.value)) < 1000

    assert calls_made(refuse) < bounded_work(text) and constructed == []  # counted, never built


@pytest.mark.parametrize("text,message", [
    ("[" * 5000 + "]" * 5000, "nested deeper than"),
    ("name: " + "x" * 20_000, "20000 characters"),
    ("seeds: [" + "9" * 5000 + "]", "cannot convert"),
    ("name: a\nname: b\n", "duplicate key 'name'"),
    ("name: &a [*a]", "recursive"),
    ("name: [1, 2\n", "not valid YAML"),
    ("name: !!python/object/apply:os.system ['true']", "not valid YAML"),
])
def test_hostile_yaml_is_a_named_suite_error(tmp_path, text, message):
    """case: deep nesting, a huge scalar, a 5000-digit integer, duplicate keys, recursive alias, bad YAML, code tags."""
    path = write_suite(tmp_path, text)

    def refuse():
        with pytest.raises(SuiteError, match=message) as err:
            load_suite(path)
        assert len(str(err.value)) < 1000

    assert calls_made(refuse) < bounded_work(text)


def test_non_utf8_suite_is_a_named_suite_error(tmp_path):
    """case: a suite file that is not UTF-8."""
    path = tmp_path / "s.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SuiteError, match="not UTF-8"):
        load_suite(path)


def test_messages_never_quote_unbounded_input():
    """case: a long bad value in a validated field is truncated in the message."""
    with pytest.raises(SuiteError) as err:
        build_suite(smoke(name="/" * 9000, seeds=[-1] * 3000))
    assert len(str(err.value)) < 5000 and "/" * 100 not in str(err.value)


@pytest.mark.parametrize("budget,message", [({"steps": 10**12}, "KDBENCH_MAX_STEPS"), ({"epochs": 1e9}, "KDBENCH_MAX_EPOCHS"),
                                            ({"steps": 10, "batch_size": 2**30}, "batch_size")])
def test_budgets_have_upper_bounds_with_an_override(monkeypatch, budget, message):
    """case: steps: 1e12 (was: MemoryError building the evaluation steps, or training forever)."""
    with pytest.raises(SuiteError, match=message):
        build_suite(smoke(budget=budget))
    if message.startswith("KDBENCH_"):  # the documented override
        monkeypatch.setenv(message, str(10**13))
        assert build_suite(smoke(budget=budget)).runs


def test_boolean_seeds_are_refused():
    """case: seeds: [true, 0]."""
    with pytest.raises(SuiteError, match="seeds.*not true/false"):
        build_suite(smoke(seeds=[True, 0]))


def test_two_students_with_one_label_are_refused():
    """case: two different students with the same label (were averaged together)."""
    other = copy.deepcopy(SMOKE["students"][0])
    other["options"]["tiny"]["layers"] = 2
    with pytest.raises(SuiteError, match="label 'tiny-1L'"):
        build_suite(smoke(students=[SMOKE["students"][0], other]))
    unlabelled = {k: v for k, v in other.items() if k != "label"}
    assert build_suite(smoke(students=[SMOKE["students"][0], unlabelled])).runs  # distinct default labels


@pytest.mark.parametrize("results", ["/tmp/elsewhere", "../outside", "results/../../x", "~/x", ""])
def test_suite_results_cannot_point_outside(results):
    """case: results: in a suite pointing outside the working directory."""
    with pytest.raises(SuiteError, match="results"):
        build_suite(smoke(results=results))
    assert build_suite(smoke(results="results/mine")).spec.results == "results/mine"


def test_symlink_inside_results_folder_cannot_lead_outside(tmp_path):
    """case: a symlinked teachers/ folder (files would land outside the results folder)."""
    results, outside = tmp_path / "results", tmp_path / "elsewhere"
    results.mkdir()
    outside.mkdir()
    (results / "teachers").symlink_to(outside, target_is_directory=True)
    with pytest.raises(Exception, match="outside the results folder"):
        check_results_folder(results)
    with pytest.raises(Exception, match="outside the results folder"):
        inside(results, results / "teachers" / "abc" / "model.safetensors")
    (results / "teachers").unlink()
    (results / "teachers").mkdir()
    check_results_folder(results)
    assert inside(results, results / "teachers" / "x") == (results / "teachers" / "x").resolve()


def test_run_refuses_a_symlinked_teachers_folder_with_exit_2(tmp_path, capsys):
    """case: the same through kdbench run (nothing trained)."""
    results, outside = tmp_path / "r", tmp_path / "elsewhere"
    results.mkdir()
    outside.mkdir()
    (results / "teachers").symlink_to(outside)
    assert cli.main(["run", str(ROOT / "benchmarks" / "smoke.yaml"), "--results", str(results), "--no-report"]) == 2
    assert "outside the results folder" in capsys.readouterr().err
    assert list(outside.iterdir()) == [] and not (results / "store.sqlite").exists()


def test_validate_prints_steps_and_a_cost_estimate_from_the_store(tmp_path, capsys, specs):
    """case: kdbench validate estimates the suite's total steps, and its cost from earlier runs."""
    suite_path = write_suite(tmp_path, smoke())
    assert cli.main(["validate", str(suite_path), "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "80 student steps" in out and "30 steps" in out and "earlier runs" not in out
    finished_store(tmp_path / "r" / "store.sqlite", specs)
    assert cli.main(["validate", str(suite_path), "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "estimate from earlier runs" in out and "4 of 4 runs" in out  # 1 s / 20 steps, for none and kd
    lines = estimate(build_suite(smoke()), ResultsStore(tmp_path / "r" / "store.sqlite", readonly=True))
    assert "~4 s" in lines[1]


# ============================================================ 3. every failure named


def _damage(path: Path, how: str) -> None:
    if how == "not a database":
        path.write_bytes(b"this is not a database " * 100)
    elif how == "truncated":
        with sqlite3.connect(path) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2 + 100])
    elif how == "zeroed page":
        with sqlite3.connect(path) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        raw = bytearray(path.read_bytes())
        raw[4096:8192] = b"\xff" * 4096
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["not a database", "truncated", "zeroed page"])
@pytest.mark.parametrize("command", ["run", "report", "show"])
def test_damaged_store_is_a_named_error_with_the_fix_exit_2(tmp_path, capsys, specs, how, command):
    """case: a damaged store.sqlite (not a database, truncated, a destroyed page) for run/report/show."""
    path = tmp_path / "store.sqlite"
    finished_store(path, specs)
    for extra in ("-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
    _damage(path, how)
    args = {"run": ["run", "--no-report"], "report": ["report", "--no-plots"], "show": ["show"]}[command]
    argv = [args[0], str(ROOT / "benchmarks" / "smoke.yaml"), "--results", str(tmp_path), *args[1:]]
    if command == "show":
        argv.append(specs[0].hash)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"results store {path}" in err and "Fix:" in err and "Traceback" not in err


def test_unreadable_store_is_a_named_error(tmp_path, specs):
    """case: an unreadable store (permissions)."""
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "store.sqlite"
    finished_store(path, specs)
    path.chmod(0)
    with pytest.raises(StoreError, match="cannot be opened|Fix"):
        ResultsStore(path, readonly=True).runs()


def test_read_only_store_is_a_named_error_for_writes_and_readable_for_reports(tmp_path, specs, monkeypatch):
    """case: a read-only store: report and show still work, run gets a named error."""
    path = tmp_path / "store.sqlite"
    finished_store(path, specs[:1])
    real_open = ResultsStore._open

    def read_only(self):  # what SQLite answers for a file it may not write (also as root)
        con = real_open(self)
        con.execute("PRAGMA query_only=ON")
        return con

    monkeypatch.setattr(ResultsStore, "_open", read_only)
    with pytest.raises(StoreError, match=rf"{path}: it is read-only.*Fix: make the file"):
        ResultsStore(path).claim(specs[1])
    assert [r["hash"] for r in ResultsStore(path, readonly=True).runs()] == [specs[0].hash]
    if os.geteuid() != 0:
        monkeypatch.undo()
        for p in tmp_path.iterdir():
            p.chmod(0o444)
        tmp_path.chmod(0o555)
        try:
            assert len(ResultsStore(path, readonly=True).runs()) == 1
        finally:
            tmp_path.chmod(0o755)


def test_committed_store_is_reported_read_only_without_changing_it(tmp_path):
    """case: kdbench report on a store it may not change (a committed store, copied)."""
    import shutil

    shutil.copytree(ROOT / "results" / "metadistil-budget-cpu-250", tmp_path / "m", ignore=shutil.ignore_patterns("*.sqlite-*", "plots", "*.html", "teachers"))
    before = (tmp_path / "m" / "store.sqlite").read_bytes()
    assert cli.main(["report", str(ROOT / "benchmarks" / "metadistil-budget-cpu" / "steps-250.yaml"), "--results", str(tmp_path / "m"), "--no-plots"]) == 0
    assert (tmp_path / "m" / "store.sqlite").read_bytes() == before


def test_full_disk_is_named_and_not_masked_by_cannot_rollback(tmp_path, specs, monkeypatch):
    """case: a disk that fills up during a store write."""
    path = tmp_path / "store.sqlite"
    store = finished_store(path, specs[:1])
    real_open = ResultsStore._open

    def tiny_disk(self):
        con = real_open(self)
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count={pages}")  # no room for one more page
        return con

    monkeypatch.setattr(ResultsStore, "_open", tiny_disk)
    with pytest.raises(StoreError) as err:
        store.claim(specs[1])
        store.finish(specs[1], DONE, history=[{"step": i, "x": "y" * 100} for i in range(2000)])
    assert "disk is full" in str(err.value) and "Fix: free space" in str(err.value)
    assert "rollback" not in str(err.value)


def test_results_path_the_file_system_rejects_is_exit_2(tmp_path, capsys):
    """case: results paths the file system rejects (name too long, a file in the way)."""
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / ("x" * 300), tmp_path / "file" / "r"):
        assert cli.main(["run", str(ROOT / "benchmarks" / "smoke.yaml"), "--results", str(bad), "--no-report"]) == 2
        err = capsys.readouterr().err
        assert f"results folder {bad}" in err and "Traceback" not in err


def test_show_with_an_unknown_hash_creates_no_store(tmp_path, capsys, specs):
    """case: kdbench show with an unknown hash (created a store)."""
    assert cli.main(["show", str(ROOT / "benchmarks" / "smoke.yaml"), "--results", str(tmp_path / "r"), "0123"]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "r").exists()
    finished_store(tmp_path / "r" / "store.sqlite", specs[:1])
    assert cli.main(["show", str(ROOT / "benchmarks" / "smoke.yaml"), "--results", str(tmp_path / "r"), specs[0].hash[:-1]]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()


def test_empty_train_split_after_the_quiz_carve_out_is_named(tmp_path, monkeypatch):
    """case: an empty train split after the quiz carve-out."""
    monkeypatch.setattr(data_module, "_TASK_DATA", {})
    src = tmp_path / "tiny.txt"
    src.write_text("\n".join(LINES[:3]))
    run = build_suite(movie_suite(tmp_path, src)).runs[0]
    from kdbench.registry import get_registry

    with pytest.raises(DataError, match="train split has 1 example.*quiz_fraction 0.1.*none to train on"):
        load_task_data(get_registry(), run.task, 0.1, 0)


@pytest.mark.parametrize("text", ["seeds: [" + "1" * 4400 + "]", "budget: {steps: 1" + "0" * 4400 + "}", "name: [unclosed",
                                  "seeds: [0x" + "f" * 4000 + "]", "budget: {steps: 0x" + "f" * 4000 + "}",
                                  'seeds: ["' + "9" * 4400 + '"]'])
def test_yaml_and_int_conversion_errors_exit_2(tmp_path, capsys, text):
    """case: suite files the YAML parser or Python's int conversion reject."""
    assert cli.main(["validate", str(write_suite(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert "invalid suite" in err and "Traceback" not in err and len(err) < 2000


def test_reused_pid_does_not_keep_a_dead_claim_running(tmp_path, specs):
    """case: a run claimed by a dead process whose PID was reused on the same host."""
    store = ResultsStore(tmp_path / "store.sqlite")
    assert store.claim(specs[0])
    me = owner_id()
    assert process_start(os.getpid()) and me.endswith("/" + process_start(os.getpid()))
    host_pid = me.rpartition("/")[0]
    with sqlite3.connect(store.path) as con:  # our PID, but a process that started at another time
        con.execute("UPDATE runs SET owner=?", (f"{host_pid.rpartition(':')[0]}:{os.getppid()}/1",))
    assert store.claim(specs[0])  # taken over, not "held by a live process"
    with sqlite3.connect(store.path) as con:  # a live owner with its true start time still blocks
        con.execute("UPDATE runs SET owner=?", (f"{host_pid.rpartition(':')[0]}:{os.getppid()}/{process_start(os.getppid())}",))
    assert not store.claim(specs[0])
    assert store.get(specs[0].hash)["status"] == RUNNING


# ============================================================ 4. teacher-free hashes


def test_changing_only_the_teacher_keeps_the_hash_of_teacher_free_runs():
    """case: changing only the teacher changed the hashes of 'none' runs (hash scheme 2)."""
    other = smoke()
    other["teacher"] = copy.deepcopy(other["teacher"])
    other["teacher"]["options"]["tiny"]["layers"] = 3
    a, b = build_suite(smoke()).runs, build_suite(other).runs
    none_a = {r.hash for r in a if r.method == "none"}
    assert none_a == {r.hash for r in b if r.method == "none"}
    assert {r.hash for r in a if r.method == "kd"}.isdisjoint({r.hash for r in b if r.method == "kd"})
    assert HASH_SCHEME == 2 and all(r.legacy_hash and r.legacy_hash != r.hash for r in a if r.method == "none")
    assert all(r.teacher_hash for r in a)  # reports still find the suite's teacher


def test_rows_stored_under_the_old_hash_stay_readable_and_are_adopted(tmp_path, specs):
    """case: a committed store written under hash scheme 1."""
    none = next(s for s in specs if s.method == "none")
    old = none.model_copy(update={"unhashed": tuple(p for p in none.unhashed if p != "teacher")})
    assert old.hash == none.legacy_hash
    store = finished_store(tmp_path / "store.sqlite", [old])
    ro = ResultsStore(store.path, readonly=True)
    ro.alias_legacy(specs)
    assert [r["hash"] for r in ro.runs([none.hash])] == [none.hash] and ro.get(none.hash)["integrity"] == VERIFIED
    assert store.adopt_legacy(specs) == 1
    row = store.get(none.hash)
    assert row["status"] == DONE and row["integrity"] == VERIFIED and store.get(old.hash) is None


def test_loader_limits_are_the_documented_ones():
    """case: the bounds the README documents."""
    from kdbench import loader, spec

    assert (loader.MAX_DEPTH, loader.MAX_SCALAR, loader.MAX_NODES, loader.MAX_BYTES) == (64, 10_000, 100_000, 1_000_000)
    assert (spec.MAX_STEPS, spec.MAX_EPOCHS) == (10**7, 10**4)
    with pytest.raises(LoadError):
        parse_yaml(b"a: \xff")


def test_a_sweep_of_billions_of_runs_is_refused_before_it_is_built():
    """case: a grid explosion (10 swept fields of 10 values = 10^10 runs)."""
    params = {"alpha": [i / 10 for i in range(10)], "temperature": list(range(1, 11))}

    def refuse():
        with pytest.raises(SuiteError, match="more than the bound"):
            build_suite(smoke(methods=[{"name": "kd", "params": params}], seeds=list(range(1001))))

    assert calls_made(refuse) < 100_000  # the count is multiplied out before any run is built


def test_report_into_a_folder_it_cannot_write_is_a_named_error(tmp_path, capsys):
    """case: kdbench report --format md where the results folder cannot take the file."""
    import shutil

    shutil.copytree(ROOT / "results" / "metadistil-budget-cpu-250", tmp_path / "m", ignore=shutil.ignore_patterns("*.sqlite-*", "plots", "*.html", "*.md", "teachers"))
    (tmp_path / "m" / "leaderboard.md").mkdir()  # in the way of the file (a read-only folder, as root)
    argv = ["report", str(ROOT / "benchmarks" / "metadistil-budget-cpu" / "steps-250.yaml"), "--results", str(tmp_path / "m"), "--no-plots", "--format", "md"]
    assert cli.main(argv) == 2
    assert "cannot write the report" in capsys.readouterr().err


def test_preflight_leaves_missing_data_to_the_runs(tmp_path, specs):
    """case: the data of finished runs cannot be read at all (the runs fail naming it, the suite goes on)."""
    store = finished_store(tmp_path / "store.sqlite", specs[:1], env={"data": {"train": {"sha256": "a", "n": 1}}})

    def missing(spec):
        raise DataError("movie-sentiment: source_file /nowhere does not exist")

    assert preflight(build_suite(smoke()), store, specs, rerun=False, load_data=missing).changed == []
