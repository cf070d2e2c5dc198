"""The Ray executor on a local 2-CPU cluster: same rows as the local executor for a 4-run
sweep (2 seeds x 2 alphas), one teacher task for many students, worker deaths retried a bounded number of
times, raise/NaN/OOM isolated, and SIGKILL of the driver followed by a resume that
completes exactly the missing runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

# One Ray cluster for this file: `make test` hands pytest-xdist workers whole files
# (--dist loadfile), so every test here runs on the one worker that started it.

from kdbench.api import KDBenchError  # noqa: E402
from kdbench.executors.ray_cluster import _check_reachable, local_cluster_options, plugins_for_workers, run_ray  # noqa: E402
from kdbench.executors.local import run_local  # noqa: E402
from kdbench.executors.phases import open_store
from kdbench.registry import Registry, make_plugin_manager  # noqa: E402
from kdbench.spec import build_suite  # noqa: E402
from support.suites import image_data, write_image_suite, write_image_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KDBENCH = [sys.executable, "-m", "kdbench.cli"]


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (starting one costs ~5 s); the CLI tests reach it
    through its address, as `kdbench run --executor ray --address` would reach any cluster."""
    import builtins

    if ray.is_initialized():
        ray.shutdown()
    builtin_print = builtins.print
    ray.init(num_cpus=2, logging_level="ERROR", **local_cluster_options())  # as `kdbench run --executor ray` starts one
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    # Ray's tqdm support replaces print in the driver process (ray.experimental.tqdm_ray)
    # and leaves it so; later test files in this worker expect the builtin (test_cifar100
    # pickles it)
    builtins.print = builtin_print


@pytest.fixture(scope="module")
def registry() -> Registry:
    pm, broken = make_plugin_manager(extra_plugins=["support.fault_methods"])
    return Registry(pm, broken)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The image smoke suite's data (tiny CNNs: the Ray workers import no transformers),
    with a cache of encoded splits of this module's own (the workers are handed it)."""
    folder = tmp_path_factory.mktemp("images")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDBENCH_CACHE", str(folder / "cache"))
        yield write_image_task(folder / "data")


def suite_data(images: Path, **changes) -> dict:
    return image_data(images, **{"budget": {"steps": 10, "batch_size": 16, "eval_every": 5, "log_every": 5}, **changes})


COMPARED = ("task", "method", "student", "seed", "params", "teacher_hash", "spec", "status", "metrics", "history",
            "error", "diverged_step", "attempts")


def test_workers_of_a_cluster_kdbench_starts_run_at_the_drivers_priority(cluster):
    """Ray's default niceness 15 let any other busy process starve the training workers."""
    import os

    @ray.remote(num_cpus=1)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)


def test_worker_plugins_are_shipped_by_module_name(registry):
    modules, objects = plugins_for_workers(registry)
    assert modules == [("support.fault_methods", str(ROOT / "tests"))] and objects == []


def test_a_wrong_address_fails_fast_with_a_clear_message(monkeypatch):
    """One bounded connection attempt, not Ray's minutes of retries (counted, not timed)."""
    import socket

    tries = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: tries.append(timeout) or real(address, timeout=timeout))
    with pytest.raises(KDBenchError, match=r"--address 127.0.0.1:1: no Ray cluster answers there"):
        _check_reachable("127.0.0.1:1")
    assert len(tries) == 1 and 0 < tries[0] <= 10


def test_resources_no_node_has_are_refused_before_anything_is_claimed(tmp_path, cluster, registry, images):
    suite = build_suite(suite_data(images, resources={"cpus": 1, "gpus": 1}), registry=registry)
    with pytest.raises(KDBenchError, match=r"each run asks for 1.0 CPU\(s\) and 1.0 GPU\(s\), but no node .* 2 CPUs, 0 GPUs"):
        run_ray(suite, tmp_path, registry=registry)
    assert open_store(tmp_path).runs() == []


def test_sweep_on_ray_equals_local_executor(tmp_path, cluster, registry, images):
    # 2 seeds x 2 alphas, one shared teacher: seeds and parameters both vary
    data = suite_data(images, methods=[{"name": "kd", "params": {"alpha": [0.5, 0.9], "temperature": 2.0}}], seeds=[0, 1])
    suite = build_suite(data, registry=registry)
    assert len(suite.runs) == 4
    local = run_local(suite, tmp_path / "local", registry=registry, progress=False)
    remote = run_ray(suite, tmp_path / "ray", registry=registry)
    assert sorted(remote.trained) == sorted(local.trained) == sorted(s.hash for s in suite.runs)
    a = {r["hash"]: r for r in open_store(tmp_path / "local").runs()}
    b = {r["hash"]: r for r in open_store(tmp_path / "ray").runs()}
    assert a.keys() == b.keys() and len(a) == 4
    for h in a:
        assert b[h]["status"] == "done", b[h]["error"]
        assert {k: b[h][k] for k in COMPARED} == {k: a[h][k] for k in COMPARED}, h
        assert b[h]["owner"] is None and b[h]["finished_at"] >= b[h]["started_at"]
    # the runs are not all alike: seeds give different test scores
    assert len({r["metrics"]["test"]["accuracy"] for r in a.values()}) > 1
    # one teacher, trained once, with the same metrics; its checkpoint in the results folder
    (ta,), (tb,) = open_store(tmp_path / "local").teachers(), open_store(tmp_path / "ray").teachers()
    assert ta["hash"] == tb["hash"] and ta["metrics"] == tb["metrics"]
    assert tb["path"] == ta["path"] == f"teachers/{tb['hash']}/model.safetensors"  # relative to the results folder
    assert (tmp_path / "ray" / tb["path"]).read_bytes() == (tmp_path / "local" / ta["path"]).read_bytes()
    # a second pass trains nothing (every run skipped as finished)
    again = run_ray(suite, tmp_path / "ray", registry=registry)
    assert again.trained == [] and len(again.skipped) == 4


