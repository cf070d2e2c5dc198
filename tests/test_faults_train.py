"""Faults on the training side (issue 15), each test naming the case it covers: attempts
charged only to runs that ran, teacher failures recorded on the teacher and blocking
(not failing for good) its runs, checksummed teacher files that are named and rebuilt
when damaged, stale temp files removed, results folders that can move, exit code 3."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from kdbench import cli
from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.registry import set_registry
from kdbench.spec import build_suite
from kdbench.store import DONE, FAILED
from kdbench.train import artefacts
from kdbench.train import teachers as teachers_mod
from kdbench.train.teachers import TeacherOutcome, checkpoint_path
from support.suites import ROOT, image_data, smoke_data

TEACHER_BUDGET = {"budget": {"steps": 6, "batch_size": 16, "eval_every": 6}, "optimizer": {"name": "adamw", "lr": 0.001}}


def suite_data(fault: str | None = None, marker: str = "", **changes) -> dict:
    data = smoke_data(**{"seeds": [0], "budget": {"steps": 4, "batch_size": 16, "eval_every": 4, "log_every": 2}, **changes})
    if data["teacher"] is not None:
        data["teacher"] = {**data["teacher"], "train": TEACHER_BUDGET}
    if fault is not None:
        data["teacher"] = {**data["teacher"], "model": "bert-faulty", "options": {**data["teacher"]["options"], "fault": fault, "marker": marker}}
    return data


def only_teacher_hash(suite) -> str:
    (th,) = {s.teacher_hash for s in suite.runs}
    return th


DRIVER = textwrap.dedent("""
    import sys, yaml
    sys.path.insert(0, {tests!r})
    from kdbench.executors.local import run_local
    from kdbench.registry import Registry, make_plugin_manager
    from kdbench.spec import build_suite
    reg = Registry(*make_plugin_manager(extra_plugins=["support.fault_models"]))
    out = run_local(build_suite(yaml.safe_load(open({suite!r})), registry=reg), {results!r}, registry=reg, progress=False)
    print("trained", len(out.trained))
