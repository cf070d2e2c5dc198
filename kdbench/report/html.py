"""One self-contained HTML file per report: every table, the plots embedded as base64
PNG, how the numbers were computed, the suite's configuration and the environment.
Nothing is fetched when it is opened (no scripts, no external styles or images)."""

from __future__ import annotations

import base64
import html
from typing import Any

import pandas as pd

from kdbench.loader import printable
from kdbench.report.frame import LOSS, WIN
from kdbench.report.integrity import store_lines
from kdbench.report.sections import CURVES, figures_for, legend, sections
from kdbench.report.text import config_yaml

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1b1b1b;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}
div.wide{max-width:100%;overflow-x:auto}
p.note{overflow-wrap:anywhere}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right;white-space:nowrap}
th{background:#f0f3f7}td:first-child,th:first-child{text-align:left}
td.win{background:#dff3e0}td.loss{background:#f8dddd}
.legend li{margin:.15rem 0;font-size:.85rem}pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.8rem}
img.plot{max-width:100%;border:1px solid #eee;margin:.5rem 0}
"""


SLUGS = {"Teacher drift": "drift", CURVES: "curves"}  # titles whose first word another section's title shares


def _table(df: pd.DataFrame, table_id: str, classes: dict[tuple[int, str], str] | None = None, raw: set[str] | None = None) -> str:
    """An HTML table; ``raw`` columns hold trusted markup (the <b> of the best cell)."""
    if df is None or df.empty:
        return "<p><em>(no rows)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for i, row in enumerate(df.itertuples(index=False)):
        cells = []
        for col, v in zip(df.columns, row):
            cls = (classes or {}).get((i, col))
            text = str(v) if col in (raw or set()) else html.escape(str(v))
            cells.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    # a wide table scrolls inside its own box: the page keeps the window's width
    return f'<div class="wide"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _leaderboard(report: Any) -> str:
    wide = report.wide(marks=True, bold="html")
    # the cells are escaped here, so <b> can be kept as markup
    wide = wide.map(lambda v: html.escape(str(v)).replace("&lt;b&gt;", "<b>").replace("&lt;/b&gt;", "</b>"))
    classes = {(i, c): ("win" if str(v).endswith(WIN) else "loss") for i, row in wide.iterrows() for c, v in row.items()
               if str(v).endswith(WIN) or str(v).endswith(LOSS)}
    return _table(wide, "leaderboard", classes, raw=set(wide.columns))


def _figures(title: str, pngs: dict[str, bytes]) -> list[str]:
    out = []
    for name in figures_for(title, pngs):
        b64 = base64.b64encode(pngs[name]).decode("ascii")
        out.append(f"<figure><img class='plot' id='plot-{html.escape(name)}' alt='{html.escape(name)}' "
                   f"src='data:image/png;base64,{b64}'><figcaption>{html.escape(name)}</figcaption></figure>")
    return out


def render_html(report: Any, pngs: dict[str, bytes] | None = None) -> str:
    """The whole report as one self-contained HTML page."""
    pngs = pngs or {}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(report.title)}</h1>"]
    if report.subset:
        parts.append(f"<p>Subset: {html.escape(report.subset)}</p>")
    # the legend follows the leaderboard (it is long: above it, it pushed the table out of the first screen)
    notes = ["<h2 id='section-legend'>How to read this report</h2>",
             "<ul class='legend'>" + "".join(f"<li>{html.escape(x)}</li>" for x in legend(report)) + "</ul>"]
    parts_of = sections(report)  # builds every table: once
    if "Leaderboard" not in [t for t, _, _ in parts_of]:
        parts += notes
    for title, table, note in parts_of:
        slug = SLUGS.get(title, title.lower().split()[0])
        parts.append(f"<h2 id='section-{slug}'>{html.escape(title)}</h2>")
        if title == "Leaderboard":
            parts.append(_leaderboard(report))
        else:
            classes = {}
            if table is not None and "result" in table.columns:
                classes = {(i, "result"): r.split()[0] for i, r in enumerate(table["result"]) if r.startswith(("win", "loss"))}
            parts.append(_table(table, f"table-{slug}", classes))
        if note:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        parts += _figures(title, pngs)
        if title == "Leaderboard":
            parts += notes
    parts += [f"<p class='store-note'>{html.escape(line)}.</p>" for line in store_lines(getattr(report, "integrity", None))]
    cfg = config_yaml(report)
    if cfg:
        parts.append("<h2 id='section-configuration'>Suite configuration</h2>")
        parts.append(f"<pre id='config'>{html.escape(cfg)}</pre>")
    parts.append("</body></html>")
    return printable("\n".join(parts))  # labels from a store: never raw controls or bidi overrides in the page
