"""Validation vs test at every evaluation step, per method, from a results store.

Every evaluation in a run's history holds the student's validation and test metrics. This
prints, per task, method and step, the mean validation and test main metric (x100) over
the finished runs (seeds), their gap (validation - test), and each method's mean paired
difference from ``--baseline`` on both splits (per seed in brackets). A validation split
that is closer to the training data than test is (sentences shared with training pairs)
shows as a gap; a method whose gap is larger than the baseline's gains on validation
something it does not keep on test. Reads the store only (no report is written).

    python benchmarks/val_test_gap.py results/regression-pairs-gap-cpu --baseline kd
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kdbench.executors.phases import open_store
from kdbench.report.frame import evaluations

SPLITS = ("validation", "test")


def table(results: Path, baseline: str) -> list[str]:
    """Markdown lines, one table per task."""
    if not (Path(results) / "store.sqlite").is_file():
        raise SystemExit(f"{results} holds no results store")
    rows = [r for r in open_store(results).runs() if r["status"] == "done"]
    scores: dict[tuple[str, str, int], dict[int, tuple[float, float]]] = {}  # (task, method, step) -> seed -> (val, test)
    info = {r["hash"]: r for r in rows}
    for h, step, entry in evaluations(rows):
        r = info[h]
        metric = r["metrics"]["main_metric"]
        try:
            pair = tuple(100 * float(entry[s][metric]) for s in SPLITS)
        except (KeyError, TypeError):
            continue
        scores.setdefault((r["task"], r["method"], step), {})[r["seed"]] = pair  # type: ignore[assignment]
    out: list[str] = []
    for task in sorted({k[0] for k in scores}):
        methods = sorted({k[1] for k in scores if k[0] == task})
        if baseline not in methods:
            raise SystemExit(f"{task}: no finished '{baseline}' runs to compare with (methods: {', '.join(methods)})")
        others = [m for m in methods if m != baseline]
        out += [f"### {task} (x100; gap = validation - test; diff = paired difference from {baseline}, per seed in brackets)", "",
                "| step | " + " | ".join(f"{m} val / test (gap)" for m in methods) + " | "
                + " | ".join(f"{m} - {baseline}: val; test" for m in others) + " |",
                "|---" * (1 + len(methods) + len(others)) + "|"]
        for step in sorted({k[2] for k in scores if k[0] == task}):
            cells = []
            for m in methods:
                x = np.array(list(scores.get((task, m, step), {}).values()))
                cells.append(f"{x[:, 0].mean():.2f} / {x[:, 1].mean():.2f} ({(x[:, 0] - x[:, 1]).mean():+.2f}, n={len(x)})" if len(x) else "-")
            for m in others:
                a, b = scores.get((task, m, step), {}), scores.get((task, baseline, step), {})
                seeds = sorted(set(a) & set(b))
                if not seeds:
                    cells.append("-")
                    continue
                d = np.array([[a[s][i] - b[s][i] for i in (0, 1)] for s in seeds])
                cells.append("; ".join(f"{d[:, i].mean():+.2f} ({', '.join(f'{v:+.1f}' for v in d[:, i])})" for i in (0, 1)))
            out.append(f"| {step} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="a results folder (holding store.sqlite)")
    ap.add_argument("--baseline", required=True, help="the method label to compare with (e.g. kd)")
    args = ap.parse_args(argv)
    print("\n".join(table(args.results, args.baseline)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
