"""``tsv``: a report format written outside kdbench, the template for adding one.

One :class:`kdbench.report.ReportFormat` (a name, a description, a default file name and
a writer), returned by the ``kdbench_report_formats`` hook; the entry point in
``pyproject.toml`` makes ``kdbench report --format tsv`` accept it.
"""

from __future__ import annotations

from pathlib import Path

from kdbench.hookspecs import hookimpl
from kdbench.report import Report, ReportFormat


def write_tsv(report: Report, path: Path, plots: dict[str, bytes]) -> list[Path]:
    """The leaderboard, one tab-separated row per method, and the family line last."""
    wide = report.wide(marks=True)
    lines = ["\t".join(wide.columns)] + ["\t".join(str(v) for v in row) for row in wide.itertuples(index=False)]
    lines.append(f"# {report.family} comparisons, {report.correction} correction, baseline {report.baseline}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [path]


@hookimpl
def kdbench_report_formats():
    return [ReportFormat("tsv", "the leaderboard as tab-separated values (example plugin)", "leaderboard.tsv", write_tsv)]
