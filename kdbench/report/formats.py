"""Report formats: one writer per format. Every format, the built-ins included, reaches
kdbench through the ``kdbench_report_formats`` hook (returning :class:`ReportFormat`
objects): this module registers the built-ins by the entry point
``builtin-report-formats``, exactly as a plugin registers its own, and
``kdbench report --format`` accepts every name contributed. A name is taken by the first
plugin that contributes it, the built-ins first."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from kdbench.api import KDBenchError
from kdbench.hookspecs import hookimpl

# The renderers are imported by the writers that use them: this module is loaded with the
# plugin registry (it registers the built-in formats), which must stay cheap to build.

Writer = Callable[[Any, Path, dict[str, bytes]], list[Path]]


@dataclass(frozen=True)
class ReportFormat:
    """``write(report, path, plots)`` writes ``report`` (a :class:`kdbench.report.Report`)
    to ``path`` (the default file under the results folder, or ``--output``) and returns
    every file it wrote; ``plots`` maps figure names to PNG bytes (empty unless
    ``uses_plots``)."""

    name: str
    description: str
    default_file: str
    write: Writer
    uses_plots: bool = False


def _write_md(report: Any, out: Path, pngs: dict[str, bytes]) -> list[Path]:
    from kdbench.report.text import render_report

    written, links = [], {}
    for name, data in pngs.items():
        p = out.parent / "plots" / f"{name}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        written.append(p)
        links[name] = f"plots/{name}.png"
    out.write_text(render_report(report, "md", links), encoding="utf-8")
    return written + [out]


def _write_latex(report: Any, out: Path, pngs: dict[str, bytes]) -> list[Path]:
    from kdbench.report.text import render_report

    out.write_text(render_report(report, "latex"), encoding="utf-8")
    return [out]


def _write_csv(report: Any, out: Path, pngs: dict[str, bytes]) -> list[Path]:
    """The per (task, split, method, student) statistics at full precision, and side files
    for cost, teacher cost, sensitivity, references, teacher drift, validation/test
    disagreements and learning curves (per step, and whether each has flattened)."""
    report.board.to_csv(out, index=False)
    written = []
    for name, df in (("cost", report.cost), ("teacher_cost", report.teacher_cost), ("sensitivity", report.sens_levels),
                     ("sensitivity_tests", report.sens_scores), ("references", report.references), ("teacher_drift", report.drift),
                     ("disagreements", report.disagreements), ("curves", report.curves), ("curves_flatness", report.flatness),
                     ("sensitivity_interactions", report.interactions),
                     ("store_integrity", report.integrity.table() if getattr(report, "integrity", None) else pd.DataFrame())):
        if not df.empty:
            side = out.with_name(f"{out.stem}.{name}.csv")
            df.to_csv(side, index=False)
            written.append(side)
    return written + [out]


def _write_json(report: Any, out: Path, pngs: dict[str, bytes]) -> list[Path]:
    """The leaderboard rows (as before) and report.json with everything."""
    from kdbench.report.text import render, report_json

    out.write_text(render(report.wide(marks=False), "json"), encoding="utf-8")
    full = out.with_name("report.json")
    full.write_text(json.dumps(report_json(report), indent=2, default=str), encoding="utf-8")
    return [full, out]


def _write_summary(report: Any, out: Path, pngs: dict[str, bytes]) -> list[Path]:
    from kdbench.report.summary import write_summary

    staged = out.parent.name.startswith(STAGING.split("{")[0])  # the README to refresh is the results folder's
    return write_summary(report, out, pngs, readme_from=out.parent.parent if staged else out.parent)


def _write_html(report: Any, out: Path, pngs: dict[str, bytes]) -> list[Path]:
    from kdbench.report.html import render_html

    out.write_text(render_html(report, pngs), encoding="utf-8")
    return [out]


BUILTIN = {f.name: f for f in (
    ReportFormat("md", "every table in Markdown, figures under plots/", "leaderboard.md", _write_md, uses_plots=True),
    ReportFormat("csv", "the statistics at full precision, side files for cost, sweeps, references", "leaderboard.csv", _write_csv),
    ReportFormat("json", "the leaderboard rows; report.json holds everything", "leaderboard.json", _write_json),
    ReportFormat("latex", "booktabs tables", "leaderboard.tex", _write_latex),
    ReportFormat("html", "one self-contained page with the figures", "report.html", _write_html, uses_plots=True),
    ReportFormat("summary", "plain sentences with the numbers, intervals and power (no date: regenerates byte for byte); "
                 "refreshes the summary block of the folder's README.md", "summary.md", _write_summary),
)}


#: The plugin name of this module's registration (its entry point's name).
BUILTIN_PLUGIN = "builtin-report-formats"


@hookimpl
def kdbench_report_formats() -> list[ReportFormat]:
    """The built-in formats (``--format all`` writes these)."""
    return list(BUILTIN.values())


def _contributed(registry: Any) -> dict[str, ReportFormat]:
    out: dict[str, ReportFormat] = {}
    impls = registry.pm.hook.kdbench_report_formats.get_hookimpls()
    for impl in sorted(impls, key=lambda i: i.plugin_name != BUILTIN_PLUGIN):  # built-ins keep their names
        try:
            formats = impl.function()
        except Exception as exc:  # one broken plugin must not hide the other formats
            warnings.warn(f"plugin {impl.plugin_name}: kdbench_report_formats() raised {type(exc).__name__}: {exc}", stacklevel=2)
            continue
        for f in formats or []:
            if not isinstance(f, ReportFormat) or f.name in out or f.name == "all":
                warnings.warn(f"plugin {impl.plugin_name}: report format {getattr(f, 'name', f)!r} ignored "
                              "(not a ReportFormat, or its name is taken)", stacklevel=2)
                continue
            out[f.name] = f
    return out


def report_formats(registry: Any = None) -> dict[str, ReportFormat]:
    """Every report format the registry's plugins contribute, the built-ins first."""
    if registry is None:
        from kdbench.registry import get_registry

        registry = get_registry()
    return _contributed(registry)


