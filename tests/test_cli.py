"""The command line end to end: list, validation errors, run/skip, SIGKILL + resume,
the report against the stored rows, and a third-party plugin package."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdbench import cli
from kdbench.executors.phases import open_store
from kdbench.registry import set_registry
from support.suites import write_image_suite

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"
KDBENCH = [sys.executable, "-m", "kdbench.cli"]


def kdbench(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([*KDBENCH, *args], capture_output=True, text=True, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"kdbench {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def kdbench_here(capsys, *args: str) -> tuple[int, str, str]:
    """`kdbench ARGS` in this process: what the command prints and returns without an
    interpreter start-up (about 6 s of CPU for torch, scipy and the plugins). For commands
    that train nothing; the registry is rebuilt so that it sees the plugins installed now."""
    capsys.readouterr()
    set_registry(None)
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    finally:
        set_registry(None)
    out = capsys.readouterr()
    return code, out.out, out.err


def write_suite(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(changes)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_list_methods_shows_descriptions_and_plugins():
    out = kdbench("list", "methods").stdout  # the installed command itself, in a process of its own
    assert "kd" in out and "Hinton KD" in out and "builtin-method-kd" in out
    assert "none" in out and "labels only" in out


def test_list_unknown_pattern_suggests(capsys):
    code, _, err = kdbench_here(capsys, "list", "methods", "kdd")
    assert code == 2 and "Did you mean 'kd'" in err


def test_misspelt_method_exits_2_before_anything_is_written(tmp_path, capsys):
    data = yaml.safe_load(SMOKE.read_text())
    data["methods"][1]["name"] = "kdd"
    suite = tmp_path / "bad.yaml"
    suite.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    code, _, err = kdbench_here(capsys, "run", str(suite), "--results", str(results))
    assert code == 2
    assert "methods[1].name: unknown method 'kdd'. Did you mean 'kd'" in err
    assert not results.exists()


def test_run_twice_trains_nothing_the_second_time_and_report_matches_store(tmp_path, capsys):
    results = tmp_path / "results"
    first = kdbench("run", str(SMOKE), "--results", str(results))
    assert "trained 4, skipped 0" in first.stderr
    code, _, err = kdbench_here(capsys, "run", str(SMOKE), "--results", str(results))  # trains nothing: in this process
    assert code == 0 and "trained 0, skipped 4" in err

    assert kdbench_here(capsys, "report", str(SMOKE), "--results", str(results), "--format", "json")[0] == 0
    table = json.loads((results / "leaderboard.json").read_text())
    rows = open_store(results).runs()
    assert len(rows) == 4
    column = next(k for k in table[0] if k.startswith("movie-sentiment"))
    for method in ("none", "kd"):
        scores = np.array([r["metrics"]["test"]["accuracy"] for r in rows if r["method"] == method]) * 100
        cell = next(r[column] for r in table if r["method"] == method)
        assert cell == f"{scores.mean():.2f} ± {scores.std(ddof=1):.2f} (n=2)"
    (teacher,) = open_store(results).teachers()
    cell = next(r[column] for r in table if r["method"] == "teacher")
    assert cell == f"{teacher['metrics']['test']['accuracy'] * 100:.2f} (n=1)"


def test_sigkill_mid_suite_then_resume_redoes_only_missing_runs(tmp_path, capsys, images):
    # 2 methods x 2 seeds, run one after another: killed while the third or fourth trains
    # (tiny CNNs, 150 steps: about 1 s a run, several looks at the store each)
    suite = write_image_suite(tmp_path, seeds=[0, 1], budget={"steps": 150, "batch_size": 16, "eval_every": 150, "log_every": 50})
    results = tmp_path / "results"
    proc = subprocess.Popen([*KDBENCH, "run", str(suite), "--results", str(results), "--no-report"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store_path = results / "store.sqlite"
    deadline = time.time() + 300  # generous: a loaded 2-core machine starts slowly
    done_before: set[str] = set()
    while time.time() < deadline:
        if store_path.exists():
            rows = open_store(results).runs()
            done_before = {r["hash"] for r in rows if r["status"] == "done"}
            if len(done_before) >= 2 and any(r["status"] == "running" for r in rows):
                break
        time.sleep(0.25)  # each look opens the store: keep it from competing with the run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = open_store(results).runs()
    done_before = {r["hash"] for r in rows if r["status"] == "done"}
    assert 2 <= len(done_before) < 4, "the kill should land mid-suite"
    finished_at = {r["hash"]: r["finished_at"] for r in rows if r["status"] == "done"}

    resumed = kdbench("run", str(suite), "--results", str(results), "--no-report")
    assert f"trained {4 - len(done_before)}, skipped {len(done_before)}" in resumed.stderr
    rows = open_store(results).runs()
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert {r["hash"]: r["finished_at"] for r in rows if r["hash"] in finished_at} == finished_at  # untouched
    code, report, _ = kdbench_here(capsys, "report", str(suite), "--results", str(results))
    assert code == 0 and report.count("(n=2)") == 2  # every run exactly once


@pytest.fixture
def images(tmp_path, monkeypatch):
    """The image smoke suite (support.suites) for commands whose property is not a model
    family's: its processes import no transformers. Its encoded splits are cached in
    ``tmp_path``, not in the user's cache."""
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def external_plugin(tmp_path_factory):
    """tests/external_plugin installed as a real package (dist-info, entry points) into a
    folder of this test process's own, on its sys.path and on PYTHONPATH for the commands it
    starts: seen exactly as a pip-installed plugin, but not by other test processes (pytest-xdist
    workers share the venv)."""
    pkg = ROOT / "tests" / "external_plugin"
    target = tmp_path_factory.mktemp("external-plugin")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(target), str(pkg)]
    subprocess.run(pip, check=True, capture_output=True, text=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(target))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
        yield


