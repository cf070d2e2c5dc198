"""What a training step costs, per method, measured side by side in one process.

Reference setup (../shared/REFERENCE.md): teacher = the MiniLM-L6 BERT with a 2-way head,
student = its first 3 layers, batch 16, sequence length 64, one quiz batch of 16, 2 threads,
CPU. Every variant runs through kdbench's own runner (data, hooks, logging, store writes
and progress bar included) on the same batches, except ``bare``: a hand-written PyTorch
loop doing the KD computation, the yardstick for kdbench's framework overhead.

    python benchmarks/step_cost.py            # reference setup (needs the MiniLM package)
    python benchmarks/step_cost.py --tiny     # tiny random BERTs: seconds, for CI
    python benchmarks/step_cost.py --json     # ... and a last line of JSON with the ratios

Reported per variant: median seconds per step after warm-up, ratio to the KD step, peak
memory increase over the run (process RSS on CPU, CUDA max allocated on GPU) and its ratio.
Nothing here asserts a speed: targets are read off the printed ratios.
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
        teacher = {"model": "bert", "options": {"tiny": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}, "pooling": "cls"}}
        student = {"model": "bert", "options": {"tiny": {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}, "pooling": "cls"}}
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
    student forward/backward, KD loss, AdamW with the same linear schedule."""
    data = load_task_data(runner.registry, spec.task, spec.quiz_fraction, spec.data_seed)
    factory, encoded = encoded_splits(runner.registry, spec, data, spec.student, [TRAIN])
    t_factory, t_opts = model_factory(runner.registry, spec.teacher)
    teacher = t_factory.build(t_opts, data.task.problem).eval()
    seed_everything(spec.seed)
    student = factory.build(factory.Options(**spec.student.options), data.task.problem).train()
    opt, sched = build_optimizer(list(student.parameters()), spec.optimizer, steps, 1, False)
    labels = torch.as_tensor(data.labels(TRAIN))
    gen = torch.Generator().manual_seed(spec.seed)
    batches = iter_batches(labels.shape[0], spec.budget.batch_size, gen)
    alpha, temp = spec.params["alpha"], spec.params["temperature"]
    times = []
    meter = CostMeter(torch.device("cpu"))
    with meter:
        for _ in range(steps):
            t0 = time.perf_counter()
            index = next(batches)
            inputs = factory.collate(encoded[TRAIN], index)
            y = labels[index]
            with torch.no_grad():
                t_logits = teacher(inputs).logits
            s_logits = student(inputs).logits
            loss = alpha * soft_loss(s_logits, t_logits, temp, data.task.problem) + (1 - alpha) * torch.nn.functional.cross_entropy(s_logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            times.append(time.perf_counter() - t0)
    return {"step_s_median": float(np.median(times)), "peak_mem_increase_mb": meter.summary()["peak_mem_increase_mb"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random BERTs (fast; for CI)")
    ap.add_argument("--json", action="store_true", help="end with one line of JSON holding the ratios")
    ap.add_argument("--steps", type=int, default=None, help="steps per variant (the median absorbs warm-up)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (30 if args.tiny else 40)

    pm, broken = make_plugin_manager()
    pm.register(sys.modules[__name__], name="bench-text")
    registry = Registry(pm, broken)
    suite = build_suite(suite_dict(args.tiny, steps, args.batch), registry=registry)
    by_method = {r.method: r for r in suite.runs}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore(Path(tmp) / "store.sqlite")
        live = Runner(tmp, registry, device="cpu", progress=False, share_teacher_outputs=False)
        shared = Runner(tmp, registry, device="cpu", progress=False, share_teacher_outputs=True)
        teacher = provide_teacher(suite.runs[0], Path(tmp), store, registry, live.device)  # the teachers-first phase

        def through_kdbench(runner: Runner, spec) -> dict:
            store.claim(spec, rerun=True)
            result = runner.run(spec, teacher)
            store.finish(spec, result.status, cost=result.cost, error=result.error)
            if result.status != "done":
                raise SystemExit(f"{spec.method} {result.status}: {result.error}")
            cost = result.cost
            return {"step_s_median": cost["step_s_median"], "peak_mem_increase_mb": cost["peak_mem_increase_mb"]}

        # the shared-teacher logits are computed (once) before timing starts
        kd = by_method["kd"]
        results["bare"] = bare_loop(live, kd, steps)
        results["kd"] = through_kdbench(live, kd)
        results["kd_shared_teacher"] = through_kdbench(shared, kd)
        for name in ("metadistil", "prokt", "pkd", "tinybert"):
            results[name] = through_kdbench(live, by_method[name])
        results["bare_again"] = bare_loop(live, kd, steps)  # drift check: both ends of the run

    base = results["kd"]["step_s_median"]
    base_mem = max(results["kd"]["peak_mem_increase_mb"], 1e-9)
    bare = min(results["bare"]["step_s_median"], results["bare_again"]["step_s_median"])
    setup = "tiny random BERTs" if args.tiny else "MiniLM-L6 teacher, 3-layer student"
    print(f"step cost: {setup}, batch {args.batch}, length {LENGTH}, {args.threads} threads, {steps} steps per variant, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'variant':<20}{'s/step (median)':>17}{'vs kd':>8}{'peak mem +MB':>14}{'vs kd':>8}")
    for name, r in results.items():
        print(f"{name:<20}{r['step_s_median']:>17.4f}{r['step_s_median'] / base:>8.2f}{r['peak_mem_increase_mb']:>14.1f}"
              f"{r['peak_mem_increase_mb'] / base_mem:>8.2f}")
    ratios = {
        "metadistil_over_kd": results["metadistil"]["step_s_median"] / base,
        "prokt_over_kd": results["prokt"]["step_s_median"] / base,
        "pkd_over_kd": results["pkd"]["step_s_median"] / base,
        "tinybert_over_kd": results["tinybert"]["step_s_median"] / base,
        "shared_teacher_kd_over_kd": results["kd_shared_teacher"]["step_s_median"] / base,
        "framework_overhead": base / bare - 1.0,
        "metadistil_peak_mem_over_kd": results["metadistil"]["peak_mem_increase_mb"] / base_mem,
    }
    print(f"framework overhead (kdbench KD step vs bare loop): {100 * ratios['framework_overhead']:+.1f}%")
    if args.json:
        print(json.dumps({"setup": setup, "ratios": ratios, "seconds": {k: v["step_s_median"] for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
