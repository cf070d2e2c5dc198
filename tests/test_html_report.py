"""The self-contained HTML report: its numbers against the raw rows, nothing fetched from
outside, plots embedded; and end to end in headless Chromium (DOM and screenshot)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from kdbench.report import build_report, write_outputs
from support.report_fixtures import build_store, check_rows, expected

CHROMIUM = "/usr/bin/chromium"


class Tables(HTMLParser):
    """Tables by id as lists of {header: text}; every <img> and its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id", f"t{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table_id: str) -> list[dict[str, str]]:
        head, *body = self.tables[table_id]
        return [dict(zip(head, r)) for r in body]


@pytest.fixture(scope="module")
def html_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("html")
    suite, store = build_store(folder / "store.sqlite")
    report = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="synthetic html")
    (path,) = write_outputs(report, ["html"], folder)
    return store, path


def test_html_numbers_match_the_raw_rows(html_report):
    store, path = html_report
    text = path.read_text()
    doc = Tables()
    doc.feed(text)
    exp = expected(store.runs())
    checked = check_rows(doc.rows("table-statistics"), doc.rows("leaderboard"), exp)
    assert checked > 100
    # sensitivity spread shown = spread of the per-level means recomputed from the rows
    done = [r for r in store.runs() if r["status"] == "done"]
    temps = [np.mean([r["metrics"]["test"]["accuracy"] * 100 for r in done
                      if r["method"] == "kd" and r["student"] == "tiny-1L" and r["params"] == {"alpha": 0.5, "temperature": t}])
             for t in (1.0, 2.0, 4.0)]
    sens = {(r["method"], r["factor"]): r for r in doc.rows("table-sensitivity")}
    assert float(sens[("kd", "temperature")]["std"]) == pytest.approx(np.std(temps, ddof=1), abs=0.005)
    # significant cells are coloured
    assert text.count('class="win"') >= 2 and text.count('class="loss"') >= 2


def test_html_is_self_contained_with_plots_config_and_environment(html_report):
    _, path = html_report
    text = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", text)  # nothing fetched
    assert "<script" not in text
    doc = Tables()
    doc.feed(text)
    names = {img["id"] for img in doc.images}
    assert names == {"plot-sensitivity-movie-sentiment", "plot-pareto-movie-sentiment"}
    for img in doc.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "name: report-synthetic" in text and "baseline: none" in text  # the suite's configuration
    env = {r["field"]: r["value"] for r in doc.rows("table-environment")}
    assert env["device_name"] == "CPU x2" and env["torch"] == "2.x-test"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: install Debian's chromium package "
                    "(apt-get install -y chromium) to run the browser test")
def test_html_in_headless_chromium(html_report, tmp_path):
    _, path = html_report
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    doc = Tables()
    doc.feed(dom.stdout)
    board = doc.rows("leaderboard")
    assert len(board) == 9 and any(r["method"] == "none [tiny-1L]" for r in board)  # 8 method rows and the chance row (no teacher in this store)
    assert [r["movie-sentiment (accuracy)"] for r in board if r["method"] == "chance"] == ["51.20 (chance)"]
    assert len(doc.images) == 2
    shot = tmp_path / "shot.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,3000", "--hide-scrollbars", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))[..., :3]  # floats in [0, 1]
    ink = (pixels < 0.6).any(axis=-1)  # text, rules and plot lines
    assert ink.mean() > 0.01, "the screenshot is (nearly) blank"
    rows_with_ink = ink.any(axis=1)
    assert rows_with_ink[:1000].mean() > 0.2  # the top (legend + leaderboard) is drawn
    colour = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.05  # tinted: significance cells, plot lines
    assert colour[:1000].mean() > 0.001  # the green/red leaderboard cells
    assert colour[1000:].mean() > 0.001  # the coloured plot lines further down
    shutil.copy(shot, path.with_suffix(".png"))  # kept beside the report for a person to look at


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: run `make browser` (Debian's chromium)")
def test_html_page_fits_a_1400_px_window(html_report, tmp_path):
    """Laid out by Chromium at 1,400 px: the page is no wider than the window, while its
    widest table is (it scrolls inside its own box). A probe script added to a copy of the
    page writes the measured widths into the DOM (the report itself has no script)."""
    _, path = html_report
    probe = ("<script>window.onload=function(){var w=0;document.querySelectorAll('table').forEach(function(t){"
             "w=Math.max(w,t.scrollWidth)});var p=document.createElement('p');p.id='probe';p.textContent="
             "document.documentElement.scrollWidth+' '+w;document.body.appendChild(p)}</script>")
    page = tmp_path / "probe.html"
    page.write_text(path.read_text().replace("</body>", probe + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<p id="probe">(\d+) (\d+)</p>', dom.stdout)
    assert found, dom.stdout[-500:]
    page_width, widest_table = int(found.group(1)), int(found.group(2))
    assert page_width <= 1400 < widest_table
