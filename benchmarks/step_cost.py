"""What a training step costs, per method, measured side by side in one process.

Reference setup (../shared/REFERENCE.md): teacher = the MiniLM-L6 BERT with a 2-way head,
student = its first 3 layers, batch 16, sequence length 64, one quiz batch of 16, 2 threads,
CPU. Every variant runs through kdbench's own runner (data, hooks, logging, store writes
and progress bar included) on the same batches, except ``bare``: a hand-written PyTorch
loop doing the KD computation, the yardstick for kdbench's framework overhead.

    python benchmarks/step_cost.py            # reference setup (needs the MiniLM package)
    python benchmarks/step_cost.py --core     # only bare, kd, kd_shared_teacher, metadistil
    python benchmarks/step_cost.py --overhead --rounds 9   # only bare and kd: the framework overhead
    python benchmarks/step_cost.py --tiny     # tiny random BERTs: seconds, for CI
    python benchmarks/step_cost.py --json     # ... and a last line of JSON with the ratios
    python benchmarks/step_cost.py --device cuda   # on a GPU: bf16 autocast and TF32, as the runner trains there

On a GPU a step's kernels run asynchronously, so a step's own wall time says when its
kernels were queued, not when they ran: there a variant's figure is its training time over
its steps (the runner waits for the device at every log point and at the last step; the
bare loop waits at its end), a mean rather than a median, and both sides run under the
runner's bf16 autocast with TF32 matrix products.

How it guards against noise: the variants are interleaved (each of ``--rounds`` >= 3
rounds runs every variant once, bare first: ABAB, not AAABBB), so a machine that speeds up
or slows down during the run moves all variants alike. Each variant's figure is the median
step time within a run (warm-up steps fall outside the median), reported as the median
over rounds with its [min, max]; every ratio is taken per round (variants measured minutes
apart never meet in one ratio) and reported as the median of the per-round ratios with
their spread. The bare loop runs once more at the very end: when it disagrees with the
first round's bare loop by more than 3%, the output says the figures are UNRELIABLE
(``noise.reliable`` false in the JSON). The JSON's ``ratios`` hold ``metadistil_over_kd``,
``metadistil_over_bare``, ``shared_teacher_kd_over_kd`` and ``framework_overhead``
(kdbench KD over bare, minus 1), among others; ``spread`` holds each ratio's [min, max].

Why not pytest-benchmark (a dev dependency, the design card's suggestion): it calibrates and
repeats one callable back to back (AAABBB), exactly the drift-prone order this script
replaces, and it times a whole call, while the figure wanted here is the runner's own
per-step median inside a run (preparation and evaluation excluded) and ratios between
variants measured in the same round. It would also turn the benchmark into a timed test;
this stays a script that prints ratios and asserts nothing
(tests/test_step_cost.py only checks the ``--tiny --json`` output's structure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from kdbench.api import Examples, Options, Problem, Task, iter_batches  # noqa: E402
from kdbench.data import TRAIN, load_task_data  # noqa: E402
from kdbench.hookspecs import hookimpl  # noqa: E402
from kdbench.registry import Registry, make_plugin_manager  # noqa: E402
from kdbench.train import CostMeter, Runner, build_optimizer, encoded_splits, model_factory, seed_everything  # noqa: E402
from kdbench.train.loop import autocast_for  # noqa: E402
from kdbench.train.teachers import provide_teacher  # noqa: E402
from kdbench.spec import build_suite  # noqa: E402
from kdbench.store import ResultsStore  # noqa: E402
from kdbench_plugins.methods.kd import soft_loss  # noqa: E402

LENGTH = 64


class BenchOptions(Options):
    n_train: int = 2048


class BenchText(Task):
    """Random sentences of whole-word vocabulary entries, long enough that every example is
    exactly LENGTH tokens after truncation: fixed shapes, like the reference measurement."""

    name = "bench-text"
    description = "synthetic fixed-length text for step-cost benchmarks"
    modality = "text"
    Options = BenchOptions
    max_length = LENGTH

    @property
    def problem(self) -> Problem:
        return Problem("classification", 2)

    @property
    def main_metric(self) -> str:
        return "accuracy"

    def load(self, cache_dir: str) -> Examples:
        rng = np.random.default_rng(0)
        words = ["movie", "good", "bad", "plot", "actor", "story", "scene", "great", "boring", "film", "the", "a", "was", "is", "not", "very"]

        def split(n: int) -> dict:
            text = [" ".join(rng.choice(words, LENGTH)) for _ in range(n)]
            return {"text": text, "label": rng.integers(0, 2, n)}

        return {"train": split(self.options.n_train), "validation": split(64), "test": split(64)}

    def compute_metrics(self, predictions, labels):
        return {"accuracy": float(np.mean(predictions == labels))}


@hookimpl
def kdbench_tasks():
    return [BenchText]


def suite_dict(tiny: bool, steps: int, batch: int) -> dict:
    if tiny:
        teacher = {"model": "bert", "options": {"tiny": {"layers": 4, "hidden": 32, "heads": 2, "intermediate": 64}, "pooling": "cls"}}
        student = {"model": "bert", "options": {"tiny": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}, "pooling": "cls"}}  # pkd needs a layer to map
    else:
        teacher = {"model": "bert", "options": {"pretrained": "minilm", "pooling": "cls"}}
        student = {"model": "bert", "options": {"pretrained": "minilm", "num_layers": 3, "pooling": "cls"}}
    return {
        "name": "step-cost",
        "tasks": [{"name": "bench-text"}],
        "teacher": teacher,  # used as built (a fresh 2-way head), as in the reference measurement
        "students": [student],
        "methods": [
            {"name": "kd"},
            {"name": "metadistil", "params": {"quiz_batches": 1}},
            {"name": "prokt"},
            {"name": "pkd", "params": {"layer_map": "skip"}},
            {"name": "tinybert"},
        ],
        "seeds": [0],
        "budget": {"steps": steps, "batch_size": batch, "log_every": 10, "eval_batch_size": 64},
        "optimizer": {"name": "adamw", "lr": 5e-5, "schedule": "linear"},
        "quiz_fraction": 0.1,
    }


def bare_loop(runner: Runner, spec, steps: int) -> dict:
    """The KD step in plain PyTorch on the same batches: teacher forward without grad,
    student forward/backward, KD loss, AdamW with the same linear schedule (on a GPU under
    the same bf16 autocast as the runner's)."""
    device = runner.device
    cuda = device.type == "cuda"
    autocast = autocast_for(device)
    data = load_task_data(runner.registry, spec.task, spec.quiz_fraction, spec.data_seed)
    factory, encoded = encoded_splits(runner.registry, spec, data, spec.student, [TRAIN])
    t_factory, t_opts = model_factory(runner.registry, spec.teacher)
    teacher = t_factory.build(t_opts, data.task.problem).to(device).eval()
    seed_everything(spec.seed)
    student = factory.build(factory.Options(**spec.student.options), data.task.problem).to(device).train()
    opt, sched = build_optimizer(list(student.parameters()), spec.optimizer, steps, 1, False)
    labels = torch.as_tensor(data.labels(TRAIN))
    gen = torch.Generator().manual_seed(spec.seed)
    batches = iter_batches(labels.shape[0], spec.budget.batch_size, gen)
    alpha, temp = spec.params["alpha"], spec.params["temperature"]
    times = []
    meter = CostMeter(device)
    with meter:
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            index = next(batches)
            inputs = {k: v.to(device, non_blocking=True) for k, v in factory.collate(encoded[TRAIN], index).items()}
            y = labels[index].to(device, non_blocking=True)
            with torch.no_grad(), autocast():
                t_logits = teacher(inputs).logits
            with autocast():
                s_logits = student(inputs).logits
            loss = alpha * soft_loss(s_logits, t_logits, temp, data.task.problem) + (1 - alpha) * torch.nn.functional.cross_entropy(s_logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            times.append(time.perf_counter() - t0)
        if cuda:
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
    figure = total / steps if cuda else float(np.median(times))
    return {"step_s_median": figure, "peak_mem_increase_mb": meter.summary()["peak_mem_increase_mb"]}


CORE = ("bare", "kd", "kd_shared_teacher", "metadistil")
OTHERS = ("prokt", "pkd", "tinybert")
WARMUP_STEPS = 3
NOISE_LIMIT = 0.03  # the bare loop at the start and at the end of the run must agree this closely


def _ratio_stats(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random BERTs (fast; for CI)")
    ap.add_argument("--json", action="store_true", help="end with one line of JSON holding the ratios")
    ap.add_argument("--steps", type=int, default=None, help="steps per variant and round (the median absorbs warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3)")
    ap.add_argument("--core", action="store_true", help="only bare, kd, kd_shared_teacher and metadistil")
    ap.add_argument("--overhead", action="store_true", help="only bare and kd: the framework overhead, with more rounds for the same time")
    ap.add_argument("--no-warmup", action="store_true", help="skip the discarded warm-up round (the structure test's shortcut)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the reference) or cuda (bf16 autocast, TF32)")
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (a spread needs rounds)")
    torch.set_num_threads(args.threads)
    steps = args.steps or (4 if args.tiny else 20)
    variants = ("bare", "kd") if args.overhead else CORE if args.core else CORE + OTHERS

    pm, broken = make_plugin_manager()
    pm.register(sys.modules[__name__], name="bench-text")
    registry = Registry(pm, broken)
    suite = build_suite(suite_dict(args.tiny, steps, args.batch), registry=registry)
    by_method = {r.method: r for r in suite.runs}
    warm = {r.method: r for r in build_suite(suite_dict(args.tiny, WARMUP_STEPS, args.batch), registry=registry).runs}
    per_round: dict[str, list[dict]] = {v: [] for v in variants}
    bare_end: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore(Path(tmp) / "store.sqlite")
        live = Runner(tmp, registry, device=args.device, progress=False, share_teacher_outputs=False)
        shared = Runner(tmp, registry, device=args.device, progress=False, share_teacher_outputs=True)
        cuda = live.device.type == "cuda"
        teacher = provide_teacher(suite.runs[0], Path(tmp), store, registry, live.device)  # the teachers-first phase

        def through_kdbench(runner: Runner, spec) -> dict:
            store.claim(spec, rerun=True)
            result = runner.run(spec, teacher)
            store.finish(spec, result.status, cost=result.cost, error=result.error)
            if result.status != "done":
                raise SystemExit(f"{spec.method} {result.status}: {result.error}")
            cost = result.cost  # on a GPU the mean over the run (see the module docstring)
            figure = cost["train_s"] / cost["steps"] if cuda else cost["step_s_median"]
            return {"step_s_median": figure, "peak_mem_increase_mb": cost["peak_mem_increase_mb"]}

        def variants_for(runs: dict, n: int) -> dict:
            return {
                "bare": lambda: bare_loop(live, runs["kd"], n),
                "kd": lambda: through_kdbench(live, runs["kd"]),
                "kd_shared_teacher": lambda: through_kdbench(shared, runs["kd"]),
                **{name: (lambda name=name: through_kdbench(live, runs[name])) for name in ("metadistil", *OTHERS)},
            }

        # warm-up round, discarded: one-off costs (first kernels, caches, the shared-teacher
        # logits, computed once in the first shared run's preparation) stay out of round 1
        for name, run in variants_for(warm, WARMUP_STEPS).items():
            if name in variants and not args.no_warmup:
                run()
        run_variant = variants_for(by_method, steps)
        for r in range(args.rounds):  # ABAB: every round runs every variant once, bare first
            for name in variants:
                per_round[name].append(run_variant[name]())
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {per_round[n][-1]['step_s_median']:.4f}" for n in variants),
                  file=sys.stderr, flush=True)
        bare_end = run_variant["bare"]()  # drift check: the bare loop again at the very end

    def seconds(name: str) -> list[float]:
        return [x["step_s_median"] for x in per_round[name]]

    def ratio(a: str, b: str) -> dict[str, float]:  # per round, so slow drift between rounds cancels
        return _ratio_stats([x / y for x, y in zip(seconds(a), seconds(b))])

    bare0 = per_round["bare"][0]["step_s_median"]
    drift = bare_end["step_s_median"] / bare0 - 1.0
    reliable = abs(drift) <= NOISE_LIMIT
    stats = {name: {"median": float(np.median(seconds(name))), "min": min(seconds(name)), "max": max(seconds(name)),
                    "peak_mem_increase_mb": float(np.median([x["peak_mem_increase_mb"] for x in per_round[name]]))}
             for name in variants}
    base, base_mem = stats["kd"]["median"], max(stats["kd"]["peak_mem_increase_mb"], 1e-9)
    setup = "tiny random BERTs" if args.tiny else "MiniLM-L6 teacher, 3-layer student"
    if cuda:
        setup += f", {torch.cuda.get_device_name()} (bf16 autocast, TF32; figures are means over a run's steps)"
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    print(f"step cost: {setup}, batch {args.batch}, length {LENGTH}, {args.threads} threads, {steps} steps per variant "
          f"x {args.rounds} interleaved rounds, torch {torch.__version__}, {os.cpu_count()} CPUs, {load} at the end")
    print(f"{'variant':<20}{'s/step median':>14}{'spread':>9}{'vs kd':>8}{'vs bare':>9}{'peak mem +MB':>14}{'vs kd':>8}")
    for name, s in stats.items():
        spread = (s["max"] - s["min"]) / s["median"]
        print(f"{name:<20}{s['median']:>14.4f}{100 * spread:>8.1f}%{s['median'] / base:>8.2f}{s['median'] / stats['bare']['median']:>9.2f}"
              f"{s['peak_mem_increase_mb']:>14.1f}{s['peak_mem_increase_mb'] / base_mem:>8.2f}")
    spreads = {"kd_over_bare": ratio("kd", "bare")}
    if "metadistil" in variants:
        spreads.update({"metadistil_over_kd": ratio("metadistil", "kd"), "metadistil_over_bare": ratio("metadistil", "bare"),
                        "shared_teacher_kd_over_kd": ratio("kd_shared_teacher", "kd")})
    spreads.update({f"{name}_over_kd": ratio(name, "kd") for name in OTHERS if name in variants})
    ratios = {name: s["median"] for name, s in spreads.items() if name != "kd_over_bare"}
    ratios["framework_overhead"] = spreads["kd_over_bare"]["median"] - 1.0
    if "metadistil" in variants:
        ratios["metadistil_peak_mem_over_kd"] = stats["metadistil"]["peak_mem_increase_mb"] / base_mem
    print("ratios (median of the per-round ratios, [min, max] over rounds):")
    for name, s in spreads.items():
        print(f"  {name:<28}{s['median']:>7.3f}  [{s['min']:.3f}, {s['max']:.3f}]")
    print(f"framework overhead (kdbench KD step vs bare loop, same round): {100 * ratios['framework_overhead']:+.1f}%")
    print(f"noise check: bare loop {bare0:.4f} s/step at the start, {bare_end['step_s_median']:.4f} at the end ({100 * drift:+.1f}%): "
          + ("within" if reliable else f"UNRELIABLE, outside") + f" {100 * NOISE_LIMIT:.0f}%")
    if args.json:
        print(json.dumps({"setup": setup, "steps": steps, "rounds": args.rounds, "load": load, "ratios": ratios,
                          "spread": spreads, "seconds": stats, "bare_end_s": bare_end["step_s_median"],
                          "noise": {"bare_drift": drift, "limit": NOISE_LIMIT, "reliable": reliable}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
