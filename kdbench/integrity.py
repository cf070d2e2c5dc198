"""Checks made before a suite runs, and the suite's size and cost estimate.

``kdbench run`` calls :func:`preflight` after the suite validates and before anything is
trained: the results folder must be writable and free of symlinks leading outside it,
rows stored under the previous hash scheme are adopted, store rows that fail their
checksum are set to be trained again, and a finished run (or teacher) whose recorded data
fingerprint differs from the data now on disk is refused (exit code 2), because its
hash, which leaves data *locations* out, would otherwise mix results from two data sets.
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdbench.api import KDBenchError
from kdbench.spec import RunSpec, Suite
from kdbench.store import FINISHED, ResultsStore

#: How many entries of a results folder the symlink check looks at (a results folder has a
#: few per run); beyond it the check stops rather than walk a huge tree.
MAX_WALK = 200_000


class DataChangedError(KDBenchError):
    """Finished runs were trained on other data than the task reads now."""


def inside(root: Path, path: Path) -> Path:
    """``path`` resolved, if it stays inside ``root`` (symlinks followed); else a
    :class:`KDBenchError`. Call it on every path written below the results folder."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if real != real_root and real_root not in real.parents:
        raise KDBenchError(f"{path} resolves to {real}, outside the results folder {real_root} (a symlink?); "
                           "kdbench writes only inside the results folder: remove the link")
    return real


def check_results_folder(results: Path) -> None:
    """The folder can be created and written, and no symlink inside it leads outside it."""
    results = Path(results)
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / f".kdbench-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise KDBenchError(f"results folder {results}: {exc.strerror or exc} (errno {exc.errno}); "
                           "give a writable folder with a shorter path (--results)") from None
    seen = 0
    for dirpath, dirnames, filenames in os.walk(results, followlinks=False):
        for name in dirnames + filenames:
            seen += 1
            entry = Path(dirpath) / name
            if entry.is_symlink():
                inside(results, entry)
        if seen > MAX_WALK:
            break


def _fingerprint_problems(what: str, recorded: Any, current: dict[str, dict[str, Any]]) -> list[str]:
    if not isinstance(recorded, dict):
        return []
    out = []
    for split, fp in sorted(recorded.items()):
        now = current.get(split)
        if isinstance(fp, dict) and now is not None and (fp.get("sha256"), fp.get("n")) != (now["sha256"], now["n"]):
            out.append(f"{what}, split '{split}': trained on {fp.get('n')} examples with fingerprint "
                       f"{str(fp.get('sha256'))[:12]}, the data now has {now['n']} with {now['sha256'][:12]}")
    return out


@dataclass
class Preflight:
    adopted: int = 0
    corrupt: int = 0
    changed: list[str] | None = None


