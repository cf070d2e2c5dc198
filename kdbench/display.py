"""What a person reads while a suite runs: one short line per run and one progress bar.

A run's full spec (every option, defaults filled in) is in the results store and in
``kdbench show``; the terminal names a run by what tells it apart from its neighbours:
its method entry's ``label`` where the suite gives one, else the method's name and the
parameters whose values differ from the method's defaults. The suite-level bar counts
runs done and failed and estimates the time left from the runs finished so far.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic_core import PydanticUndefined

#: a run line's parameter list is cut here (the full spec is one ``kdbench show`` away)
MAX_PARAMS_CHARS = 120


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def non_default_params(params: dict[str, Any], params_cls: type | None) -> dict[str, Any]:
    """``params`` without the values equal to ``params_cls``'s field defaults (all of them
    when the class is unknown). Fields without a default (required) are always kept."""
    fields = getattr(params_cls, "model_fields", None) or {}
    out = {}
    for key, value in params.items():
        info = fields.get(key)
        default = PydanticUndefined if info is None else info.get_default(call_default_factory=True)
        if default is PydanticUndefined or not _same(value, _dumped(default)):
            out[key] = value
    return out


def _dumped(value: Any) -> Any:
    """A default as run specs hold it (JSON-mode dump of a pydantic model or enum)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return getattr(value, "value", value)


def short_params(params: dict[str, Any], limit: int = MAX_PARAMS_CHARS) -> str:
    """``k=v, ...`` in key order, cut to ``limit`` characters with an ellipsis."""
    text = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def method_title(method: str, params: dict[str, Any], params_cls: type | None = None, label: str | None = None,
                 swept: dict[str, Any] | None = None) -> str:
    """A run's method as the terminal shows it: ``label`` (with the values of ``swept``,
    the parameters its entry sweeps, when it sweeps any), else ``method(non-default
    params)``, or the bare name when every parameter is at its default."""
    if label:
        return f"{label}({short_params(swept)})" if swept else label
    shown = non_default_params(params, params_cls)
    return f"{method}({short_params(shown)})" if shown else method


def run_line(spec: Any, title: str) -> str:
    """``<title> | <task> | <student> | seed N (hash)``: one run, as the executors print it."""
    return f"{title} | {spec.task.name} | {spec.student_label} | seed {spec.seed} ({spec.hash})"


class PrintableStream:
    """A text stream (``sys.stdout``, ``sys.stderr``) that writes everything through
    :func:`kdbench.loader.printable`: a name, label, path or message from a plugin, a store
    or a file name printed by any command (``kdbench list`` included) can then neither
    drive the terminal (escape codes) nor hide or reorder text (bidirectional overrides,
    zero-width characters); newlines and tabs pass. Everything else is the wrapped
    stream's (``fileno``, ``isatty``, ``flush``). Progress bars, which draw with ``\r``
    and cursor codes of their own, write to :func:`terminal_stream` instead."""

    def __init__(self, stream: Any):
        self.underlying = stream

    def write(self, text: str) -> int:
        from kdbench.loader import printable

        self.underlying.write(printable(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.underlying, name)


def terminal_stream() -> Any:
    """stderr as the terminal gets it, under any :class:`PrintableStream` (for progress bars)."""
    stream = sys.stderr
    while isinstance(stream, PrintableStream):
        stream = stream.underlying
    return stream


def say(line: str) -> None:
    """Print a line to stderr above any progress bar (tqdm redraws the bar below it)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


class SuiteProgress:
    """The one progress bar of a suite: runs finished of ``total``, how many failed (or
    diverged, or were blocked), and tqdm's estimate of the time left from the pace of the
    runs finished so far. Silent when ``enabled`` is false (not a terminal, or tests)."""

    def __init__(self, total: int, name: str, enabled: bool | None, file: Any = None):
        from tqdm.auto import tqdm

        self.done = self.failed = 0
        file = file or terminal_stream()
        disable = (not file.isatty()) if enabled is None else not enabled
        self.bar = tqdm(total=total, desc=f"suite {name}", unit="run", position=0, disable=disable, dynamic_ncols=True,
                        file=file)
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"done {self.done}, failed {self.failed}", refresh=False)

    def finished(self, status: str) -> None:
        """One run over: ``status`` "done" counts as done, anything else as failed."""
        if status == "done":
            self.done += 1
        else:
            self.failed += 1
        self._postfix()
        self.bar.update(1)

    def skipped(self) -> None:
        """A run this process did not train (another process holds or finished it)."""
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_titles(suite: Any, registry: Any = None) -> dict[str, str]:
    """Every run of ``suite`` (a :class:`kdbench.spec.Suite`) by hash -> its method as the
    terminal shows it (:func:`method_title`). A run takes the first labelled method entry
    that produces it (as the report's rows do), else the first entry, in suite order."""
    from kdbench.registry import get_registry
    from kdbench.spec import entry_settings

    registry = registry or get_registry()
    entries = list(suite.spec.methods)
    settings = [[json.dumps(s, sort_keys=True) for s in entry_settings(suite.spec, i, registry)] for i in range(len(entries))]
    swept = [sorted(k for k in set().union(*map(json.loads, keys)) if len({json.dumps(json.loads(s).get(k), sort_keys=True)
                                                                          for s in keys}) > 1) if keys else []
             for keys in settings]
    out = {}
    for run in suite.runs:
        key = json.dumps(run.params, sort_keys=True)
        matches = [i for i, e in enumerate(entries) if e.name == run.method and key in settings[i]
                   and (not e.students or run.student_label in e.students)]
        at = next((i for i in matches if entries[i].label), matches[0] if matches else None)
        entry = entries[at] if at is not None else None
        cls = registry.method(run.method).Params
        out[run.hash] = method_title(run.method, run.params, cls, entry.label if entry else None,
                                     {k: run.params.get(k) for k in swept[at]} if entry and entry.label else None)
    return out
