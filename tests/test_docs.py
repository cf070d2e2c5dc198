"""The documentation cannot rot: every command shown as runnable in README.md and docs/
runs here, the suite file reference matches the schema, and the README keeps its shape.

Runnable, by convention (docs/development.md): a fenced block tagged ``console`` holds
commands on lines starting with ``$ `` (what follows until the next ``$`` line is example
output and is not compared); ``# exit N`` after a command says the exit code it must
return (default 0). A fenced block whose info string has ``file=PATH`` (e.g.
```` ```yaml file=my-suite.yaml ````) is written to PATH before the commands after it run.
Blocks tagged ``bash`` are shown, not run (``make demo`` and the like). All pages run in
one temporary working folder holding a copy of ``benchmarks/``, links to the committed
``results/`` folders and the smoke suite's finished store, README.md first. ``kdbench``
commands and ``python -m kdbench.<module>`` run in this process (no interpreter start-up:
seconds, not minutes)."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from kdbench import cli
from kdbench.registry import set_registry

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")


def blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block, in order."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def steps(text: str) -> list[tuple[str, str, int | str]]:
    """What a page asks to run, in order: ("file", path, body) and ("run", command, exit code)."""
    out: list = []
    for info, body in blocks(text):
        file = re.search(r"\bfile=(\S+)", info)
        if file:
            out.append(("file", file.group(1), body))
        elif info.split()[:1] == ["console"]:
            for line in body.splitlines():
                if line.startswith("$ "):
                    cmd = line[2:].strip()
                    code = EXIT.search(cmd)
                    out.append(("run", EXIT.sub("", cmd).strip(), int(code.group(1)) if code else 0))
    return out


def run_here(capsys, command: str) -> tuple[int, str]:
    """One documented command in this process: ``kdbench ...`` or ``python -m kdbench.X ...``."""
    argv = shlex.split(command)
    capsys.readouterr()
    set_registry(None)
    try:
        if argv[0] == "kdbench":
            code = cli.main(argv[1:])
        elif argv[:2] == ["python", "-m"] and argv[2].startswith("kdbench."):
            code = importlib.import_module(argv[2]).main(argv[3:])
        else:
            raise AssertionError(f"not a command the doc-test can run: {command!r} (show it in a `bash` block instead)")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        set_registry(None)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "benchmarks", work / "benchmarks", ignore=shutil.ignore_patterns("*.py", "*.sh", "__pycache__"))
    for folder in (ROOT / "results").iterdir():  # the committed stores, read where the pages say they are
        if (folder / "store.sqlite").exists():
            (work / "results").mkdir(exist_ok=True)
            (work / "results" / folder.name).symlink_to(folder, target_is_directory=True)
    # The smoke suite's store, which several pages read, is made here once, so that a page
    # passes on its own (pytest-xdist may give the pages to different workers)
    cwd = Path.cwd()
    try:
        os.chdir(work)
        set_registry(None)
        assert cli.main(["run", "benchmarks/smoke.yaml", "--no-report"]) == 0
    finally:
        os.chdir(cwd)
        set_registry(None)
    return work


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_runnable_command_of_the_page_runs(page, workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    for kind, what, arg in steps(page.read_text(encoding="utf-8")):
        if kind == "file":
            target = workdir / what
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(arg, encoding="utf-8")
            continue
        code, output = run_here(capsys, what)
        assert code == arg, f"{page.name}: `{what}` exited {code}, the page says {arg}:\n{output[-3000:]}"


def test_the_readme_and_the_docs_show_runnable_commands():
    shown = {str(p.relative_to(ROOT)): sum(1 for s in steps(p.read_text(encoding="utf-8")) if s[0] == "run") for p in PAGES}
    assert shown["README.md"] >= 5, shown  # the quick start's commands, at least
    for name in ("extending", "reports", "development", "fault-tolerance", "performance", "suite-file"):
        assert f"docs/{name}.md" in shown, f"docs/{name}.md is missing"
    for name in ("extending", "reports", "development"):
        assert shown[f"docs/{name}.md"] >= 1, f"docs/{name}.md runs no command"


def test_the_suite_file_reference_is_generated_from_the_schema_now():
    from kdbench.suite_reference import PAGE, render, stale_notes

    assert not stale_notes(), f"kdbench/suite_reference.py NOTES name fields the schema no longer has: {stale_notes()}"
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/suite-file.md is stale: run `python -m kdbench.suite_reference --write` and commit it")


def test_the_reference_lists_every_field_with_its_default():
    from kdbench.spec import Budget, MethodEntry, SuiteSpec
    from kdbench.suite_reference import render

    page = render()
    for model in (SuiteSpec, Budget, MethodEntry):
        for name in model.model_fields:
            assert f"| `{name}` |" in page, (model.__name__, name)
    assert "| `batch_size` | int | `32` | > 0 |" in page  # Budget.batch_size's type, default and bound


def test_the_readme_is_short_and_holds_no_commit_or_dated_measurement():
    text = README.read_text(encoding="utf-8")
    assert 150 <= len(text.splitlines()) <= 250
    dates = re.findall(r"(?<![\w/-])20\d\d-\d\d-\d\d\b", text)  # a results/ folder named by its date is a path
    assert not dates, "dated measurements belong in results/<folder>/README.md"
    # a commit: 7-40 hex digits with a digit and a letter, outside a results/ path
    commits = [w for w in re.findall(r"(?<![\w/.-])[0-9a-f]{7,40}(?![\w/-])", text)
               if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert not commits, commits
    assert "<!-- methods:begin -->" in text and "<!-- methods:end -->" in text


def _shown_table(text: str, first: str) -> list[str]:
    """The lines of the README's plain code block that starts with ``first``."""
    body = next(b for info, b in blocks(text) if info == "" and b.lstrip().startswith(first))
    return [line.strip() for line in body.splitlines() if line.strip()]


def test_the_readme_tables_are_the_ones_the_committed_files_hold():
    """The demo's leaderboard and the vision-cpu excerpt are copied from the files they
    came from, line for line, so they cannot be edited into numbers nobody measured."""
    text = README.read_text(encoding="utf-8")
    demo = (ROOT / "results" / "demo-cpu-2026-12-07" / "make_demo_0aeb8c5.txt").read_text(encoding="utf-8")
    demo_lines = {line.strip() for line in demo.splitlines()}
    for line in _shown_table(text, "method      movie-sentiment"):
        assert line in demo_lines, line
    board = (ROOT / "results" / "vision-cpu" / "leaderboard.md").read_text(encoding="utf-8")
    board_lines = {line.strip() for line in board.splitlines()}
    for line in _shown_table(text, "| method     | mnist5k"):
        assert line in board_lines, line


def test_every_results_folder_is_indexed_and_says_how_it_was_made():
    index = (ROOT / "results" / "README.md").read_text(encoding="utf-8")
    for folder in sorted(p for p in (ROOT / "results").iterdir() if p.is_dir()):
        if not (ROOT / "results" / folder.name / "README.md").exists():
            continue  # e.g. a gitignored demo folder
        assert f"`{folder.name}/`" in index, f"results/README.md does not index {folder.name}/"


def test_make_demo_leaves_the_working_tree_clean():
    """The demo's results folder (the quickstart suite's) is gitignored."""
    from kdbench.spec import load_suite

    folder = load_suite(ROOT / "benchmarks" / "quickstart.yaml").results_dir()
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    probe = subprocess.run(["git", "check-ignore", "-q", str(folder / "store.sqlite")], cwd=ROOT)
    assert probe.returncode == 0, f"{folder}/ is not gitignored: `make demo` would leave it untracked"
