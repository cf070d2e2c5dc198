"""Plugin discovery through entry points, name look-ups, broken plugins."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest

from kdbench.api import Method
from kdbench.hookspecs import hookimpl
from kdbench.registry import Registry, UnknownNameError, get_registry, make_plugin_manager

BUILTIN_METHODS = {"none", "kd"}


def test_builtins_come_from_entry_points():
    reg = get_registry()
    assert BUILTIN_METHODS <= set(reg.names("methods"))
    assert {"movie-sentiment", "mnist5k"} <= set(reg.names("tasks"))
    assert {"bert", "cnn"} <= set(reg.names("models"))
    # registered under their entry-point names, like any third-party plugin
    assert reg.entries["methods"]["kd"].plugin == "builtin-method-kd"
    assert reg.entries["tasks"]["movie-sentiment"].plugin == "builtin-task-movie-sentiment"
    assert not {p for p in reg.broken if p.startswith("builtin-")}


def test_unknown_name_suggests_closest():
    reg = get_registry()
    with pytest.raises(UnknownNameError) as err:
        reg.method("kdd")
    assert "unknown method 'kdd'. Did you mean 'kd'" in str(err.value)
    with pytest.raises(UnknownNameError, match="Did you mean 'movie-sentiment'"):
        reg.task("movie_sentiment")


def test_wildcards():
    reg = get_registry()
    assert reg.names("tasks", "mnist*") == ["mnist5k"]
    assert reg.names("methods", "zzz*") == []


class Good(Method):
    name = "good"
    description = "a good method"


def _registry_with(*plugins) -> Registry:
    pm, broken = make_plugin_manager()
    for i, p in enumerate(plugins):
        pm.register(p, name=f"test-plugin-{i}")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        return Registry(pm, broken)


def test_plugin_that_raises_or_returns_junk_is_named_and_skipped():
    raising = types.SimpleNamespace(kdbench_methods=hookimpl(lambda: 1 / 0))
    junk = types.SimpleNamespace(kdbench_methods=hookimpl(lambda: [object]))
    not_list = types.SimpleNamespace(kdbench_tasks=hookimpl(lambda: "task"))
    good = types.SimpleNamespace(kdbench_methods=hookimpl(lambda: [Good]))
    reg = _registry_with(raising, junk, not_list, good)
    assert "good" in reg.names("methods")
    assert "ZeroDivisionError" in reg.broken["test-plugin-0"]
    assert "not a named Method subclass" in reg.broken["test-plugin-1"]
    assert "returned str, expected a list" in reg.broken["test-plugin-2"]
    # the broken plugins are mentioned when a name is not found
    with pytest.raises(UnknownNameError, match="Plugins that failed to load: test-plugin-0"):
        reg.method("missing")


def test_duplicate_name_is_refused():
    class FakeKD(Method):
        name = "kd"
        description = "impostor"

    reg = _registry_with(types.SimpleNamespace(kdbench_methods=hookimpl(lambda: [FakeKD])))
    assert reg.method("kd") is not FakeKD
    assert "already provided by plugin 'builtin-method-kd'" in reg.broken["test-plugin-0"]


def test_entry_point_that_fails_to_import_is_named(monkeypatch):
    from importlib.metadata import EntryPoint

    import kdbench.registry as registry_mod

    bad = EntryPoint(name="broken-thing", value="no_such_module_xyz", group="kdbench")
    real = registry_mod.entry_points
    monkeypatch.setattr(registry_mod, "entry_points", lambda group: list(real(group=group)) + [bad])
    pm, broken = make_plugin_manager()
    assert "broken-thing" in broken
    assert "no_such_module_xyz" in broken["broken-thing"] and "ModuleNotFoundError" in broken["broken-thing"]
    assert pm.get_plugin("builtin-method-kd") is not None  # the others still load


def test_a_method_named_teacher_is_refused_with_a_named_error():
    class Teacher(Method):
        name = "teacher"
        description = "takes the teacher's row name"

    reg = _registry_with(types.SimpleNamespace(kdbench_methods=hookimpl(lambda: [Teacher])))
    assert "teacher" not in reg.names("methods")
    assert "method name 'teacher' is reserved" in reg.broken["test-plugin-0"]


def _builtin_entry_points():
    from importlib.metadata import entry_points

    return sorted((ep for ep in entry_points(group="kdbench") if ep.name.startswith("builtin-")), key=lambda ep: ep.name)


@pytest.mark.parametrize("ep", _builtin_entry_points(), ids=lambda ep: ep.name)
def test_every_builtin_entry_point_registers_its_contributions(ep):
    """Each built-in plugin (methods, tasks, models, objectives, trackers, executors, report formats) loads through its
    entry point, contributes at least one named class of its kind, and the registry
    indexes every one of them under that entry point's name."""
    module = ep.load()
    if ep.name == "builtin-report-formats":  # formats are objects, not classes, and have their own table
        from kdbench.report.formats import report_formats

        formats = module.kdbench_report_formats()
        assert {f.name for f in formats} == {"md", "csv", "json", "latex", "html"}
        assert all(report_formats(get_registry())[f.name] is f for f in formats)
        return
    if ep.name == "builtin-recipes":  # folders of recipe files, searched after a suite's own
        (folder,) = module.kdbench_recipe_dirs()
        assert Path(folder).is_dir() and any(Path(folder).glob("*.yaml"))
        assert get_registry().recipe_dirs()[0] == Path(folder)
        return
    kind = {"method": "methods", "task": "tasks", "model": "models", "logger": "trackers", "executor": "executors",
            "families": "families", "objective": "objectives"}[ep.name.split("-")[1]]
    contributed = getattr(module, f"kdbench_{kind}")()
    assert contributed and all(isinstance(cls.name, str) for cls in contributed)
    reg = get_registry()
    for cls in contributed:
        assert reg.get(kind, cls.name) is cls and reg.entries[kind][cls.name].plugin == ep.name
    assert ep.name not in reg.broken


def test_executors_come_from_the_registry_and_the_cli_offers_them():
    from kdbench.cli import build_parser
    from kdbench.executors.ray_cluster import RayExecutor
    from kdbench.executors.local import LocalExecutor

    reg = get_registry()
    assert reg.executor("local") is LocalExecutor and reg.executor("ray") is RayExecutor
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # noqa: SLF001
    (executor,) = [a for a in run._actions if a.dest == "executor"]  # noqa: SLF001
    assert set(executor.choices) == set(reg.names("executors"))
