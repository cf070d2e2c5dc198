"""Regenerate every committed report from its store, in the formats each folder holds.

    python benchmarks/regenerate_reports.py            # or: make reports
    python benchmarks/regenerate_reports.py --dry-run  # the folders, formats and commands, nothing written

For each suite file under ``benchmarks/`` whose results folder holds a store
(``store.sqlite``) and at least one report file, this runs
``kdbench report SUITE --format F ...`` with exactly the formats the folder already has
(``leaderboard.md`` -> md with its plots, ``leaderboard.csv`` -> csv and its side files,
``leaderboard.json`` or ``report.json`` -> json, ``leaderboard.tex`` -> latex,
``report.html`` -> html, ``summary.md`` -> summary, which also refreshes the summary
block of the folder's README.md). Nothing is trained and no store is written: a report
only reads its store. Side files the new report no longer writes (a CSV side table that
is now empty, a figure that is gone) are removed, so a folder never mixes two versions.
Then README.md's leaderboard excerpt (:data:`EXCERPT`) is copied again from the
regenerated ``leaderboard.md``.

It refuses to run on a dirty tree (exit 2): the regenerated files are meant to be
committed as made by one clean commit of the code, and ``git diff`` must show only what
the new code changed. At the end it compares every number of each ``leaderboard.csv``
and ``leaderboard.cost.csv`` with the committed version (rows matched by task, split,
student, method name and parameters, so a renamed row still matches) and lists any that
moved: regenerating must change presentation only. Exit 0 when every report was written
and no number moved, 1 when a number moved (inspect it before committing), 2 on refusal
or a failed report.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: report file in a results folder -> the ``--format`` that writes it
FORMAT_FILES = {"leaderboard.md": "md", "leaderboard.csv": "csv", "leaderboard.json": "json", "report.json": "json",
                "leaderboard.tex": "latex", "report.html": "html", "summary.md": "summary"}
#: files a format writes besides its default one, removed when the new report does not write them again
SIDE_FILES = {"csv": "leaderboard.*.csv", "md": "plots/*.png"}
#: README.md's leaderboard excerpt: (results folder, rows shown, the first characters of its code block)
EXCERPT = ("vision-cpu", ("teacher", "chance", "kd", "metadistil", "none"), "| method")
#: leaderboard.csv and leaderboard.cost.csv columns that identify a row (the rest that parse as numbers are compared)
KEYS = ("task", "split", "student", "method_name", "params")
RTOL = 1e-9
#: columns renamed by the report code (committed name -> current name), compared under the new name
RENAMED = {"paused": "off_cpu"}


def git(*args: str, root: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def dirty(root: Path = ROOT) -> list[str]:
    """Tracked changes and untracked files not ignored, as ``git status --porcelain`` lists them."""
    return [line for line in git("status", "--porcelain", "--untracked-files=normal", root=root).splitlines() if line.strip()]


def suites() -> list[tuple[Path, Path, list[str]]]:
    """(suite file, results folder, formats) for every suite with a committed store and report.
    The folder is read from the YAML (``results``, else ``results/<name>``) without building
    the suite, so suites that need assets or the network are never loaded."""
    out: dict[Path, tuple[Path, Path, list[str]]] = {}
    for path in sorted((ROOT / "benchmarks").rglob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or "methods" not in raw:
            continue  # recipes and other YAML that are not suites
        folder = ROOT / (raw.get("results") or Path("results") / raw["name"])
        formats = list(dict.fromkeys(fmt for name, fmt in FORMAT_FILES.items() if (folder / name).exists()))
        if not (folder / "store.sqlite").exists() or not formats:
            continue
        if folder in out:
            raise SystemExit(f"error: {path.relative_to(ROOT)} and {out[folder][0].relative_to(ROOT)} both write "
                             f"{folder.relative_to(ROOT)}: which one made its report?")
        out[folder] = (path, folder, formats)
    return sorted(out.values(), key=lambda t: t[1])


def kdbench_command() -> list[str]:
    here = Path(sys.executable).parent / "kdbench"
    return [str(here)] if here.exists() else [shutil.which("kdbench") or "kdbench"]


def regenerate(suite: Path, folder: Path, formats: list[str]) -> list[Path]:
    """Write the folder's reports again; return the files written; remove stale side files."""
    cmd = [*kdbench_command(), "report", str(suite.relative_to(ROOT))] + [a for f in formats for a in ("--format", f)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    written = {(ROOT / line[len("wrote "):].strip()).resolve() for line in proc.stderr.splitlines() if line.startswith("wrote ")}
    for fmt, pattern in SIDE_FILES.items():
        if fmt in formats:
            for stale in folder.glob(pattern):
                if stale.resolve() not in written:
                    stale.unlink()
                    print(f"  removed {stale.relative_to(ROOT)} (the new report does not write it)")
    return sorted(written)


def refresh_excerpt(readme: Path = ROOT / "README.md") -> bool:
    """Copy README.md's leaderboard excerpt again from its folder's leaderboard.md (the
    header and the rows named in :data:`EXCERPT`, as the file has them). True if changed."""
    folder, rows, first = EXCERPT
    board = (ROOT / "results" / folder / "leaderboard.md").read_text(encoding="utf-8")
    table = board.split("## Leaderboard", 1)[1].split("\n\n", 2)[1].splitlines()
    keep = [table[0]] + [line for line in table[2:] if line.split("|")[1].strip() in rows]
    text = readme.read_text(encoding="utf-8")
    block = re.search(r"^```\n(" + re.escape(first) + r".*?)^```$", text, re.M | re.S)
    if block is None:
        raise RuntimeError(f"README.md has no plain code block starting with {first!r}")
    new = text[:block.start(1)] + "\n".join(keep) + "\n" + text[block.end(1):]
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def moved_numbers(path: Path) -> list[str]:
    """Every number of ``path`` (a leaderboard or cost CSV) that differs from the committed
    version, rows matched by :data:`KEYS` (the cost table by its leaderboard row's method)."""
    import pandas as pd

    rel = path.relative_to(ROOT).as_posix()
    try:
        old = pd.read_csv(io.StringIO(git("show", f"HEAD:{rel}")), dtype=str, keep_default_na=False)
    except subprocess.CalledProcessError:
        return []  # a new file: nothing to compare
    new = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "method_name" not in new:  # the cost table: name its rows like the leaderboard's
        new, old = (_with_identity(t, path.with_name("leaderboard.csv"), ref) for t, ref in ((new, None), (old, rel.replace(".cost", ""))))
    return moved(old, new, rel)


def moved(old, new, name: str) -> list[str]:
    """The numbers of table ``new`` that differ from ``old`` (both read as text), rows matched
    by the :data:`KEYS` both have; a column or row only one of them has is not compared."""
    old = old.rename(columns=RENAMED)
    keys = [k for k in KEYS if k in new and k in old]
    if old.duplicated(keys).any() or new.duplicated(keys).any():  # rows told apart by their name only
        keys.append("method")
    old_rows = {tuple(r[k] for k in keys): r for r in old.to_dict("records")}
    out = []
    for r in new.to_dict("records"):
        o = old_rows.get(tuple(r[k] for k in keys))
        if o is None:
            continue
        for col, value in r.items():
            if col in keys or col not in o:
                continue
            a, b = _number(value), _number(o[col])
            if a is None or b is None or (math.isnan(a) and math.isnan(b)):
                continue
            if not math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12):
                out.append(f"{name}: {dict(zip(keys, (r[k] for k in keys)))} {col}: {b!r} -> {a!r}")
    return out


