"""Text renderers: one table in terminal, Markdown, CSV, JSON or LaTeX, and the whole
report as terminal, Markdown or LaTeX text."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import yaml
from tabulate import tabulate

from kdbench.loader import printable
from kdbench.report.frame import LOSS, WIN
from kdbench.report.integrity import store_lines
from kdbench.report.sections import CURVES, family_line, figures_for, legend, sections


def render(table: pd.DataFrame, fmt: str = "terminal", title: str | None = None) -> str:
    """One table in one format (terminal, md, csv, json, latex)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return json.dumps(table.to_dict(orient="records"), indent=2, default=float)
    if fmt == "latex":
        return latex_table(table, title)
    if fmt == "md":
        table = md_safe(table)
    body = tabulate(table, headers="keys", tablefmt="github" if fmt == "md" else "simple", showindex=False, disable_numparse=True)
    return (f"## {title}\n\n" if fmt == "md" and title else (f"{title}\n" if title else "")) + body + "\n"


def _md_cell(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return value.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def md_safe(table: pd.DataFrame) -> pd.DataFrame:
    """A copy whose cells and headers cannot break a Markdown pipe table: ``|`` and ``\\``
    are escaped and line breaks become spaces (labels and parameters come from suites)."""
    out = table.map(_md_cell) if hasattr(table, "map") else table.applymap(_md_cell)
    out.columns = [_md_cell(str(c)) for c in table.columns]
    return out


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", WIN: r"$\blacktriangle$",
                  LOSS: r"$\blacktriangledown$", "Δ": r"$\Delta$", "×": r"$\times$", "†": r"$\dagger$", "‡": r"$\ddagger$", "≈": r"$\approx$", "↓": r"$\downarrow$"}


def latex_escape(text: str) -> str:
    """Escape for LaTeX; the best-cell markers of ``wide_table(bold='latex')`` become \\textbf."""
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))
    return out.replace("\x01", "\\textbf{").replace("\x02", "}")


def latex_table(table: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs table (needs \\usepackage{booktabs} and amssymb for the win/loss marks)."""
    if table.empty:
        return f"% {caption}: empty\n"
    cols = list(table.columns)
    lines = ["\\begin{table}[t]", "\\centering", "\\small"]
    if caption:
        lines.append(f"\\caption{{{latex_escape(caption)}}}")
    lines += [f"\\begin{{tabular}}{{l{'r' * (len(cols) - 1)}}}", "\\toprule", " & ".join(latex_escape(str(c)) for c in cols) + " \\\\",
              "\\midrule"]
    for row in table.itertuples(index=False):
        lines.append(" & ".join(latex_escape(str(v)) for v in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(lines)


def plot_links_for(title: str, plot_links: dict[str, str] | None) -> list[str]:
    links = plot_links or {}
    return [f"![{name}]({links[name]})\n" for name in figures_for(title, links)]


def _file_report(report: Any, fmt: str, plot_links: dict[str, str] | None) -> list[str]:
    if fmt == "md":
        parts = [f"# {report.title}\n"] + ([f"Subset: {report.subset}\n"] if report.subset else [])
        parts.append("\n".join(f"- {line}" for line in legend(report)) + "\n")
    else:
        parts = [f"% {report.title}\n% Requires \\usepackage{{booktabs,amssymb}}.\n% " + "\n% ".join(legend(report)) + "\n"]
    for title, table, note in sections(report):
        if title == "Leaderboard":
            table = report.wide(marks=True, bold=fmt)
        if fmt == "latex" and title in ("Environment", "Runs that did not finish"):
            continue
        parts.append(render(table, fmt, title))
        if note:
            parts.append(note + "\n" if fmt == "md" else "% " + note + "\n")
        parts += plot_links_for(title, plot_links) if fmt == "md" else []
    return parts


def render_report(report: Any, fmt: str, plot_links: dict[str, str] | None = None, verbose: bool = False) -> str:
    """The whole report as text: terminal, md or latex. ``plot_links`` (md): name -> path.
    The terminal ends with the leaderboard (its marks explained in one line); the legend
    is printed only when ``verbose``."""
    if fmt in ("md", "latex"):
        parts = _file_report(report, fmt, plot_links)
        parts += [f"({line})\n" if fmt == "md" else f"% {line}\n" for line in store_lines(getattr(report, "integrity", None))]
        return printable("\n".join(parts))  # labels from a store: never raw controls or bidi overrides in a file
    parts = [report.title + (f"  [subset: {report.subset}]" if report.subset else "") + "\n"]
    if verbose:
        parts.append("\n".join(legend(report)) + "\n")
    board = None
    for title, table, note in sections(report):
        if title == "Leaderboard":
            board = (title, note)
            continue
        if title in ("Environment", "Every setting searched (validation and test)") and not verbose:
            continue  # long tables: in the files, and in the terminal with --verbose
        if title == CURVES and not verbose:  # the verdicts; the score at every step is in the files and under --verbose
            table = table[[c for c in table.columns if not c.startswith("step ")]]
            note = "Scores at every step: in the report files and with --verbose. " + note
        parts.append(f"\n{title}\n" + render(table, "terminal") + (f"{note}\n" if note else ""))
    parts += [f"({line})\n" for line in store_lines(getattr(report, "integrity", None))]
    title, note = board or ("Leaderboard", family_line(report))
    parts.append(f"\n{title}\n" + render(report.wide(marks=True), "terminal") + note + "\n")
    return "\n".join(parts)


def report_json(report: Any) -> dict[str, Any]:
    """Everything, numeric, for programs."""
    def rec(df: pd.DataFrame) -> list[dict[str, Any]]:
        return json.loads(df.drop(columns=[c for c in ("_metrics", "splits") if c in df.columns]).to_json(orient="records"))

    return {"title": report.title, "date": report.date, "baseline": report.baseline, "subset": report.subset,
            "correction": report.correction, "family": report.family, "legend": legend(report),
            "leaderboard": rec(report.board), "references": rec(report.references), "sensitivity_levels": rec(report.sens_levels),
            "sensitivity_scores": rec(report.sens_scores), "cost": rec(report.cost), "cost_reference": report.cost_reference,
            "teacher_cost": rec(report.teacher_cost), "commits": rec(report.commits), "data": rec(report.data),
            "outside_runs": rec(report.outside), "chance": report.chance, "runs": rec(report.runs),
            "teacher_drift": rec(report.drift), "validation_test_disagreements": rec(report.disagreements),
            "teacher_updating_methods": list(report.updating), "learning_curves": rec(report.curves),
            "learning_curve_flatness": rec(report.flatness),
            "environment": report.env, "config": report.config, **_selection_json(report, rec),
            "store_integrity": report.integrity.as_dict() if getattr(report, "integrity", None) else None,
            "store_notes": store_lines(getattr(report, "integrity", None))}


def _selection_json(report: Any, rec: Any) -> dict[str, Any]:
    """The grid selection on validation (method entries with ``grid_selection``), when any."""
    sel = getattr(report, "selection", None)
    if sel is None or sel.chosen.empty:
        return {}
    return {"selected_on_validation": rec(sel.chosen), "settings_searched": rec(sel.settings)}


def config_yaml(report: Any) -> str:
    return yaml.safe_dump(report.config, sort_keys=False) if report.config else ""