def test_faults_on_ray_are_isolated_and_worker_deaths_retried_then_failed(tmp_path, cluster, registry, images):
    marker = tmp_path / "died-once"
    methods = [{"name": "nan-at-3"}, {"name": "raises"}, {"name": "oom"}, {"name": "dies-once", "params": {"marker": str(marker)}},
               {"name": "dies-always"}, {"name": "none"}]
    suite = build_suite(suite_data(images, methods=methods, seeds=[0], teacher=None, baseline="none"), registry=registry)
    outcome = run_ray(suite, tmp_path / "r", registry=registry, max_attempts=2)
    rows = {r["method"]: r for r in open_store(tmp_path / "r").runs()}
    assert len(rows) == 6 and sorted(outcome.trained) == sorted(s.hash for s in suite.runs)
    assert rows["nan-at-3"]["status"] == "diverged" and rows["nan-at-3"]["diverged_step"] == 3
    assert rows["raises"]["status"] == "failed" and "Traceback" in rows["raises"]["error"]
    assert "ValueError: deliberate failure in a method" in rows["raises"]["error"]
    assert rows["oom"]["status"] == "failed" and rows["oom"]["error"].startswith("out of memory on cpu: CUDA out of memory")
    # killed once: retried, then done (2 starts counted in the store)
    assert marker.exists()
    assert rows["dies-once"]["status"] == "done" and rows["dies-once"]["attempts"] == 2
    # killed every time: 2 starts, then failed with a message that says so
    assert rows["dies-always"]["status"] == "failed" and rows["dies-always"]["attempts"] == 2
    assert "worker process running it died during each of its 2 attempt(s)" in rows["dies-always"]["error"]
    assert rows["none"]["status"] == "done" and rows["none"]["attempts"] == 1


def test_a_teacher_that_diverges_on_ray_is_recorded_on_its_row_and_blocks_its_runs_uncharged(tmp_path, cluster, fault_registry, images):
    """Case: teacher divergence under Ray (issue 15): teacher row failed, runs blocked, not diverged."""
    data = suite_data(images, seeds=[0, 1])
    data["teacher"] = {**data["teacher"], "model": "cnn-faulty", "options": {**data["teacher"]["options"], "fault": "nan"}}
    suite = build_suite(data, registry=fault_registry)
    outcome = run_ray(suite, tmp_path, registry=fault_registry)
    store = open_store(tmp_path)
    (th,) = {s.teacher_hash for s in suite.runs}
    teacher = store.teacher(th)
    assert teacher["status"] == "failed" and "the teacher diverged during fine-tuning: loss became nan" in teacher["error"]
    rows = {(r["method"], r["seed"]): r for r in store.runs()}
    for seed in (0, 1):
        assert rows[("none", seed)]["status"] == "done"
        kd = rows[("kd", seed)]
        assert kd["status"] == "failed" and kd["attempts"] == 0
        assert kd["error"].startswith(f"blocked by teacher {th}: the teacher diverged during fine-tuning")
    assert sorted(outcome.blocked) == sorted(s.hash for s in suite.runs if s.method == "kd") and outcome.unsuccessful


