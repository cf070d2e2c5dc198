"""What a training step costs, per method, measured side by side in one process.

Reference setup (../shared/REFERENCE.md): teacher = the MiniLM-L6 BERT with a 2-way head,
student = its first 3 layers, batch 16, sequence length 64, one quiz batch of 16, 2 threads,
CPU. Every variant runs through kdbench's own runner (data, hooks, logging, store writes
and progress bar included), except ``bare``: a hand-written PyTorch loop doing the KD
computation on batches of the same data (every batch has the same shape), the yardstick for
kdbench's framework overhead.

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

How it guards against noise: on the reference 2-core machine the speed drifts by 10-30%
over tens of seconds even when idle, so two 20-step figures taken a minute apart cannot
resolve a few percent. So on a CPU every training step of a kdbench variant is paired with
one step of the bare loop run right after it (step-level ABAB; the bare step runs outside
the kdbench step's own timing, see :func:`paired_with`), and a variant's ratio to the bare
loop is the median of its per-step ratios (a run's first two steps left out). The variants
are also interleaved over ``--rounds`` >= 3 rounds after a discarded warm-up round; each
ratio is reported as the median over rounds with its [min, max], and ratios between two
kdbench variants (MetaDistil over KD) are quotients of their paired ratios within a round.
A variant's s/step is the median step time of its run; the bare loop's is the median of its
paired steps. The bare loop also runs alone right after the warm-up and at the very end:
when those disagree by more than 3%, the output says the s/step figures are UNRELIABLE
(``noise.reliable`` false in the JSON); the paired ratios do not move with such drift,
which their spread over rounds shows. Peak memory comes from the unpaired warm-up runs (a
paired run's memory would include its partner's steps). On a GPU the variants run whole,
unpaired (bare first in every round), as the wall time of a step there is only the time to
queue it, and memory comes from the rounds' runs. The JSON's ``ratios`` hold ``metadistil_over_kd``, ``metadistil_over_bare``,
``shared_teacher_kd_over_kd`` and ``framework_overhead`` (kdbench KD over bare, minus 1),
among others; ``spread`` holds each ratio's [min, max]; ``pairs`` the number of step pairs
behind each variant's ratios.

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
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

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
import kdbench.train.runner as runner_module  # noqa: E402
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


def bench_registry() -> Registry:
    """The installed plugins plus this module's ``bench-text`` task."""
    pm, broken = make_plugin_manager()
    pm.register(sys.modules[__name__], name="bench-text")
    return Registry(pm, broken)


def reference_kd_spec(registry: Registry, tiny: bool = False, batch: int = 16):
    """The KD run of the reference setup (tiny random BERTs with ``tiny``): the spec
    :class:`BareKD` takes."""
    return {r.method: r for r in build_suite(suite_dict(tiny, 10, batch), registry=registry).runs}["kd"]


