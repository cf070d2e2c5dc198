"""The plugin host: builds the pluggy manager, loads every ``kdbench`` entry point and
indexes the methods, tasks and models the plugins contribute."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterable

import pluggy

from kdbench import hookspecs
from kdbench.api import KDBenchError, Method, ModelFactory, Objective, Task
from kdbench.encoders import EncoderFamily
from kdbench.loader import printable
from kdbench.protocols import Executor, Tracker

ENTRY_POINT_GROUP = "kdbench"
KINDS = {"methods": Method, "tasks": Task, "models": ModelFactory, "objectives": Objective, "executors": Executor, "trackers": Tracker,
         "families": EncoderFamily}
#: Names a plugin may not take, per kind, and why: ``teacher`` names the teacher's own rows
#: in the store and the report.
RESERVED = {"methods": {"teacher": "it names the teacher's rows in results and reports"}}


class UnknownNameError(KDBenchError):
    """A method, task, model or objective name that no plugin provides."""


class ReservedNameError(KDBenchError):
    """A plugin contribution that takes a name kdbench reserves (e.g. a method ``teacher``)."""


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    cls: type
    plugin: str

    @property
    def description(self) -> str:
        return getattr(self.cls, "description", "") or ""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Registry:
    """Names -> contributions, built from a pluggy manager.

    ``broken`` maps plugin names to the error that stopped them from loading; they are
    reported, not fatal, so one bad third-party package never hides the others."""

    def __init__(self, pm: pluggy.PluginManager, broken: dict[str, str] | None = None):
        self.pm = pm
        self.broken: dict[str, str] = dict(broken or {})
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        for kind, base in KINDS.items():
            self._collect(kind, base)

    def _collect(self, kind: str, base: type) -> None:
        caller = getattr(self.pm.hook, f"kdbench_{kind}")
        for impl in caller.get_hookimpls():
            plugin = impl.plugin_name
            try:
                contributed = impl.function()
            except Exception as exc:  # a plugin's bug must not take the others down
                self._mark_broken(plugin, f"kdbench_{kind}() raised {type(exc).__name__}: {exc}")
                continue
            if not isinstance(contributed, (list, tuple)):
                self._mark_broken(plugin, f"kdbench_{kind}() returned {type(contributed).__name__}, expected a list of {base.__name__} subclasses")
                continue
            for cls in contributed:
                if not (isinstance(cls, type) and issubclass(cls, base)) or not isinstance(getattr(cls, "name", None), str):
                    self._mark_broken(plugin, f"kdbench_{kind}() returned {cls!r}, which is not a named {base.__name__} subclass")
                    continue
                if not cls.name or not cls.name.isprintable() or cls.name != cls.name.strip():
                    # a suite names it, a report prints it: an invisible character would make
                    # two names look alike, a control character would drive the terminal
                    self._mark_broken(plugin, f"kdbench_{kind}() returned a {base.__name__} named {printable(repr(cls.name))[:100]}: "
                                              "a name must be printable text without spaces at its ends")
                    continue
                if cls.name in RESERVED.get(kind, {}):
                    self._mark_broken(plugin, str(ReservedNameError(
                        f"{kind[:-1]} name '{cls.name}' is reserved ({RESERVED[kind][cls.name]}); rename the {kind[:-1]}")))
                    continue
                previous = self.entries[kind].get(cls.name)
                if previous is not None and previous.cls is not cls:
                    self._mark_broken(plugin, f"{kind[:-1]} '{cls.name}' is already provided by plugin '{previous.plugin}'")
                    continue
                self.entries[kind][cls.name] = Entry(cls.name, kind, cls, plugin)

    def _mark_broken(self, plugin: str, why: str) -> None:
        self.broken[plugin] = why
        warnings.warn(f"kdbench plugin '{plugin}' is broken: {why}", stacklevel=2)

    # -- look-ups ------------------------------------------------------------------------
    def names(self, kind: str, pattern: str = "*") -> list[str]:
        return sorted(n for n in self.entries[kind] if fnmatch.fnmatch(n, pattern))

    def get(self, kind: str, name: str) -> type:
        entry = self.entries[kind].get(name)
        if entry is None:
            raise UnknownNameError(self.unknown_message(kind, name))
        return entry.cls

    def unknown_message(self, kind: str, name: str) -> str:
        singular = "family" if kind == "families" else kind[:-1]
        msg = f"unknown {singular} '{name}'.{did_you_mean(name, self.entries[kind])}"
        msg += f" Known {kind}: {', '.join(self.names(kind)) or '(none)'}."
        if self.broken:
            msg += " Plugins that failed to load: " + "; ".join(f"{p} ({w})" for p, w in self.broken.items())
        return msg

    def recipe_dirs(self) -> list[Path]:
        """The recipe folders the plugins ship (``kdbench_recipe_dirs``), built-ins first."""
        impls = sorted(self.pm.hook.kdbench_recipe_dirs.get_hookimpls(), key=lambda i: not i.plugin_name.startswith("builtin-"))
        dirs: list[Path] = []
        for impl in impls:
            try:
                contributed = impl.function()
            except Exception as exc:  # a plugin's bug must not take the others down
                self._mark_broken(impl.plugin_name, f"kdbench_recipe_dirs() raised {type(exc).__name__}: {exc}")
                continue
            for d in contributed or []:
                path = Path(d)
                if path not in dirs:
                    dirs.append(path)
        return dirs

    def method(self, name: str) -> type[Method]:
        return self.get("methods", name)

    def task(self, name: str) -> type[Task]:
        return self.get("tasks", name)

    def model(self, name: str) -> type[ModelFactory]:
        return self.get("models", name)

    def objective(self, name: str) -> type[Objective]:
        return self.get("objectives", name)

    def objective_for(self, task: Task) -> Objective:
        """The objective ``task`` names, built for it; :class:`UnknownNameError` (with
        "did you mean") naming the task when no plugin provides it."""
        name = task.objective
        if name not in self.entries["objectives"]:
            raise UnknownNameError(f"task '{task.name}' names its objective '{name}', but: {self.unknown_message('objectives', name)}")
        return self.objective(name)(task)

    def executor(self, name: str) -> type[Executor]:
        return self.get("executors", name)

    def tracker(self, name: str) -> type[Tracker]:
        return self.get("trackers", name)

    def family(self, name: str) -> type[EncoderFamily]:
        return self.get("families", name)

    def listing(self, kind: str, pattern: str = "*") -> list[Entry]:
        return [self.entries[kind][n] for n in self.names(kind, pattern)]

    @property
    def hook(self) -> Any:
        return self.pm.hook


def inner_method_class(name: str, registry: Registry, wrapper: str) -> type[Method]:
    """The loss-based method (:meth:`~kdbench.api.Method.is_loss_based`) named ``name`` that
    the strategy ``wrapper`` (e.g. MetaDistil, which meta-updates the teacher through the
    wrapped loss) wraps, from ``registry``; ValueError naming the usable ones for anything else."""
    try:
        cls = registry.method(name)
    except UnknownNameError:
        usable = [n for n in registry.names("methods") if registry.method(n).is_loss_based()]
        raise ValueError(f"unknown inner method '{name}'.{did_you_mean(name, usable)} Loss-based methods: {', '.join(usable) or '(none)'}") from None
    if not cls.uses_teacher:
        raise ValueError(f"inner method '{name}' does not use a teacher, so the teacher would get no meta-gradient")
    if not cls.is_loss_based():
        raise ValueError(f"inner method '{name}' updates the teacher or runs its own training step; "
                         f"{wrapper} needs a loss-based method (one that only implements loss())")
    return cls


def make_plugin_manager(extra_plugins: Iterable[Any] = ()) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A manager with the specs added and every ``kdbench`` entry point registered.

    Entry points are loaded one by one so that a plugin that fails to import is named
    (with the entry point and the error) instead of aborting discovery."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    broken: dict[str, str] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            broken[ep.name] = f"entry point '{ep.name} = {ep.value}' failed to load: {type(exc).__name__}: {exc}"
            print(f"warning: kdbench plugin {broken[ep.name]}", file=sys.stderr)
    for plugin in extra_plugins:
        if isinstance(plugin, str):
            plugin = importlib.import_module(plugin)
        if not pm.is_registered(plugin):  # already found through its entry point
            pm.register(plugin)
    return pm, broken


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry (built on first use)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            pm, broken = make_plugin_manager()
            _REGISTRY = Registry(pm, broken)
    return _REGISTRY


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests use it to add plugins)."""
    global _REGISTRY
    _REGISTRY = registry


def call_lifecycle(registry: Registry, hook_name: str, **kwargs: Any) -> None:
    """Call a lifecycle hook on every plugin, turning a plugin's exception into a warning
    that names it: a tracker's bug must never fail a training run."""
    caller = getattr(registry.hook, hook_name)
    for impl in caller.get_hookimpls():
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception as exc:
            warnings.warn(f"kdbench plugin '{impl.plugin_name}' raised in {hook_name}: {type(exc).__name__}: {exc}", stacklevel=2)