def test_a_full_disk_answer_from_a_worker_gives_the_run_and_the_teacher_back_without_a_cluster(tmp_path, registry, images):
    """case: the worker's side (train_run_task in this process) answers a full disk with
    its host and the file; the driver's side (_on_done, Ray's get replaced by that answer)
    gives the run back and marks the teacher, then raises DiskFull (exit 2). The cluster
    test below does the same end to end; this one needs no cluster to start."""
    import socket
    from types import SimpleNamespace

    from kdbench.executors import ray_cluster
    from kdbench.store import FAILED, RUNNING
    from kdbench.train.artefacts import DISK_FULL_PREFIX, DiskFull

    marker = tmp_path / "space-freed"
    suite = build_suite(suite_data(images, methods=[{"name": "disk-full-once", "params": {"marker": str(marker)}}], seeds=[0],
                                   teacher=None, baseline="disk-full-once"), registry=registry)
    (spec,) = suite.runs
    ctx = {"results_dir": str(tmp_path / "r"), "device": "cpu", "trackers": [], "threads": 1, "env": {},
           "plugins": [("support.fault_methods", str(ROOT / "tests"))], "plugin_objects": []}
    import kdbench.registry as registry_module

    before = registry_module._REGISTRY
    try:
        answer = ray_cluster.train_run_task(ctx, spec.model_dump_json(), None)
    finally:  # a worker sets its own process-wide registry: this process is not a worker
        registry_module._REGISTRY = before
        ray_cluster._WORKER_STATE.clear()
    assert set(answer) == {ray_cluster.DISK_FULL_KEY}
    assert answer[ray_cluster.DISK_FULL_KEY].startswith(f"on worker host {socket.gethostname()}: cannot write ")
    assert "artefact.bin" in answer[ray_cluster.DISK_FULL_KEY] and "No space left on device" in answer[ray_cluster.DISK_FULL_KEY]

    store = open_store(tmp_path / "r")
    assert store.claim(spec) and store.claim_teacher("t0", "cifar100", {})
    driver = object.__new__(ray_cluster._Driver)  # the driver's state without a cluster
    driver.store, driver.ray = store, SimpleNamespace(get=lambda ref: answer)
    driver.inflight = {"run-ref": ("run", spec), "teacher-ref": ("teacher", "t0", spec, None)}
    for ref in ("run-ref", "teacher-ref"):
        with pytest.raises(DiskFull, match="on worker host"):
            driver._on_done(ref)
    (row,) = store.runs()
    assert row["status"] == FAILED and row["error"].startswith(DISK_FULL_PREFIX) and row["metrics"] is None
    assert store.teacher("t0")["status"] == FAILED and store.teacher("t0")["error"].startswith(DISK_FULL_PREFIX)
    assert store.claim(spec) and store.claim_teacher("t0", "cifar100", {})  # the next command takes both again
    assert store.get(spec.hash)["status"] == RUNNING


def test_a_full_disk_in_a_ray_worker_stops_the_driver_with_a_named_error_and_gives_the_run_back(tmp_path, cluster, registry, images):
    """case: ENOSPC while a worker writes an artefact (was: the run recorded failed as
    'worker set-up failed', exit 3): DiskFull (exit 2) naming the worker's host and file,
    the run's row 'interrupted: disk full', then trained by the same command once there is room."""
    from kdbench import cli
    from kdbench.train.artefacts import DISK_FULL_PREFIX, DiskFull

    marker = tmp_path / "space-freed"
    suite = build_suite(suite_data(images, methods=[{"name": "disk-full-once", "params": {"marker": str(marker)}}], seeds=[0],
                                   teacher=None, baseline="disk-full-once"), registry=registry)
    with pytest.raises(DiskFull, match=r"on worker host .*: cannot write .*artefact\.bin.*No space left on device") as err:
        run_ray(suite, tmp_path / "r", registry=registry)
    assert isinstance(err.value, cli.KDBenchError)  # exit code 2 at the command line
    (row,) = open_store(tmp_path / "r").runs()
    assert row["status"] == "failed" and row["error"].startswith(DISK_FULL_PREFIX) and row["metrics"] is None
    outcome = run_ray(suite, tmp_path / "r", registry=registry)  # the marker: space freed
    (row,) = open_store(tmp_path / "r").runs()
    assert row["status"] == "done" and outcome.trained == [row["hash"]]


def test_sigkill_of_the_ray_driver_then_resume_completes_exactly_the_missing_runs(tmp_path, cluster, images):
    # 2 methods x 2 seeds: the 2 cluster CPUs train two runs at a time, so the kill lands
    # while the second pair trains (150 steps of the tiny CNN: about 1 s, several looks)
    suite = write_image_suite(tmp_path, seeds=[0, 1], budget={"steps": 150, "batch_size": 16, "eval_every": 150, "log_every": 50})
    results = tmp_path / "results"
    cmd = [*KDBENCH, "run", str(suite), "--results", str(results), "--no-report", "--executor", "ray", "--address", cluster]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store_path = results / "store.sqlite"
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if store_path.exists():
            rows = open_store(results).runs()
            if sum(r["status"] == "done" for r in rows) >= 2 and any(r["status"] == "running" for r in rows):
                break
        time.sleep(0.25)  # each look opens the store: keep it from competing with the run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = open_store(results).runs()
    done_before = {r["hash"]: r["finished_at"] for r in rows if r["status"] == "done"}
    interrupted = {r["hash"] for r in rows if r["status"] == "running"}
    assert 2 <= len(done_before) < 4 and interrupted, "the kill should land mid-suite"

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"trained {4 - len(done_before)}, skipped {len(done_before)}" in resumed.stderr
    rows = open_store(results).runs()
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert {r["hash"]: r["finished_at"] for r in rows if r["hash"] in done_before} == done_before  # untouched
    assert all(r["attempts"] == 2 for r in rows if r["hash"] in interrupted)  # taken over from the dead driver
    assert len(open_store(results).teachers()) == 1