def write_outputs(report: Any, formats: list[str], results_dir: Path, output: str | None = None, plots: bool = True,
                  registry: Any = None) -> list[Path]:
    """Write the report in each format under ``results_dir`` (or ``output`` when one
    format is asked for). Returns the files written."""
    known = report_formats(registry)
    unknown = [f for f in formats if f not in known]
    if unknown:
        raise KDBenchError(f"unknown report format {unknown[0]!r}; known: {', '.join(known)}")
    pngs: dict[str, bytes] = {}
    if plots and any(known[f].uses_plots for f in formats):
        from kdbench.report.plots import report_plots

        pngs = report_plots(report)
    written: list[Path] = []
    for name in formats:
        fmt = known[name]
        target = Path(output) if output and len(formats) == 1 else Path(results_dir) / fmt.default_file
        target.parent.mkdir(parents=True, exist_ok=True)
        written += write_atomically(lambda out: fmt.write(report, out, pngs if fmt.uses_plots else {}), target)
    return written


#: The folder a report format writes into first (beside its target), per process.
STAGING = ".kdbench-report.{pid}.tmp"


def write_atomically(write: Callable[[Path], list[Path]], target: Path) -> list[Path]:
    """Run ``write(path)`` on a path in a private staging folder beside ``target``, then
    move every file it wrote into place with one rename each: a report killed while
    writing leaves the previous good ``leaderboard.md`` (and side files) in place, never an
    empty or half-written one. Staging folders of dead processes are removed first."""
    import os
    import shutil

    from kdbench.train.artefacts import process_alive

    folder = target.parent
    for stale in folder.glob(STAGING.format(pid="*")):
        pid = stale.name.split(".")[2]
        if stale.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = folder / STAGING.format(pid=os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        paths = write(staging / target.name)
        placed = []
        for path in paths:
            try:
                rel = Path(path).relative_to(staging)
            except ValueError:  # a plugin's writer put a file elsewhere on purpose
                placed.append(Path(path))
                continue
            final = (folder / rel) if rel != Path(target.name) else target
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, final)
            placed.append(final)
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)
