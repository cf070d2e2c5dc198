"""The TensorBoard tracker: silent unless enabled, a clear error without the package, and
event files whose scalars equal what the results store holds for the same run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from kdbench.api import KDBenchError
from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.registry import Registry, get_registry, make_plugin_manager
from kdbench.spec import build_suite
from kdbench.train.trackers import RunTrackers
from kdbench_plugins.loggers import tensorboard as tb_plugin

SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.yaml"
PLUGIN = "kdbench_plugins.loggers.tensorboard"


def _suite_data(trackers: list[str]) -> dict:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(methods=[{"name": "none"}], seeds=[0], trackers=trackers, teacher=None,
                budget={"steps": 10, "batch_size": 16, "eval_every": 5, "log_every": 5})
    return data


@pytest.fixture(scope="module")
def registry() -> Registry:
    pm, broken = make_plugin_manager(extra_plugins=[PLUGIN])
    return Registry(pm, broken)


def test_tracker_name_is_known_to_the_validator(registry):
    assert registry.tracker("tensorboard") is tb_plugin.TensorBoardTracker  # through the kdbench_trackers hook
    build_suite(_suite_data(["tensorboard"]), registry=registry)  # validates
    with pytest.raises(Exception, match="unknown tracker 'tensorbord'"):
        build_suite(_suite_data(["tensorbord"]), registry=registry)


def test_missing_package_gives_a_clear_error_only_when_enabled(tmp_path, monkeypatch):
    spec = build_suite(_suite_data([])).runs[0]
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes 'import tensorboard' fail
    RunTrackers.start(get_registry(), (), spec, tmp_path)  # not enabled: nothing happens
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(KDBenchError, match=r"pip install 'kdbench\[tensorboard\]'"):
        tb_plugin.TensorBoardTracker(spec, tmp_path)
    with pytest.warns(UserWarning, match="tracker 'tensorboard' raised in start.*pip install"):
        assert RunTrackers.start(get_registry(), ("tensorboard",), spec, tmp_path).trackers == []  # the run goes on


def test_event_files_hold_the_stored_metrics_and_cost(tmp_path, registry):
    pytest.importorskip("tensorboard", reason="the optional 'tensorboard' package is not installed (pip install 'kdbench[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for trackers in (["tensorboard"], []):
        results = tmp_path / ("on" if trackers else "off")
        suite = build_suite(_suite_data(trackers), registry=registry)
        outcome = run_local(suite, results, registry=registry, progress=False)
        assert list(outcome.statuses.values()) == ["done"]
        (row,) = open_store(results).runs()
        logdir = results / "runs" / row["hash"] / "tensorboard"
        if not trackers:
            assert not logdir.exists()  # silent unless the suite enables it
            continue
        acc = EventAccumulator(str(logdir))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        for entry in row["history"]:  # evaluations at steps 5 and 10
            for split in ("validation", "test"):
                for metric, value in entry[split].items():
                    events = {e.step: e.value for e in acc.Scalars(f"{split}/{metric}")}
                    assert events[entry["step"]] == pytest.approx(value, rel=1e-6)
        assert [e.step for e in acc.Scalars("train/loss")] == [5, 10]
        assert "train/lr" in tags
        (wall,) = acc.Scalars("cost/wall_s")
        assert wall.step == 10 and wall.value == pytest.approx(row["cost"]["wall_s"], rel=1e-6)
        (params,) = acc.Scalars("cost/student_params")
        assert params.value == row["cost"]["student_params"]
