"""What one optimizer step costs: PyTorch's default kernel against the fused one
(``optimizer: {fused: true}``), over a real student's parameters, measured side by side.

    python benchmarks/optimizer_step.py            # the reference student: MiniLM's first 3 layers
    python benchmarks/optimizer_step.py --tiny     # a tiny random BERT: seconds, for CI
    python benchmarks/optimizer_step.py --json     # ... and a last line of JSON with the ratios

Both variants are built by :func:`kdbench.train.build_optimizer` from the same
:class:`kdbench.spec.OptimizerSpec` (``fused`` false, then true) over the same parameters
with the same gradients; each round times ``--steps`` steps of every variant, the variants
interleaved (default, fused, default, fused, ...: a machine that speeds up or slows down
moves both alike). Reported: each variant's median ms per step over rounds with its
[min, max], and the per-round ratio fused / default (median and spread). A benchmark that
prints ratios; it asserts nothing (tests/test_optimizer_step.py checks the ``--tiny --json``
output's structure).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from kdbench.api import Problem  # noqa: E402
from kdbench.registry import get_registry  # noqa: E402
from kdbench.spec import ModelSpec, OptimizerSpec  # noqa: E402
from kdbench.train import build_optimizer, keep_freed_memory, model_factory  # noqa: E402

REFERENCE = {"model": "bert", "options": {"pretrained": "minilm", "num_layers": 3}}
TINY = {"model": "bert", "options": {"tiny": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}}}


def student_parameters(tiny: bool) -> list[torch.nn.Parameter]:
    factory, options = model_factory(get_registry(), ModelSpec(**(TINY if tiny else REFERENCE)))
    model = factory.build(options, Problem("classification", 2))
    return [p for p in model.parameters() if p.requires_grad]


def time_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per step, the median of ``steps`` timed steps after one untimed."""
    opt.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="adamw", choices=["adamw", "adam", "sgd"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # the heap setting every kdbench run makes (without it the default AdamW step over the MiniLM student reads 94 ms instead of 51: results/optimizer-kernels-cpu-2026-12-07)
    params = student_parameters(args.tiny)
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    optimizers = {name: build_optimizer(params, OptimizerSpec(name=args.name, lr=1e-4, fused=fused), 10**6, 1, False)[0]
                  for name, fused in (("default", False), ("fused", True))}
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    for r in range(args.rounds):
        for name, opt in optimizers.items():
            seconds[name].append(time_steps(opt, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {s[-1] * 1000:.1f} ms" for n, s in seconds.items()), flush=True)
    ratios = [f / d for f, d in zip(seconds["fused"], seconds["default"])]
    n = sum(p.numel() for p in params)
    print(f"{args.name} step over {n / 1e6:.2f} M parameters ({'tiny BERT' if args.tiny else 'MiniLM 3-layer student'}), "
          f"{args.threads} threads, {args.rounds} interleaved rounds of {args.steps} steps, torch {torch.__version__}, "
          f"freed memory kept in the heap as in runs: {kept}")
    for name, s in seconds.items():
        print(f"  {name:<8} {np.median(s) * 1000:8.1f} ms/step  [{min(s) * 1000:.1f}, {max(s) * 1000:.1f}]")
    print(f"  fused / default: {np.median(ratios):.3f}  [{min(ratios):.3f}, {max(ratios):.3f}] over rounds")
    if args.json:
        print(json.dumps({"optimizer": args.name, "parameters": n, "rounds": args.rounds,
                          "ms_per_step": {k: {"median": float(np.median(v)) * 1000, "min": min(v) * 1000, "max": max(v) * 1000} for k, v in seconds.items()},
                          "ratios": {"fused_over_default": float(np.median(ratios))},
                          "spread": {"fused_over_default": {"min": min(ratios), "max": max(ratios)}}}))


if __name__ == "__main__":
    main()
