"""The bare KD step under glibc's default allocator against kdbench's setting
(:func:`kdbench.train.keep_freed_memory`), paired step by step across two processes.

The allocator setting is process-wide and cannot be undone, so the two variants live in
two worker processes, each holding its own copy of ``step_cost.py``'s bare KD loop on the
reference setup (MiniLM-L6 teacher, 3-layer student, batch 16, length 64); the main
process has them take one step each in turn (one computes while the other waits; which
goes first alternates), so the two halves of a pair are timed seconds apart and the
machine's drift cancels in their ratio, as in ``step_cost.py``. Reports the median of the
per-step ratios (kept over default) per round, the median over rounds with its [min, max],
and each variant's median step. Asserts nothing.

    python benchmarks/allocator_step.py [--rounds 3] [--steps 12] [--tiny] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys

import numpy as np

SKIP = 2  # each worker's first steps (optimizer state, caches) stay out of the pairs


def _worker(conn, keep: bool, tiny: bool, threads: int) -> None:
    import torch

    import step_cost as sc
    from kdbench.train import keep_freed_memory
    from kdbench.train.cost import freed_memory_kept

    torch.set_num_threads(threads)
    if keep:
        keep_freed_memory()
    registry = sc.bench_registry()  # no Runner here: its constructor would set the allocator in the default variant too
    bare = sc.BareKD(registry, torch.device("cpu"), sc.reference_kd_spec(registry, tiny), 10**6)
    conn.send(("ready", freed_memory_kept()))
    while conn.recv():
        conn.send(bare.step())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="step pairs per round (after the first rounds' warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random BERTs (seconds; checks the script runs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for name, keep in (("default", False), ("kept", True)):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(theirs, keep, args.tiny, args.threads), daemon=True)
        proc.start()
        pipes[name], procs = mine, procs + [proc]
    try:
        for name, conn in pipes.items():  # each worker says whether its allocator keeps freed blocks
            if conn.recv() != ("ready", name == "kept"):
                raise SystemExit(f"the {name} worker's allocator setting is not what it should be")

        def step(name: str) -> float:
            pipes[name].send(True)
            return pipes[name].recv()

        for _ in range(SKIP):
            step("default"), step("kept")
        ratios, times = [], {"default": [], "kept": []}
        for r in range(args.rounds):
            pairs = []
            for i in range(args.steps):
                order = ("default", "kept") if i % 2 == 0 else ("kept", "default")
                got = {name: step(name) for name in order}
                pairs.append(got)
                for name in got:
                    times[name].append(got[name])
            ratios.append(float(np.median([p["kept"] / p["default"] for p in pairs])))
            print(f"round {r + 1}/{args.rounds}: kept / default {ratios[-1]:.3f}", file=sys.stderr, flush=True)
    finally:
        for conn in pipes.values():
            conn.send(False)
        for proc in procs:
            proc.join(timeout=30)
    setup = "tiny random BERTs" if args.tiny else "MiniLM-L6 teacher, 3-layer student"
    print(f"bare KD step, {setup}, batch 16, {args.threads} threads, {args.steps} step pairs x {args.rounds} rounds, two processes taking turns")
    for name, v in times.items():
        print(f"  {name:<8} median {np.median(v):.4f} s/step  [{min(v):.4f}, {max(v):.4f}]")
    # step_cost.spread's shape, computed here: this coordinating process imports no torch
    r = {"median": float(np.median(ratios)), "min": float(min(ratios)), "max": float(max(ratios))}
    print(f"kept / default (median of per-step ratios per round; median over rounds [min, max]): "
          f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")
    if args.json:
        print(json.dumps({"kept_over_default": r,
                          "seconds": {k: float(np.median(v)) for k, v in times.items()}, "rounds": args.rounds, "steps": args.steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