class BareKD:
    """The KD step in plain PyTorch on the same batches: teacher forward without grad,
    student forward/backward, KD loss, AdamW with the same linear schedule over
    ``schedule_steps`` (on a GPU under the same bf16 autocast as the runner's)."""

    def __init__(self, registry: Registry, device: torch.device, spec, schedule_steps: int):
        self.device = device
        self.autocast = autocast_for(device)
        data = load_task_data(registry, spec.task, spec.quiz_fraction, spec.data_seed)
        self.factory, self.encoded = encoded_splits(registry, spec, data, spec.student, [TRAIN])
        t_factory, t_opts = model_factory(registry, spec.teacher)
        self.teacher = t_factory.build(t_opts, data.task.problem).to(device).eval()
        seed_everything(spec.seed)
        self.student = self.factory.build(self.factory.Options(**spec.student.options), data.task.problem).to(device).train()
        self.opt, self.sched = build_optimizer(list(self.student.parameters()), spec.optimizer, schedule_steps, 1, False)
        self.labels = torch.as_tensor(data.labels(TRAIN))
        self.batches = iter_batches(self.labels.shape[0], spec.budget.batch_size, torch.Generator().manual_seed(spec.seed))
        self.alpha, self.temp, self.problem = spec.params["alpha"], spec.params["temperature"], data.task.problem

    def step(self) -> float:
        """One step; its wall time in seconds (on a GPU: the time to queue its kernels)."""
        t0 = time.perf_counter()
        index = next(self.batches)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in self.factory.collate(self.encoded[TRAIN], index).items()}
        y = self.labels[index].to(self.device, non_blocking=True)
        with torch.no_grad(), self.autocast():
            t_logits = self.teacher(inputs).logits
        with self.autocast():
            s_logits = self.student(inputs).logits
        loss = self.alpha * soft_loss(s_logits, t_logits, self.temp, self.problem) + (1 - self.alpha) * torch.nn.functional.cross_entropy(s_logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return time.perf_counter() - t0


def bare_loop(runner: Runner, spec, steps: int) -> dict:
    """``steps`` steps of a fresh :class:`BareKD` alone: its median step (on a GPU: the mean,
    waiting for the device at the end) and its peak memory increase."""
    bare = BareKD(runner.registry, runner.device, spec, steps)
    cuda = bare.device.type == "cuda"
    meter = CostMeter(bare.device)
    with meter:
        start = time.perf_counter()
        times = [bare.step() for _ in range(steps)]
        if cuda:
            torch.cuda.synchronize(bare.device)
        total = time.perf_counter() - start
    figure = total / steps if cuda else float(np.median(times))
    return {"step_s_median": figure, "peak_mem_increase_mb": meter.summary()["peak_mem_increase_mb"]}


@contextlib.contextmanager
def paired_with(partner: BareKD, pairs: list[tuple[float, float]]) -> Iterator[None]:
    """Inside, every training step of a kdbench run is followed at once by one step of
    ``partner``, outside the kdbench step's own timing (the runner records a step's time
    before this hook runs; the next step's clock starts after it); ``pairs`` collects
    (kdbench step s, partner step s). Step-level ABAB: the two halves of a pair are
    measured within a few seconds of each other, so the machine's speed, which drifts by
    10-30% over tens of seconds on the reference machine, cancels in their ratio."""
    class PairedMeter(runner_module.CostMeter):  # type: ignore[misc]
        def record_step(self, seconds: float) -> None:
            super().record_step(seconds)
            pairs.append((seconds, partner.step()))

    with runner_meter(PairedMeter):
        yield


@contextlib.contextmanager
def runner_meter(meter_class: type) -> Iterator[None]:
    """Inside, every kdbench run meters itself with ``meter_class`` (a subclass of
    :class:`~kdbench.train.cost.CostMeter` that adds a side effect); the runner's own class
    comes back on exit. What :func:`paired_with` and peers.py's meter marks hook into."""
    original = runner_module.CostMeter
    runner_module.CostMeter = meter_class
    try:
        yield
    finally:
        runner_module.CostMeter = original


CORE = ("bare", "kd", "kd_shared_teacher", "metadistil")
OTHERS = ("prokt", "pkd", "tinybert")
WARMUP_STEPS = 4  # the discarded warm-up round; on a CPU its runs (unpaired) give the memory figures
PAIR_SKIP = 2  # a run's first steps (optimizer state allocated, caches filled) stay out of its pair ratios
NOISE_LIMIT = 0.03  # the bare loop alone at the start and at the end of the run must agree this closely


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of per-round figures (the shape every benchmark here reports)."""
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def _paired_figures(pairs: list[tuple[float, float]]) -> dict[str, float]:
    kept = pairs[PAIR_SKIP:] if len(pairs) > 2 * PAIR_SKIP else pairs
    mine, bare = np.array([p[0] for p in kept]), np.array([p[1] for p in kept])
    return {"step_s_median": float(np.median(mine)), "bare_s_median": float(np.median(bare)),
            "over_bare": float(np.median(mine / bare)), "pairs": len(kept)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random BERTs (fast; for CI)")
    ap.add_argument("--json", action="store_true", help="end with one line of JSON holding the ratios")
    ap.add_argument("--steps", type=int, default=None, help="steps per variant and round (the first two stay out of the pair ratios)")
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
    timed = [v for v in variants if v != "bare"]

    registry = bench_registry()
    suite = build_suite(suite_dict(args.tiny, steps, args.batch), registry=registry)
    by_method = {r.method: r for r in suite.runs}
    warm = {r.method: r for r in build_suite(suite_dict(args.tiny, WARMUP_STEPS, args.batch), registry=registry).runs}
    per_round: dict[str, list[dict]] = {v: [] for v in variants}
    memory: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore(Path(tmp) / "store.sqlite")
        live = Runner(tmp, registry, device=args.device, progress=False, share_teacher_outputs=False)
        shared = Runner(tmp, registry, device=args.device, progress=False, share_teacher_outputs=True)
        cuda = live.device.type == "cuda"
        paired = not cuda  # a GPU step's wall time is the time to queue it: there variants run whole, as before
        teacher = provide_teacher(suite.runs[0], Path(tmp), store, registry, live.device)  # the teachers-first phase
        partner = BareKD(registry, live.device, by_method["kd"], 10**6) if paired else None  # one bare loop paired with every kdbench run

        def through_kdbench(runner: Runner, spec, pair: bool) -> dict:
            pairs: list[tuple[float, float]] = []
            store.claim(spec, rerun=True)
            with paired_with(partner, pairs) if pair and partner is not None else contextlib.nullcontext():
                result = runner.run(spec, teacher)
            store.finish(spec, result.status, cost=result.cost, error=result.error)
            if result.status != "done":
                raise SystemExit(f"{spec.method} {result.status}: {result.error}")
            cost = result.cost  # on a GPU the mean over the run (see the module docstring)
            figure = cost["train_s"] / cost["steps"] if cuda else cost["step_s_median"]
            return {"step_s_median": figure, "peak_mem_increase_mb": cost["peak_mem_increase_mb"], **(_paired_figures(pairs) if pairs else {})}

        def variants_for(runs: dict, n: int, pair: bool) -> dict:
            return {
                "bare": lambda: bare_loop(live, runs["kd"], n),
                "kd": lambda: through_kdbench(live, runs["kd"], pair),
                "kd_shared_teacher": lambda: through_kdbench(shared, runs["kd"], pair),
                **{name: (lambda name=name: through_kdbench(live, runs[name], pair)) for name in ("metadistil", *OTHERS)},
            }

        # warm-up round, discarded for time: one-off costs (first kernels, caches, the
        # shared-teacher logits, computed once in the first shared run's preparation) stay
        # out of round 1. Unpaired, so on a CPU its peak memory figures are each run's own
        # (on a GPU, where nothing is paired, the rounds' runs give them, as before).
        if not args.no_warmup:
            for name, run in variants_for(warm, WARMUP_STEPS, False).items():
                if name in variants:
                    mem = run()["peak_mem_increase_mb"]
                    if paired:
                        memory[name] = mem
        run_variant = variants_for(by_method, steps, paired)
        bare_start = run_variant["bare"]() if paired else None  # drift check: the bare loop alone, first and last
        for r in range(args.rounds):  # ABAB: every round runs every variant once; on a CPU each step is paired with a bare step
            for name in (timed if paired else variants):
                per_round[name].append(run_variant[name]())
            if paired:  # the bare figure of the round: the median of its paired bare steps
                per_round["bare"].append({"step_s_median": float(np.median([per_round[n][-1]["bare_s_median"] for n in timed]))})
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {per_round[n][-1]['step_s_median']:.4f}" for n in variants)
                  + ("  (x bare, paired: " + ", ".join(f"{n} {per_round[n][-1]['over_bare']:.3f}" for n in timed) + ")" if paired else ""),
                  file=sys.stderr, flush=True)
        bare_end = run_variant["bare"]()
    if bare_start is None:
        bare_start = per_round["bare"][0]
    if paired:  # paired rounds carry no bare memory: without a warm-up round, its unpaired run's
        memory.setdefault("bare", bare_start["peak_mem_increase_mb"])
    for name in variants:
        if name not in memory:
            memory[name] = float(np.median([x["peak_mem_increase_mb"] for x in per_round[name]]))

    def seconds(name: str) -> list[float]:
        return [x["step_s_median"] for x in per_round[name]]

    def over_bare(name: str) -> list[float]:  # per round: from step pairs on a CPU, from the round's figures on a GPU
        if name == "bare":
            return [1.0] * args.rounds
        return [x["over_bare"] for x in per_round[name]] if paired else [x / b for x, b in zip(seconds(name), seconds("bare"))]

    def ratio(a: str, b: str) -> dict[str, float]:  # per round, so slow drift between rounds cancels
        return spread([x / y for x, y in zip(over_bare(a), over_bare(b))])

    bare0 = bare_start["step_s_median"]
    drift = bare_end["step_s_median"] / bare0 - 1.0
    reliable = abs(drift) <= NOISE_LIMIT
    stats = {name: {**spread(seconds(name)), "peak_mem_increase_mb": memory[name]} for name in variants}
    base_mem = max(memory["kd"], 1e-9)
    setup = "tiny random BERTs" if args.tiny else "MiniLM-L6 teacher, 3-layer student"
    if cuda:
        setup += f", {torch.cuda.get_device_name()} (bf16 autocast, TF32; figures are means over a run's steps)"
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    spreads = {"kd_over_bare": ratio("kd", "bare")}
    if "metadistil" in variants:
        spreads.update({"metadistil_over_kd": ratio("metadistil", "kd"), "metadistil_over_bare": ratio("metadistil", "bare"),
                        "shared_teacher_kd_over_kd": ratio("kd_shared_teacher", "kd")})
    spreads.update({f"{name}_over_kd": ratio(name, "kd") for name in OTHERS if name in variants})
    print(f"step cost: {setup}, batch {args.batch}, length {LENGTH}, {args.threads} threads, {steps} steps per variant "
          f"x {args.rounds} interleaved rounds, torch {torch.__version__}, {os.cpu_count()} CPUs, {load} at the end")
    if paired:
        print(f"every kdbench step is paired with the bare step run right after it; ratios are medians of the per-step ratios "
              f"(the first {PAIR_SKIP} steps of a run left out), then the median over rounds; memory from the unpaired "
              + ("warm-up runs" if not args.no_warmup else "paired runs (they include the bare partner's steps)"))
    print(f"{'variant':<20}{'s/step median':>14}{'spread':>9}{'vs kd':>8}{'vs bare':>9}{'peak mem +MB':>14}{'vs kd':>8}")
    for name, s in stats.items():
        width = (s["max"] - s["min"]) / s["median"]
        vs_bare = float(np.median(over_bare(name)))
        print(f"{name:<20}{s['median']:>14.4f}{100 * width:>8.1f}%{vs_bare / float(np.median(over_bare('kd'))):>8.2f}{vs_bare:>9.2f}"
              f"{s['peak_mem_increase_mb']:>14.1f}{s['peak_mem_increase_mb'] / base_mem:>8.2f}")
    ratios = {name: s["median"] for name, s in spreads.items() if name != "kd_over_bare"}
    ratios["framework_overhead"] = spreads["kd_over_bare"]["median"] - 1.0
    if "metadistil" in variants:
        ratios["metadistil_peak_mem_over_kd"] = stats["metadistil"]["peak_mem_increase_mb"] / base_mem
    print("ratios (median of the per-round ratios, [min, max] over rounds):")
    for name, s in spreads.items():
        print(f"  {name:<28}{s['median']:>7.3f}  [{s['min']:.3f}, {s['max']:.3f}]")
    print(f"framework overhead (kdbench KD step vs bare loop{', step pairs' if paired else ', same round'}): {100 * ratios['framework_overhead']:+.1f}%")
    print(f"noise check: bare loop alone {bare0:.4f} s/step at the start, {bare_end['step_s_median']:.4f} at the end ({100 * drift:+.1f}%): "
          + ("within" if reliable else "UNRELIABLE, outside") + f" {100 * NOISE_LIMIT:.0f}%"
          + (": the s/step figures moved with the machine; the paired ratios cancel drift slower than a step pair (their spread over rounds is above)"
             if paired and not reliable else ""))
    if args.json:
        pairs = {name: int(sum(x.get("pairs", 0) for x in per_round[name])) for name in timed}
        print(json.dumps({"setup": setup, "steps": steps, "rounds": args.rounds, "load": load, "paired": paired, "pairs": pairs, "ratios": ratios,
                          "spread": spreads, "seconds": stats, "bare_start_s": bare0, "bare_end_s": bare_end["step_s_median"],
                          "noise": {"bare_drift": drift, "limit": NOISE_LIMIT, "reliable": reliable}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