def test_external_plugin_is_listed_and_runs(tmp_path, external_plugin, capsys, images):
    code, out, _ = kdbench_here(capsys, "list", "methods")
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("smoothed-kd"))
    assert "label-smoothed teacher" in line and line.rstrip().endswith("example-methods")
    suite = write_image_suite(tmp_path, methods=[{"name": "smoothed-kd", "params": {"epsilon": 0.2}}], seeds=[0])
    results = tmp_path / "results"
    kdbench("run", str(suite), "--results", str(results))
    (row,) = open_store(results).runs()
    assert row["method"] == "smoothed-kd" and row["status"] == "done" and row["params"]["epsilon"] == 0.2


def test_external_tracker_and_executor_are_registered_and_run(tmp_path, external_plugin, capsys, images):
    """The example package's tracker (jsonl) and executor (example-serial) come through their
    hooks: listed, offered by --executor, and used by a real run."""
    listed = ""
    for kind in ("executors", "trackers"):
        code, out, _ = kdbench_here(capsys, "list", kind)
        assert code == 0
        listed += out
    assert "example-serial" in listed and "example-executor" in listed and "jsonl" in listed and "example-tracker" in listed
    suite = write_image_suite(tmp_path, methods=[{"name": "none"}, {"name": "kd"}], seeds=[0, 1], trackers=["jsonl"],
                              budget={"steps": 4, "batch_size": 16, "eval_every": 2, "log_every": 2})
    results = tmp_path / "results"
    kdbench("run", str(suite), "--results", str(results), "--no-report", "--executor", "example-serial")
    rows = open_store(results).runs()
    assert len(rows) == 4 and all(r["status"] == "done" and r["attempts"] == 1 for r in rows)
    for row in rows:
        events = [json.loads(line) for line in (results / "runs" / row["hash"] / "events.jsonl").read_text().splitlines()]
        evals = {(e["step"], e["split"]): e["metrics"] for e in events if e["kind"] == "eval"}
        for entry in row["history"]:
            assert evals[(entry["step"], "test")] == entry["test"]
        assert events[-1] == {"kind": "end", "status": "done"}
    assert kdbench_here(capsys, "run", str(suite), "--results", str(results), "--no-report", "--executor", "nope")[0] == 2



def test_external_task_is_listed_generated_and_trained(tmp_path, external_plugin, capsys):
    """The example package's task (word-votes) comes through kdbench_tasks: listed, its
    labels follow its rule on every example, and a suite trains and reports on it."""
    from kdbench_example_plugin.task import DOWN, UP, WordVotes

    assert "word-votes" in kdbench_here(capsys, "list", "tasks")[1]
    splits = WordVotes(WordVotes.Options(size=120)).load("")
    assert {k: len(v["label"]) for k, v in splits.items()} == {"test": 20, "validation": 20, "train": 80}
    for split in splits.values():
        for text, label in zip(split["text"], split["label"]):
            words = text.split()
            assert label == int(sum(w in UP for w in words) > sum(w in DOWN for w in words))
    suite = write_suite(tmp_path, tasks=[{"name": "word-votes", "options": {"size": 240}}], methods=[{"name": "none"}], seeds=[0])
    results = tmp_path / "results"
    kdbench("run", str(suite), "--results", str(results), "--no-report")
    (row,) = open_store(results).runs()
    assert row["status"] == "done" and row["task"] == "word-votes" and set(row["env"]["data"]) >= {"train", "validation", "test"}