def preflight(suite: Suite, store: ResultsStore, specs: list[RunSpec], *, rerun: bool,
              load_data: Callable[[RunSpec], Any] | None = None) -> Preflight:
    """Checks before training (see the module docstring). Raises :class:`DataChangedError`
    (without ``rerun``) when finished runs were trained on other data; with ``rerun`` the
    teachers trained on other data are set to be trained again."""
    out = Preflight()
    out.adopted = store.adopt_legacy(specs)
    corrupt = store.corrupt_runs([s.hash for s in specs])
    if corrupt:
        out.corrupt = store.retrain_corrupt([r["hash"] for r in corrupt])
        _say(f"warning: {store.path}: {len(corrupt)} finished run row(s) failed their checksum (changed since written): "
             f"{', '.join(r['hash'] for r in corrupt[:10])}; they are trained again")
    if load_data is None:
        from kdbench.data import load_task_data
        from kdbench.registry import get_registry

        def load_data(spec: RunSpec) -> Any:
            return load_task_data(get_registry(), spec.task, spec.quiz_fraction, spec.data_seed)

    rows = {r["hash"]: r for r in store.runs([s.hash for s in specs])}
    problems: list[str] = []
    stale_teachers: dict[str, str] = {}
    checked: dict[str, Any] = {}
    for spec in specs:
        row = rows.get(spec.hash)
        teacher = store.teacher(spec.teacher_hash) if spec.teacher_hash else None
        recorded_run = ((row or {}).get("env") or {}).get("data") if row and row["status"] in FINISHED else None
        recorded_teacher = ((teacher or {}).get("env") or {}).get("data") if teacher and teacher["status"] == "done" else None
        if recorded_run is None and recorded_teacher is None:
            continue
        key = spec.task.model_dump_json() + f"|{spec.quiz_fraction}|{spec.data_seed}"
        if key not in checked:
            try:
                checked[key] = getattr(load_data(spec), "fingerprints", None) or {}
            except KDBenchError:  # missing or malformed data: its runs fail naming the culprit
                checked[key] = {}
        current = checked[key]
        problems += _fingerprint_problems(f"run {spec.hash} ({spec.task.name}, {spec.method}, seed {spec.seed})", recorded_run, current)
        teacher_problems = _fingerprint_problems(f"teacher {spec.teacher_hash} ({spec.task.name})", recorded_teacher, current)
        if teacher_problems and spec.teacher_hash not in stale_teachers:
            stale_teachers[spec.teacher_hash] = teacher_problems[0]  # type: ignore[index]
            problems += teacher_problems
    out.changed = problems
    if problems and not rerun:
        shown = "\n".join(f"  - {p}" for p in problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataChangedError(
            f"the data changed since these finished runs were trained (their hashes leave data locations out, so "
            f"the store would mix results from two data sets):\n{shown}\n"
            "Point the suite back at the data they used, or run again with --rerun to retrain every selected run "
            "(and its teacher) on the new data, or use another --results folder.")
    for th, why in stale_teachers.items():
        store.invalidate_teacher(th, f"trained on other data ({why}); trained again (--rerun)")
    return out


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- estimate


def run_steps(spec: RunSpec) -> int | None:
    """Optimizer steps of a run when its budget is in steps (epochs need the data's size)."""
    return spec.budget.steps


def estimate(suite: Suite, store: ResultsStore | None) -> list[str]:
    """Lines for ``kdbench validate``: total student steps, teacher steps, and, where the
    store holds finished runs of the same methods, the cost they suggest."""
    lines = []
    steps = [run_steps(s) for s in suite.runs]
    known = [n for n in steps if n is not None]
    epochs = [s.budget.epochs for s in suite.runs if s.budget.epochs is not None]
    total = f"{sum(known):,} student steps" if known else ""
    if epochs:
        total += (" + " if total else "") + f"{sum(epochs):g} student epochs (steps depend on the train split's size)"
    flops = [s.budget.flops for s in suite.runs if s.budget.flops is not None]
    if flops:
        total += (" + " if total else "") + f"{sum(flops):.3g} student-run FLOPs (steps follow from each method's counted passes)"
    teachers = {s.teacher_hash: s.teacher for s in suite.runs if s.teacher_hash and s.teacher and s.teacher.train}
    t_steps = sum(t.train.budget.steps or 0 for t in teachers.values() if t and t.train)
    lines.append(f"estimate: {len(suite.runs)} runs, {total or '0 steps'}"
                 + (f"; {len(teachers)} teacher fine-tuning(s), {t_steps:,} steps" if teachers else ""))
    if store is None:
        return lines
    per_step: dict[str, list[float]] = {}
    for row in store.runs():
        cost, spec = row.get("cost") or {}, row.get("spec") or {}
        n = ((spec.get("budget") or {}).get("steps")) if isinstance(spec, dict) else None
        seconds = cost.get("train_s") or cost.get("wall_s")
        if row["status"] == "done" and n and isinstance(seconds, (int, float)) and seconds > 0:
            per_step.setdefault(row["method"], []).append(seconds / n)
    priced, unpriced, seconds = 0, set(), 0.0
    for spec, n in zip(suite.runs, steps):
        rates = per_step.get(spec.method)
        if rates and n:
            seconds += statistics.median(rates) * n
            priced += 1
        else:
            unpriced.add(spec.method)
    if priced:
        lines.append(f"estimate from earlier runs in {store.path}: ~{_duration(seconds)} of training for {priced} of "
                     f"{len(suite.runs)} runs (median seconds per step of each method on that machine)"
                     + (f"; no earlier runs of: {', '.join(sorted(unpriced))}" if unpriced else ""))
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
