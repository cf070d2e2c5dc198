"""Re-train one stored run of a suite and print, at every evaluation, the student's and
the live teacher's scores on validation AND test.

The report's teacher-drift section shows the live teacher on validation only (selection
never looks at test). When a teacher-updating method's comparison with the baseline flips
between validation and test (the report's disagreement note), this probe says whether the
live teacher itself moved differently on the two splits: it re-trains the run (same spec,
seed and stored teacher checkpoint, so the student's numbers are the stored run's) with
the teacher evaluated on both splits. Nothing is written into the suite's results folder
(the re-trained run lives in a temporary folder); the stored run's history is printed
beside it as a check.

    python benchmarks/teacher_probe.py benchmarks/regression-pairs-gap-cpu.yaml --method metadistil --seed 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kdbench.data import TEST, VALIDATION
from kdbench.executors.phases import open_store
from kdbench.spec import load_suite
from kdbench.train import Runner
from kdbench.train.evaluation import TEACHER
from kdbench.train.teachers import ready_teacher


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite")
    ap.add_argument("--method", required=True, help="the run's method label as stored (e.g. metadistil)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--task", help="the run's task, when the suite has several")
    ap.add_argument("--results", help="the suite's results folder (default: the suite's)")
    ap.add_argument("--json", help="write the history (stored and probed) to this file")
    args = ap.parse_args(argv)

    suite = load_suite(args.suite)
    results = suite.results_dir(args.results)
    specs = [s for s in suite.runs if s.method == args.method and s.seed == args.seed and (args.task is None or s.task.name == args.task)]
    if len(specs) != 1:
        ap.error(f"{len(specs)} runs of the suite match --method {args.method} --seed {args.seed}"
                 f"{' --task ' + args.task if args.task else ''}; exactly one must")
    (spec,) = specs
    if not (results / "store.sqlite").is_file():
        ap.error(f"{results} holds no results store: run the suite first (or pass --results)")
    store = open_store(results)
    stored = store.get(spec.hash)
    checkpoint = ready_teacher(store, results, spec.teacher_hash) if spec.teacher_hash else None
    if spec.teacher_hash and checkpoint is None:
        ap.error(f"teacher {spec.teacher_hash} is not ready in {results}: run the suite first")

    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(tmp, device=suite.spec.device, progress=False, drift_splits=(VALIDATION, TEST))
        result = runner.run(spec, checkpoint)
    if result.status != "done":
        print(f"the probed run ended {result.status}: {result.error}", file=sys.stderr)
        return 1
    main_metric = result.metrics["main_metric"]
    old = {h["step"]: h for h in (stored or {}).get("history") or []}
    print(f"{spec.method} | {spec.task.name} | seed {spec.seed} ({spec.hash}); x100, main metric {main_metric}")
    print("step  student val  student test  (stored val/test)   teacher val  teacher test  divergence val/test")
    for h in result.history:
        t = h.get(TEACHER) or {}
        s = old.get(h["step"], {})
        stored_pair = (f"{100 * s[VALIDATION][main_metric]:.2f}/{100 * s[TEST][main_metric]:.2f}" if s else "n/a")
        teacher = (f"{100 * t['validation'][main_metric]:11.2f}  {100 * t['test'][main_metric]:12.2f}  "
                   f"{t['divergence']:.4f}/{t['test_divergence']:.4f}" if t else "")
        print(f"{h['step']:4d}  {100 * h[VALIDATION][main_metric]:11.2f}  {100 * h[TEST][main_metric]:12.2f}  {stored_pair:>17}   {teacher}")
    if result.history and TEACHER in result.history[0]:
        t0 = result.history[0][TEACHER]
        print(f"starting teacher: validation {100 * t0['start_validation'][main_metric]:.2f}, test {100 * t0['start_test'][main_metric]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec.hash, "probed": result.history, "stored": list(old.values())}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