def _with_identity(table, leaderboard: Path, committed: str | None):
    """The cost table with each row's method name and parameters, read from the leaderboard
    (the committed one for the committed table: row names may have changed)."""
    import pandas as pd

    board = pd.read_csv(io.StringIO(git("show", f"HEAD:{committed}")) if committed else leaderboard, dtype=str, keep_default_na=False)
    ident = board.drop_duplicates(["task", "method", "student"]).set_index(["task", "method", "student"])[["method_name", "params"]]
    return table.join(ident, on=["task", "method", "student"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the folders, formats and commands; write nothing")
    args = parser.parse_args(argv)
    found = suites()
    for suite, folder, formats in found:
        print(f"{folder.relative_to(ROOT)}: kdbench report {suite.relative_to(ROOT)} " + " ".join(f"--format {f}" for f in formats))
    if args.dry_run:
        return 0
    if dirty():
        print("error: the working tree is not clean (commit or stash first; the reports must come from one clean "
              "commit):\n  " + "\n  ".join(dirty()[:20]), file=sys.stderr)
        return 2
    commit = git("rev-parse", "--short", "HEAD").strip()
    print(f"regenerating {len(found)} folders from commit {commit}")
    moved: list[str] = []
    for suite, folder, formats in found:
        try:
            written = regenerate(suite, folder, formats)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"  {folder.relative_to(ROOT)}: {len(written)} files")
        for name in ("leaderboard.csv", "leaderboard.cost.csv"):
            if (folder / name).exists():
                moved += moved_numbers(folder / name)
    if refresh_excerpt():
        print(f"  README.md: the {EXCERPT[0]} excerpt copied again from its leaderboard.md")
    print(git("status", "--short").rstrip() or "nothing changed")
    if moved:
        print(f"\n{len(moved)} numbers moved against the committed reports (regenerating should change presentation only):")
        print("\n".join(f"  {m}" for m in moved[:200]))
        return 1
    print(f"\nno number moved in any leaderboard.csv or leaderboard.cost.csv; commit the folders above (made from {commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