""")


def test_kill_during_the_shared_teachers_training_charges_no_student_run(tmp_path, monkeypatch):
    """Case: SIGKILL of the driver while the shared teacher trains (attempts charged to what ran).
    On the image smoke suite (tiny CNNs: the property is the executor's, and its two
    processes then start and train in seconds, not tens of seconds)."""
    marker = tmp_path / "teacher-died"
    data = image_data(tmp_path / "images", budget={"steps": 4, "batch_size": 16, "eval_every": 4, "log_every": 2})
    data["teacher"] = {**data["teacher"], "model": "cnn-faulty", "options": {**data["teacher"]["options"], "fault": "die", "marker": str(marker)},
                       "train": TEACHER_BUDGET}
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    script = DRIVER.format(tests=str(ROOT / "tests"), suite=str(suite), results=str(results))
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == -9 and marker.exists(), first.stderr
    store = open_store(results)
    assert store.runs() == []  # no run was claimed while the teacher trained
    (teacher_row,) = _teacher_rows(results)
    assert teacher_row["status"] == "running"  # left by the dead process; taken over next time
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert second.returncode == 0 and "trained 4" in second.stdout, second.stderr
    rows = open_store(results).runs()
    assert len(rows) == 4 and all(r["status"] == DONE and r["attempts"] == 1 for r in rows)


def _teacher_rows(results: Path) -> list[dict]:
    with open_store(results).transaction() as con:
        return [dict(r) for r in con.execute("SELECT hash, status FROM teachers")]


def test_a_diverging_teacher_is_recorded_once_on_its_row_and_blocks_its_runs_uncharged(tmp_path, fault_registry, monkeypatch):
    """Case: teacher divergence (recorded on the teacher; runs blocked, not diverged; trained once)."""
    suite = build_suite(suite_data(fault="nan", seeds=[0, 1]), registry=fault_registry)
    th = only_teacher_hash(suite)
    calls = []
    real = teachers_mod.fine_tune_teacher
    monkeypatch.setattr(teachers_mod, "fine_tune_teacher", lambda *a, **k: calls.append(1) or real(*a, **k))
    outcome = run_local(suite, tmp_path, registry=fault_registry, progress=False)
    assert len(calls) == 1  # not once per run
    store = open_store(tmp_path)
    teacher = store.teacher(th)
    assert teacher["status"] == FAILED and teacher["error"].startswith("the teacher diverged during fine-tuning: loss became nan at step")
    rows = {(r["method"], r["seed"]): r for r in store.runs()}
    for seed in (0, 1):
        assert rows[("none", seed)]["status"] == DONE
        kd = rows[("kd", seed)]
        assert kd["status"] == FAILED and kd["attempts"] == 0 and kd["diverged_step"] is None
        assert kd["error"].startswith(f"blocked by teacher {th}: the teacher diverged during fine-tuning")
    assert outcome.unsuccessful and len(outcome.blocked) == 2


def test_runs_blocked_by_a_failed_teacher_train_once_it_is_fixed(tmp_path, fault_registry, monkeypatch):
    """Case: blocked runs are retried (with their first attempt) once the teacher trains."""
    suite = build_suite(suite_data(methods=[{"name": "kd"}], seeds=[0, 1]), registry=fault_registry)
    real = teachers_mod.fine_tune_teacher
    monkeypatch.setattr(teachers_mod, "fine_tune_teacher", lambda *a, **k: TeacherOutcome(FAILED, error="Traceback ...\nOSError: disk on fire"))
    first = run_local(suite, tmp_path, registry=fault_registry, progress=False)
    assert len(first.blocked) == 2 and first.trained == []
    assert all(r["error"] == f"blocked by teacher {only_teacher_hash(suite)}: OSError: disk on fire" for r in open_store(tmp_path).runs())
    monkeypatch.setattr(teachers_mod, "fine_tune_teacher", real)  # "fixed"
    again = run_local(suite, tmp_path, registry=fault_registry, progress=False)
    assert len(again.trained) == 2 and not again.unsuccessful
    assert all(r["status"] == DONE and r["attempts"] == 1 for r in open_store(tmp_path).runs())


@pytest.fixture
def trained(tmp_path, fault_registry):
    """A results folder with one finished kd run (teacher checkpoint and shared logits on disk)."""
    suite = build_suite(suite_data(methods=[{"name": "kd"}]), registry=fault_registry)
    run_local(suite, tmp_path / "r", registry=fault_registry, progress=False)
    (row,) = open_store(tmp_path / "r").runs()
    assert row["status"] == DONE
    return suite, tmp_path / "r", row


def _rerun(suite, results, registry):
    outcome = run_local(suite, results, registry=registry, progress=False, rerun=True)
    (row,) = open_store(results).runs()
    return outcome, row


def test_a_damaged_teacher_checkpoint_is_named_and_rebuilt(trained, fault_registry):
    """Case: corrupted teacher checkpoint (checksum mismatch names file and teacher; rebuilt)."""
    suite, results, row = trained
    th = only_teacher_hash(suite)
    path = checkpoint_path(results, th)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match=rf"checkpoint of teacher {th}: {path} does not match its recorded sha256.*training it again"):
        _, again = _rerun(suite, results, fault_registry)
    assert again["status"] == DONE and again["metrics"] == row["metrics"]  # the rebuilt teacher is the same teacher
    assert open_store(results).teacher(th)["status"] == DONE


@pytest.mark.parametrize("damage", ["sign-flipped", "truncated"])
def test_damaged_teacher_logits_are_named_and_recomputed(trained, fault_registry, damage):
    """Case: sign-flipped or truncated cached teacher logits (named, rebuilt, same score)."""
    suite, results, row = trained
    th = only_teacher_hash(suite)
    path = checkpoint_path(results, th).with_name("train_logits.safetensors")
    if damage == "sign-flipped":
        save_file({"logits": -load_file(str(path))["logits"]}, str(path))
    else:
        path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match=rf"train-split logits of teacher {th}: {path} does not match its recorded sha256"):
        _, again = _rerun(suite, results, fault_registry)
    assert again["cost"]["shared_teacher_outputs"] and again["metrics"] == row["metrics"]
    assert artefacts.sha256_file(path) == artefacts.expected_sha(path)  # rewritten with a matching checksum


def test_stale_temp_files_from_a_killed_rename_are_removed(trained, fault_registry):
    """Case: a kill between write and rename leaves a temp file (removed by the next run)."""
    suite, results, _ = trained
    folder = checkpoint_path(results, only_teacher_hash(suite)).parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = [folder / f"train_logits.safetensors.{dead}.tmp", folder / "model.tmp"]
    for f in stale:
        f.write_bytes(b"half a file")
    _rerun(suite, results, fault_registry)
    assert not any(f.exists() for f in stale)


def test_a_results_folder_moves_and_old_absolute_teacher_rows_still_read(trained, fault_registry, tmp_path, monkeypatch):
    """Case: stored teacher paths are relative to the results folder (a copied folder reads its own files)."""
    suite, results, row = trained
    th = only_teacher_hash(suite)
    assert open_store(results).teacher(th)["path"] == f"teachers/{th}/model.safetensors"
    moved = tmp_path / "elsewhere" / "r"
    shutil.copytree(results, moved)
    shutil.rmtree(results)  # the original is gone: the copy must not need it
    monkeypatch.setattr(teachers_mod, "fine_tune_teacher", lambda *a, **k: pytest.fail("teacher trained again"))
    _, again = _rerun(suite, moved, fault_registry)
    assert again["metrics"] == row["metrics"]
    # a row written by an older kdbench holds an absolute path: still read
    store = open_store(moved)
    with store.transaction() as con:
        # (older kdbench: no row checksums either, so the store treats the row as unverified)
        con.execute("UPDATE teachers SET path=?, checksum=NULL WHERE hash=?", (str(moved / "teachers" / th / "model.safetensors"), th))
        con.execute("DELETE FROM meta WHERE key='checksums_since'")
    _, again = _rerun(suite, moved, fault_registry)
    assert again["status"] == DONE


def test_kdbench_run_exits_3_when_a_run_failed_or_diverged(tmp_path, fault_registry):
    """Case: `kdbench run` exit code when runs failed (3; 0 when all are done)."""
    path = tmp_path / "suite.yaml"
    set_registry(fault_registry)
    try:
        for methods, code in (([{"name": "none"}], 0), ([{"name": "none"}, {"name": "raises"}], 3)):
            path.write_text(yaml.safe_dump(smoke_data(teacher=None, methods=methods, seeds=[0], budget={"steps": 2, "batch_size": 16})))
            assert cli.main(["run", str(path), "--results", str(tmp_path / "r"), "--no-report"]) == code
    finally:
        set_registry(None)


def test_the_executor_beats_a_claimed_runs_heart_while_it_trains(tmp_path, fault_registry):
    """Case: claims and heartbeats belong to the executor (the runner never touches the store)."""
    import time

    from kdbench.executors.phases import heartbeat

    spec = build_suite(suite_data(teacher=None, methods=[{"name": "none"}], baseline="none"), registry=fault_registry).runs[0]
    store = open_store(tmp_path)
    assert store.claim(spec)
    before = store.get(spec.hash)["heartbeat"]
    with heartbeat(store, spec.hash, every_s=0.05):
        time.sleep(0.3)
    assert store.get(spec.hash)["heartbeat"] > before


def test_a_run_without_its_teacher_checkpoint_fails_with_a_named_message(tmp_path, fault_registry):
    """Case: a student run is handed its teacher by the executor; without it, it says so."""
    from kdbench.train import Runner

    spec = build_suite(suite_data(methods=[{"name": "kd"}]), registry=fault_registry).runs[0]
    result = Runner(tmp_path, fault_registry, device="cpu", progress=False).run(spec)
    assert result.status == FAILED and f"needs the checkpoint of teacher {spec.teacher_hash}" in result.error
    assert not (tmp_path / "store.sqlite").exists()


def test_an_unreadable_checkpoint_from_before_checksums_is_named_and_rebuilt(trained, fault_registry):
    """Case: a truncated teacher checkpoint with no recorded checksum (older kdbench): named, rebuilt."""
    suite, results, row = trained
    th = only_teacher_hash(suite)
    path = checkpoint_path(results, th)
    artefacts.sidecar(path).unlink()
    store = open_store(results)
    with store.transaction() as con:  # as an older kdbench wrote the row: no checksum in its env
        con.execute("UPDATE teachers SET env='{}', checksum=NULL WHERE hash=?", (th,))
        con.execute("DELETE FROM meta WHERE key='checksums_since'")  # nor row checksums
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(UserWarning, match=rf"checkpoint of teacher {th}: {path} cannot be read"):
        _, again = _rerun(suite, results, fault_registry)
    assert again["status"] == DONE and again["metrics"] == row["metrics"]
    assert artefacts.expected_sha(path) == artefacts.sha256_file(path)


def test_the_teacher_path_rule_exists_once():
    """Case: one place says where a teacher's files live (executors and workers ask it)."""
    holders = [p.relative_to(ROOT).as_posix() for p in (ROOT / "kdbench").rglob("*.py") if '"model.safetensors"' in p.read_text()]
    assert holders == ["kdbench/train/teachers.py"]
