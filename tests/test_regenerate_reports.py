"""benchmarks/regenerate_reports.py (``make reports``): which folders and formats it
regenerates, that it refuses a dirty tree, that it tells a moved number from a renamed
row, and that README's excerpt is copied from the committed leaderboard as the doc-test
wants it. Nothing here writes a report: the full run is the lead's, from a clean commit."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from test_docs import _shown_table

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("regenerate_reports", ROOT / "benchmarks" / "regenerate_reports.py")
regen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(regen)


def test_every_committed_report_is_regenerated_in_the_formats_its_folder_holds():
    found = {folder: (suite, formats) for suite, folder, formats in regen.suites()}
    with_reports = {p.parent for p in (ROOT / "results").glob("*/store.sqlite")
                    if any((p.parent / name).exists() for name in regen.FORMAT_FILES)}
    assert set(found) == with_reports
    assert {p.parent for p in (ROOT / "results").glob("*/summary.md")} <= set(found)  # every summary is regenerated
    suite, formats = found[ROOT / "results" / "vision-cpu"]
    assert suite == ROOT / "benchmarks" / "vision-cpu.yaml"
    assert formats == ["md", "csv", "json", "html", "summary"]  # no leaderboard.tex there: no latex


def test_a_dirty_tree_is_refused(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert regen.dirty(tmp_path) == []
    (tmp_path / "stray.txt").write_text("x")
    assert regen.dirty(tmp_path) == ["?? stray.txt"]


def test_a_moved_number_is_listed_and_a_renamed_row_is_not():
    cols = ["task", "split", "student", "method", "method_name", "params", "mean", "paused", "result"]
    old = pd.DataFrame([["t", "test", "s", "metadistil-budget-cpu-1000", "metadistil", "{}", "91.45714285714287", "2", "n.s."],
                        ["t", "test", "s", "kd", "kd", "{}", "91.5", "0", "baseline"]], columns=cols, dtype=str)
    new = old.rename(columns={"paused": "off_cpu"}).copy()
    new.loc[0, "method"] = "metadistil-from-step-0"  # a label now names the row: the same runs
    new.loc[0, "mean"] = "91.45714285714288"  # the last float digit: not a move
    assert regen.moved(old, new, "x.csv") == []
    new.loc[1, "mean"] = "91.6"
    new.loc[0, "off_cpu"] = "3"  # compared under the column's new name
    moved = regen.moved(old, new, "x.csv")
    assert len(moved) == 2
    assert "'method_name': 'kd'" in moved[1] and "mean: 91.5 -> 91.6" in moved[1]
    assert "off_cpu: 2.0 -> 3.0" in moved[0]


def test_the_readme_excerpt_is_copied_from_the_leaderboard_as_the_doc_test_reads_it(tmp_path):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = _shown_table(text, "| method     | mnist5k")
    stale = text.replace(shown[-1], "| none | 1.00 ± 0.00 (n=8) |")
    readme.write_text(stale, encoding="utf-8")
    assert regen.refresh_excerpt(readme) is True
    lines = _shown_table(readme.read_text(encoding="utf-8"), "| method     | mnist5k")
    board = {line.strip() for line in (ROOT / "results" / "vision-cpu" / "leaderboard.md").read_text(encoding="utf-8").splitlines()}
    assert all(line in board for line in lines)
    assert [line.split("|")[1].strip() for line in lines] == ["method", "teacher", "chance", "kd", "metadistil", "none"]
    assert regen.refresh_excerpt(readme) is False  # copied again: unchanged


@pytest.mark.parametrize("args", [["--dry-run"]])
def test_dry_run_lists_the_commands_and_writes_nothing(args, capsys):
    assert regen.main(args) == 0
    out = capsys.readouterr().out
    assert "results/vision-cpu: kdbench report benchmarks/vision-cpu.yaml --format md --format csv" in out
