"""Every hook kdbench calls, grouped by phase. Plugins implement them with ``@hookimpl``.

A plugin is any module or object registered under the ``kdbench`` entry-point group;
built-ins are registered the same way (see ``pyproject.toml``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from kdbench.api import Method, ModelFactory, Objective, Task
    from kdbench.encoders import EncoderFamily
    from kdbench.protocols import Executor, Tracker

# ``RunSpec`` (kdbench.spec) is named, not imported: spec imports the registry, which
# imports this module, and an import here (even for type checking) would close a loop.
RunSpec = Any

PROJECT = "kdbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# --------------------------------------------------------------------- contributions


@hookspec
def kdbench_methods() -> list[type[Method]]:
    """Return the distillation method classes this plugin provides.

    Each is a :class:`kdbench.api.Method` subclass with a unique ``name``."""


@hookspec
def kdbench_tasks() -> list[type[Task]]:
    """Return the task classes (:class:`kdbench.api.Task` subclasses) this plugin provides."""


@hookspec
def kdbench_models() -> list[type[ModelFactory]]:
    """Return the model factory classes (:class:`kdbench.api.ModelFactory`) this plugin provides."""


@hookspec
def kdbench_objectives() -> list[type[Objective]]:
    """Return the objective classes (:class:`kdbench.api.Objective` subclasses, each with a
    unique ``name``) this plugin provides. A task names its objective
    (:attr:`kdbench.api.Task.objective`); the built-in ``classification`` and
    ``regression`` objectives are registered through this hook too."""


@hookspec
def kdbench_families() -> list[type[EncoderFamily]]:
    """Return the Hugging Face encoder families (:class:`kdbench.encoders.EncoderFamily`
    subclasses, each with a unique ``name``) this plugin provides: the ``hf`` model factory
    builds any of them (``family: NAME``, or a pretrained checkpoint of one of its
    ``model_types``). See docs/model-families.md."""


@hookspec
def kdbench_executors() -> list[type[Executor]]:
    """Return the executor classes (:class:`kdbench.protocols.Executor` subclasses, each
    with a unique ``name``) this plugin provides; ``kdbench run --executor NAME`` picks one.
    The built-in ``local`` and ``ray`` executors are registered through this hook too."""


@hookspec
def kdbench_trackers() -> list[type[Tracker]]:
    """Return the tracker classes (:class:`kdbench.protocols.Tracker` subclasses, each
    with a unique ``name``) this plugin provides. A suite enables them by name
    (``trackers: [tensorboard]``); the runner creates one instance per run."""


@hookspec
def kdbench_recipe_dirs() -> list[str]:
    """Return the folders of recipe files (``<name>.yaml``, see :mod:`kdbench.recipes`) this
    plugin ships. A recipe name resolves in the suite's own ``recipes/`` folder first, then
    in these folders, the built-in plugins' first; the first file found wins."""


# --------------------------------------------------------------------- run lifecycle
# Called in the process that trains the run. Implementations must not raise: an
# exception is reported as a warning naming the plugin, and the run goes on.


@hookspec
def kdbench_run_start(spec: RunSpec, run_dir: str, trackers: list[str]) -> None:
    """A run is about to train. ``run_dir`` is a folder inside the results folder that
    this run may write to. ``trackers`` are the tracker names the suite enabled (trackers
    themselves are contributed through ``kdbench_trackers``)."""


@hookspec
def kdbench_train_log(spec: RunSpec, step: int, values: dict[str, float]) -> None:
    """Training scalars (loss and its parts, learning rate) at a logging step."""


@hookspec
def kdbench_eval_result(spec: RunSpec, step: int, split: str, metrics: dict[str, float]) -> None:
    """Metrics of one evaluation of the student on ``split`` after ``step`` steps."""


@hookspec
def kdbench_run_end(spec: RunSpec, status: str, record: dict[str, Any]) -> None:
    """A run finished with ``status`` (done, failed or diverged); ``record`` is the row
    written to the results store (metrics, cost, environment, error)."""


# --------------------------------------------------------------------- report formats


@hookspec
def kdbench_report_formats() -> list[Any]:
    """Return the report formats this plugin provides: :class:`kdbench.report.ReportFormat`
    objects (a name, a description, a default file name and ``write(report, path, plots)``
    returning the files written). ``kdbench report --format NAME`` then accepts them."""
