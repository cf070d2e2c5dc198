"""What a language-model distillation step costs, per method, split into generation and
update, and what the KV cache saves when sampling.

Reference tiny pair (benchmarks/llm-cpu.yaml's models): teacher a random Llama of 4 blocks,
width 128; student 2 blocks, width 64; the character tokenizer; batches of 32 addition
examples (1-4 digit operands); on-policy methods sample up to 10 new tokens. Each method
runs its own ``train_step`` on a :class:`~kdbench.api.StepContext` built here (a live
teacher, AdamW), the teacher caches of seqkd computed once before timing. A step's
``generation`` is what the method decoded inside it (``ctx.timings``), ``update`` the rest
(forward passes, loss, backward, optimizer). Methods are interleaved over ``--rounds``
rounds after a discarded warm-up round, ``--steps`` steps per method per round (a
round's figure: the median step); each figure is reported as the median over rounds
with [min, max].

The KV cache: greedy decoding of ``--gen-length`` tokens (64 by default) after the
batch's prompts, with and without the cache, interleaved over the rounds; the ratio is
no-cache over cache seconds per generated token (the target: >= 3 at length 64).

    python benchmarks/llm_step.py                 # reference pair
    python benchmarks/llm_step.py --tiny          # tiny models, 1 round: seconds (the test's structure check)
    python benchmarks/llm_step.py --json out.json # also write the figures as JSON

Not measured here (yet): TRL's GKDTrainer step on the same models, batch and lengths.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdbench.api import Batch, Problem, StepContext
from kdbench.generation import decode
from kdbench.registry import get_registry
from kdbench_plugins.models.causal_lm import CausalLMFactory, CausalLMOptions  # the benchmark's models, by design
from kdbench_plugins.tasks.algorithmic import Algorithmic, AlgorithmicOptions

METHODS = {"sft": {}, "token-kd": {}, "seqkd": {"max_new_tokens": 10}, "gkd": {"lmbda": 1.0, "max_new_tokens": 10},
           "rkl": {"max_new_tokens": 10}, "skew-kl": {}, "skew-rkl": {}, "taid": {}}
REFERENCE = {"teacher": {"layers": 4, "hidden": 128, "heads": 4, "intermediate": 384}, "student": {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 192},
             "batch": 32}
TINY = {"teacher": {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}, "student": {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32},
        "batch": 4}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def build(size: dict[str, Any], seed: int = 0) -> tuple[Any, Any, Any, dict[str, torch.Tensor]]:
    factory = CausalLMFactory()
    opts = {role: CausalLMOptions(tiny={"family": "llama", "context": 96, **size[role]}) for role in ("teacher", "student")}
    torch.manual_seed(seed)
    teacher = factory.build(opts["teacher"], Problem("generation", 1)).eval()
    student = factory.build(opts["student"], Problem("generation", 1))
    task = Algorithmic(AlgorithmicOptions(train_size=max(size["batch"] * 4, 64), eval_size=8, digits=(1, 4), long_digits=(5, 6)))
    encoded = factory.encode(opts["student"], task.load("")["train"], task.max_length)
    return factory, teacher, student, encoded


def context(name: str, params: dict[str, Any], teacher: Any, student: Any, factory: Any, encoded: dict[str, torch.Tensor], batch: int) -> tuple[Any, StepContext]:
    cls = get_registry().method(name)
    method = cls(cls.Params(**params), Problem("generation", 1))
    s = copy.deepcopy(student)  # every method starts from the same student

    def teacher_forward(b: Batch, need: frozenset[str]) -> Any:
        with torch.no_grad():
            return teacher(b.teacher_inputs, need=need)

    def train_batches(size: int):
        n = next(iter(encoded.values())).shape[0]
        for start in range(0, n, size):
            idx = torch.arange(start, min(start + size, n))
            yield Batch(factory.collate(encoded, idx), idx.float(), idx)

    opt = torch.optim.AdamW(s.parameters(), lr=1e-3)
    ctx = StepContext(student=s, teacher=teacher, extra=None, student_optimizer=opt, scheduler=None, problem=Problem("generation", 1),
                      device=torch.device("cpu"), total_steps=1000, train_size=batch, teacher_forward=teacher_forward,
                      next_quiz_batch=lambda: None, train_batches=train_batches)  # type: ignore[arg-type]
    method.check_models(s, teacher)
    method.setup(ctx)
    return method, ctx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models, one round, one step: structure only")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--gen-length", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    size = TINY if args.tiny else REFERENCE
    rounds = args.rounds or (1 if args.tiny else 5)
    steps = args.steps or (1 if args.tiny else 5)
    length = args.gen_length or (8 if args.tiny else 64)
    torch.set_num_threads(torch.get_num_threads())
    factory, teacher, student, encoded = build(size)
    contexts = {name: context(name, params, teacher, student, factory, encoded, size["batch"]) for name, params in METHODS.items()}
    idx = torch.arange(size["batch"])
    batch = Batch(factory.collate(encoded, idx), idx.float(), idx)
    per: dict[str, dict[str, list[float]]] = {m: {"step_s": [], "generation_s": [], "update_s": []} for m in METHODS}
    kv: dict[str, list[float]] = {"cache_s_per_token": [], "no_cache_s_per_token": [], "ratio": []}
    for r in range(rounds + (0 if args.tiny else 1)):
        warm = not args.tiny and r == 0
        for name, (method, ctx) in contexts.items():
            times, gens = [], []
            for _ in range(steps):
                before = ctx.timings.get("generation", 0.0)
                t0 = time.perf_counter()
                method.train_step(ctx, batch)
                times.append(time.perf_counter() - t0)
                gens.append(ctx.timings.get("generation", 0.0) - before)
            if not warm:
                k = int(np.argsort(times)[len(times) // 2])
                per[name]["step_s"].append(times[k])
                per[name]["generation_s"].append(gens[k])
                per[name]["update_s"].append(times[k] - gens[k])
        p_ids, p_mask = batch.inputs["prompt_ids"], batch.inputs["prompt_mask"]
        figures = {}
        for use_cache in (True, False):
            g = decode(student.lm, p_ids, p_mask, length, eos_token_id=-1, pad_token_id=0, use_cache=use_cache)  # -1: never stops: all `length` tokens
            figures[use_cache] = g.seconds / (g.tokens.numel())
        if not warm:
            kv["cache_s_per_token"].append(figures[True])
            kv["no_cache_s_per_token"].append(figures[False])
            kv["ratio"].append(figures[False] / figures[True])
    out = {"setup": {"tiny": args.tiny, "rounds": rounds, "steps_per_round": steps, "batch": size["batch"], "gen_length": length,
                     "threads": torch.get_num_threads(), "torch": torch.__version__},
           "methods": {m: {k: spread(v) for k, v in fig.items()} for m, fig in per.items()},
           "kv_cache": {k: spread(v) for k, v in kv.items()},
           "memory": {"peak_rss_mb": peak_rss_mb()}}
    print(f"{'method':10s} {'step s':>22s} {'generation s':>22s} {'update s':>22s}")
    for m, fig in out["methods"].items():
        cells = [f"{fig[k]['median']:.4f} [{fig[k]['min']:.4f}, {fig[k]['max']:.4f}]" for k in ("step_s", "generation_s", "update_s")]
        print(f"{m:10s} " + " ".join(f"{c:>22s}" for c in cells))
    ratio = out["kv_cache"]["ratio"]
    print(f"KV cache at length {length}: no-cache / cache time per token {ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}] over {rounds} round(s)")
    print(f"peak RSS {out['memory']['peak_rss_mb']:.0f} MB (the whole process)")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def peak_rss_mb() -> float:
    with contextlib.suppress(ImportError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
