"""What an exact MetaDistil step must cost at least, from its parts, against the bare KD step.

An exact MetaDistil step (the official one: pilot step, teacher meta step, real step; see
the ``metadistil`` module) does everything a bare KD step does plus, at the least:

* the teacher's forward **with** its graph (the meta-gradient flows through its outputs),
* the teacher's backward (every teacher parameter is trained) and its optimizer step
  (fused AdamW, as kdbench's),
* the pilot backward through the student (``J^T v``, the virtual step ``S'``),
* the quiz pass: a forward and a backward of ``S'`` on a quiz batch (eval mode),
* ``J g``, the student outputs' derivative along the quiz gradient: its tangent needs two
  matrix products per linear layer (``dx W`` and ``x dW``) and per attention product
  where the forward needs one, and about one pass's worth for each other op, so it is
  counted as two eval-mode student forwards (no dropout drawn), however it is computed
  (forward mode adds the primal: about three; reverse over reverse keeps a second graph).

The real step's teacher forward (against the updated teacher) and its student
forward/backward are the bare step's own. This script times each part on the reference
setup of ``step_cost.py`` (MiniLM-L6 teacher, 3-layer student, batch 16, length 64, 2
threads) in cycles, every part once per cycle, back to back (a few seconds, so the
machine's drift over tens of seconds cancels within a cycle, as in ``step_cost.py``'s step
pairs); ``--reps`` cycles make a round, whose floor ``(bare + parts) / bare`` is the median
of its cycles' floors; a part's figure is its median over a round's cycles. It prints the
median floor over ``--rounds`` rounds with its [min, max]: a lower
bound of MetaDistil over bare for any exact implementation that trains the whole teacher
on this machine, ignoring everything but these passes (no ``S'`` built, no clipping, no
dropout redrawn). It asserts nothing.

    python benchmarks/metadistil_floor.py [--rounds 5] [--reps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import step_cost as sc  # the reference setup and its bare KD loop
from kdbench.train import keep_freed_memory


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random BERTs (seconds; checks the script runs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # the allocator setting kdbench's runs train under
    registry = sc.bench_registry()
    bare = sc.BareKD(registry, torch.device("cpu"), sc.reference_kd_spec(registry, args.tiny), 10**6)
    teacher, student = bare.teacher, bare.student
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    t_opt = torch.optim.AdamW(t_params, lr=1e-5, fused=True)
    index = next(bare.batches)
    inputs = bare.factory.collate(bare.encoded[sc.TRAIN], index)
    quiz = bare.factory.collate(bare.encoded[sc.TRAIN], next(bare.batches))
    held: dict = {}

    def teacher_forward_with_graph():
        with torch.enable_grad():
            held["t"] = teacher(inputs).logits

    def teacher_backward():
        t = held.pop("t")
        torch.autograd.grad(t, t_params, torch.randn_like(t), allow_unused=True)

    def teacher_step():
        for q in t_params:
            q.grad = torch.zeros_like(q) if q.grad is None else q.grad
        t_opt.step()

    def student_forward():
        held["s"] = student(inputs).logits

    def student_forward_eval():
        student.eval()
        with torch.no_grad():
            student(inputs)
        student.train()

    def student_backward():
        s = held.pop("s")
        torch.autograd.grad(s, s_params, torch.randn_like(s), allow_unused=True)

    def quiz_pass():
        student.eval()
        out = student(quiz).logits
        torch.autograd.grad(out.sum(), s_params, allow_unused=True)
        student.train()

    parts = {  # name: (the timed call, an untimed call before it)
        "bare KD step": (bare.step, None),
        "teacher forward with graph": (teacher_forward_with_graph, lambda: held.pop("t", None)),
        "teacher backward": (teacher_backward, teacher_forward_with_graph),
        "teacher AdamW (fused)": (teacher_step, None),
        "student forward (eval)": (student_forward_eval, None),
        "student backward": (student_backward, student_forward),
        "quiz forward + backward": (quiz_pass, None),
    }

    def cycle() -> dict[str, float]:  # every part once, back to back: a few seconds in all
        got = {}
        for name, (fn, before) in parts.items():
            if before is not None:
                before()
            got[name] = _timed(fn)
        return got

    def floor(got: dict[str, float]) -> float:
        extra = (got["teacher forward with graph"] + got["teacher backward"] + got["teacher AdamW (fused)"] + got["student backward"]
                 + got["quiz forward + backward"] + 2 * got["student forward (eval)"])
        return (got["bare KD step"] + extra) / got["bare KD step"]

    cycle()  # warm-up, discarded
    rows: dict[str, list[float]] = {name: [] for name in parts}
    floors = []
    for r in range(args.rounds):
        cycles = [cycle() for _ in range(args.reps)]
        for name in parts:
            rows[name].append(float(np.median([c[name] for c in cycles])))
        floors.append(float(np.median([floor(c) for c in cycles])))
        print(f"round {r + 1}/{args.rounds}: floor {floors[-1]:.3f} (bare {rows['bare KD step'][-1]:.4f} s)", file=sys.stderr, flush=True)
    print(f"parts of an exact MetaDistil step, {'tiny random BERTs' if args.tiny else 'reference setup'}, {args.threads} threads, "
          f"{args.reps} cycles a round, {args.rounds} rounds (s: median [min, max] over rounds):")
    for name, v in rows.items():
        print(f"  {name:<30}{np.median(v):>8.4f}  [{min(v):.4f}, {max(v):.4f}]")
    print("  J g counted as 2 x the eval-mode student forward (the tangent's two matrix products per linear layer)")
    floor_spread = sc.spread(floors)
    print(f"floor of MetaDistil / bare KD: {floor_spread['median']:.3f} [{floor_spread['min']:.3f}, {floor_spread['max']:.3f}] over rounds")
    if args.json:
        print(json.dumps({"parts_s": {k: float(np.median(v)) for k, v in rows.items()},
                          "floor_over_bare": floor_spread}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
