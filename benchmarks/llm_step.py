"""What a language-model distillation step costs, per method, split into generation and
update, and what the KV cache saves when sampling.

Reference tiny pair (the first llm-cpu design's models, kept so figures stay comparable
across sessions; llm-cpu now uses a 2x128 teacher and a 1x32 student): teacher a random
Llama of 4 blocks, width 128; student 2 blocks, width 64; the character tokenizer; batches of 32 addition
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
no-cache over cache seconds per generated token (the target: >= 3 at length 64), in wall
seconds and in the process's CPU seconds (what a loaded machine inflates far less). Beside
it, per length, one cached step (one new position against a cache of the rest) and one
full forward of the whole sequence, each per generated token: where the cached step costs
far more than ``1 / length`` of the full forward, the forward is bound by its fixed cost
per call (a few hundred small operators), not by the positions it processes, and no
cache can save more than that ratio. ``--gen-width W`` decodes with a student of width
``W`` instead (2 blocks, 4 heads, MLP ``3W``; the methods keep the reference pair), to
show the ratio where compute dominates; ``--kv-only`` skips the methods; ``--threads``
sets torch's intra-op threads (default: torch's own choice, printed).

    python benchmarks/llm_step.py                 # reference pair
    python benchmarks/llm_step.py --tiny          # tiny models, 1 round: seconds (the test's structure check)
    python benchmarks/llm_step.py --kv-only --gen-width 512   # the KV cache alone, a wider student
    python benchmarks/llm_step.py --json out.json # also write the figures as JSON
    python benchmarks/llm_step.py --real          # llm-real-cpu's sizes (needs the SmolLM2 asset)
    python benchmarks/llm_step.py --trl           # kdbench's gkd step vs TRL's GKDTrainer (the peers extra)

``--real`` sizes ``benchmarks/llm-real-cpu.yaml``: its SmolLM2-135M teacher and the student
cut from it (blocks 0, 10, 20, 29), its Shakespeare options and batch, every method of the
suite; per method the step split into generation and update, the once-per-teacher caches
(top-k log-probs, seqkd's greedy outputs) timed on ``--cache-examples`` training examples
and scaled to the training split, and one evaluation batch (teacher-forced NLL plus
greedy decoding). It prints the estimated hours of the suite per method (steps x step +
its share of the caches + evaluations, x seeds).

``--trl`` compares one on-policy GKD step (lambda 1: every batch is the student's own
samples; beta 0.5; temperature 1, the one temperature at which the two compute the same
loss: TRL samples at its ``temperature`` but its ``compute_loss`` takes the divergence at
1) of kdbench's ``gkd`` with TRL's ``GKDTrainer.training_step`` plus its optimizer step,
on copies of the same student, the same teacher and the same batch (prompts of one length,
so TRL's layout, which takes positions from the sequence index, reads the same
positions), up to ``--gkd-new-tokens`` sampled tokens. First the two losses are
compared on the same sampled responses (kdbench's samples put in TRL's layout: prompt ++
response, prompt and padding labelled -100): the run stops if they differ. Then the
steps are interleaved over the rounds, each split into generation (TRL: its
``generate_on_policy_outputs``, timed by wrapping it) and update; the ratio is kdbench over
TRL per round (target: at most 1.0), in wall seconds and in the process's CPU seconds
(``cpu_ratio``: the figure a loaded machine inflates least); no gradient clipping on
either side. Memory: each framework's step runs again in a fresh process; its resident
set before the steps and its high-water mark during them (reset first), the difference
is what a step adds. TRL is the ``peers`` extra (``pip install -e '.[peers]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
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


REAL_SUITE = Path(__file__).with_name("llm-real-cpu.yaml")


def real_sizing(rounds: int, steps: int, cache_examples: int, cache_dir: Path) -> dict[str, Any]:
    """The ``--real`` figures (see the module doc)."""
    import yaml

    from kdbench_plugins.tasks.shakespeare import Shakespeare, ShakespeareOptions

    suite = yaml.safe_load(REAL_SUITE.read_text())
    factory = CausalLMFactory()
    t_opts, s_opts = CausalLMOptions(**suite["teacher"]["options"]), CausalLMOptions(**suite["students"][0]["options"])
    t0 = time.perf_counter()
    teacher = factory.build(t_opts, Problem("generation", 1)).eval()
    student = factory.build(s_opts, Problem("generation", 1))
    load_s = time.perf_counter() - t0
    task = Shakespeare(ShakespeareOptions(**suite["tasks"][0]["options"]))
    data = task.load(str(cache_dir))
    encoded = factory.encode(s_opts, data["train"], task.max_length)
    n_train = next(iter(encoded.values())).shape[0]
    subset = {k: v[:cache_examples] for k, v in encoded.items()}  # the caches are timed on these, then scaled
    batch_size, budget = suite["budget"]["batch_size"], suite["budget"]
    methods = {m["name"] + (f" {m['params']}" if m.get("params") else ""): (m["name"], m.get("params", {})) for m in suite["methods"]}
    contexts, cache_s, cache_cpu_s = {}, {}, {}
    for label, (name, params) in methods.items():
        t1, c1 = time.perf_counter(), time.process_time()
        contexts[label] = context(name, params, teacher, student, factory, subset, batch_size)
        cache_s[label] = (time.perf_counter() - t1) * n_train / cache_examples  # setup: the caches over the subset, scaled
        cache_cpu_s[label] = (time.process_time() - c1) * n_train / cache_examples
    idx = torch.arange(batch_size)
    batch = Batch(factory.collate(encoded, idx), idx.float(), idx)
    per = interleaved(contexts, batch, rounds, steps, warm=True)
    eval_idx = torch.arange(budget.get("eval_batch_size", 16))
    eval_inputs = factory.collate(encoded, eval_idx)
    t1, c1 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        student(eval_inputs)
        student.generate(eval_inputs, task.max_new_tokens, greedy=True)
    eval_batch_s, eval_batch_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    n_eval = sum(len(data[s]["prompt"]) for s in ("validation", "test"))
    evals = max(budget["steps"] // budget["eval_every"], 1)
    eval_run_s = eval_batch_s * n_eval / len(eval_idx) * evals
    eval_run_cpu_s = eval_batch_cpu_s * n_eval / len(eval_idx) * evals
    seeds, threads = len(suite["seeds"]), torch.get_num_threads()
    figures = {m: {k: spread(v) for k, v in fig.items()} for m, fig in per.items()}
    hours = {m: (seeds * (budget["steps"] * figures[m]["step_s"]["median"] + eval_run_s) + cache_s[m]) / 3600 for m in figures}
    # a quiet machine's wall clock, were the threads busy all the time: CPU seconds / threads (a lower bound)
    quiet = {m: (seeds * (budget["steps"] * figures[m]["cpu_s"]["median"] + eval_run_cpu_s) + cache_cpu_s[m]) / threads / 3600 for m in figures}
    return {"setup": {"suite": str(REAL_SUITE.name), "train_examples": n_train, "batch": batch_size, "steps": budget["steps"],
                      "seeds": seeds, "cache_examples": cache_examples, "rounds": rounds, "steps_per_round": steps,
                      "model_load_s": load_s, "threads": threads, "torch": torch.__version__, "load_average": os.getloadavg()},
            "methods": figures, "cache_s_full_split": cache_s, "cache_cpu_s_full_split": cache_cpu_s, "eval_run_s": eval_run_s,
            "eval_run_cpu_s": eval_run_cpu_s, "estimated_hours": hours, "estimated_hours_from_cpu": quiet}


def interleaved(contexts: dict[str, tuple[Any, StepContext]], batch: Batch, rounds: int, steps: int, warm: bool) -> dict[str, dict[str, list[float]]]:
    """Each method's median step of ``steps`` per round, split into generation and update,
    the methods interleaved within each round (a discarded warm-up round first if ``warm``).
    ``cpu_s``: the process's CPU seconds over the same step (all threads), a figure a
    loaded machine inflates far less than the wall clock."""
    per: dict[str, dict[str, list[float]]] = {m: {"step_s": [], "generation_s": [], "update_s": [], "cpu_s": []} for m in contexts}
    for r in range(rounds + int(warm)):
        for name, (method, ctx) in contexts.items():
            times, gens, cpus = [], [], []
            for _ in range(steps):
                before = ctx.timings.get("generation", 0.0)
                t0, c0 = time.perf_counter(), time.process_time()
                method.train_step(ctx, batch)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                gens.append(ctx.timings.get("generation", 0.0) - before)
            if not (warm and r == 0):
                k = int(np.argsort(times)[len(times) // 2])
                per[name]["step_s"].append(times[k])
                per[name]["generation_s"].append(gens[k])
                per[name]["update_s"].append(times[k] - gens[k])
                per[name]["cpu_s"].append(cpus[k])
    return per


GKD_PAIR = {"beta": 0.5, "lmbda": 1.0, "temperature": 1.0}


def equal_prompt_batch(factory: Any, encoded: dict[str, torch.Tensor], size: int) -> Batch:
    """``size`` examples whose prompts have one length (the most common): no prompt padding."""
    lengths = encoded["prompt_mask"].sum(1)
    common = int(torch.mode(lengths).values)
    idx = torch.nonzero(lengths == common).squeeze(1)[:size]
    if len(idx) < size:
        raise SystemExit(f"only {len(idx)} prompts of length {common}; ask for a smaller batch")
    return Batch(factory.collate(encoded, idx), idx.float(), idx)


def trl_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prompt/response batch in TRL's GKD layout: ``input_ids`` prompt ++ response,
    ``labels`` -100 on the prompt and on padding, ``prompts`` and their mask."""
    p, pm, r, rm = inputs["prompt_ids"], inputs["prompt_mask"], inputs["response_ids"], inputs["response_mask"]
    ids, att = torch.cat([p, r], 1), torch.cat([pm, rm], 1).long()
    labels = ids.clone()
    labels[:, : p.shape[1]] = -100
    labels[att == 0] = -100
    return {"input_ids": ids, "attention_mask": att, "labels": labels, "prompts": p, "prompt_attention_mask": pm.long()}


def hf_char_tokenizer() -> Any:
    """The character tokenizer as a transformers tokenizer (TRL reads its pad id; nothing is encoded with it)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from kdbench_plugins.models.causal_lm import CharTokenizer

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: 3 + i for i, c in enumerate(CharTokenizer.CHARS)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>",
                                   bos_token="<bos>", eos_token="<eos>")


def trl_trainer(student_lm: Any, teacher_lm: Any, batch: Batch, new_tokens: int, out_dir: Path) -> Any:
    """TRL's GKDTrainer on these models (lambda 1, beta 0.5, temperature 1, AdamW lr 1e-3),
    its collator handing out ``batch``; its optimizer made; its sampling timed into
    ``trainer.generation_s``."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = GKDConfig(output_dir=str(out_dir), per_device_train_batch_size=batch.labels.shape[0], lmbda=GKD_PAIR["lmbda"], beta=GKD_PAIR["beta"],
                     temperature=GKD_PAIR["temperature"], max_new_tokens=new_tokens, learning_rate=1e-3, report_to=[], use_cpu=True,
                     save_strategy="no", logging_strategy="no", max_steps=10_000, seed=0, disable_dropout=True)
    trainer = GKDTrainer(model=student_lm, teacher_model=teacher_lm, args=args, data_collator=lambda features: trl_inputs(batch.inputs),
                         train_dataset=Dataset.from_dict({"row": list(range(batch.labels.shape[0]))}), processing_class=hf_char_tokenizer())
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's own loop sets before its first training_step
    trainer.generation_s = 0.0
    generate = trainer.generate_on_policy_outputs

    def timed_generate(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            trainer.generation_s += time.perf_counter() - t0

    trainer.generate_on_policy_outputs = timed_generate
    return trainer


def trl_step(trainer: Any, batch: Batch) -> None:
    """One GKDTrainer step: its training_step (sampling, loss, backward) and the optimizer step."""
    trainer.model.train()
    trainer.training_step(trainer.model, trl_inputs(batch.inputs))
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.model.zero_grad(set_to_none=True)


def check_equal_losses(method: Any, ctx: StepContext, trainer: Any, batch: Batch, new_tokens: int) -> dict[str, float]:
    """Both losses on the same student samples (kdbench's, put in TRL's layout), before any step."""
    from kdbench.generation import sample_batch

    sampled, _ = sample_batch(ctx, ctx.student, batch, new_tokens, GKD_PAIR["temperature"], "equality-check")
    with torch.no_grad():
        ours, _ = method.loss(ctx.student(sampled.inputs), ctx.teacher_forward(sampled, method.teacher_needs), sampled, ctx)
        theirs = trainer.compute_loss(trainer.model, trl_inputs(sampled.inputs))
    a, b = float(ours), float(theirs)
    if not abs(a - b) <= 1e-5 * max(abs(a), abs(b)):
        raise SystemExit(f"the losses differ on the same samples: kdbench {a!r}, TRL {b!r}; no timing")
    return {"kdbench": a, "trl": b, "rel_diff": abs(a - b) / max(abs(a), abs(b), 1e-30)}


def gkd_setup(size: dict[str, Any], new_tokens: int, out_dir: Path) -> tuple[Any, StepContext, Any, Batch]:
    factory, teacher, student, encoded = build(size)
    batch = equal_prompt_batch(factory, encoded, size["batch"])
    method, ctx = context("gkd", {**GKD_PAIR, "max_new_tokens": new_tokens}, teacher, student, factory, encoded, size["batch"])
    trainer = trl_trainer(copy.deepcopy(student.lm), teacher.lm, batch, new_tokens, out_dir)
    return method, ctx, trainer, batch


def trl_comparison(size: dict[str, Any], rounds: int, steps: int, new_tokens: int) -> dict[str, Any]:
    """The ``--trl`` figures (see the module doc)."""
    import tempfile

    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        method, ctx, trainer, batch = gkd_setup(size, new_tokens, Path(tmp))
        equal = check_equal_losses(method, ctx, trainer, batch, new_tokens)
        keys = ("kdbench_step_s", "kdbench_generation_s", "kdbench_cpu_s", "trl_step_s", "trl_generation_s", "trl_cpu_s", "ratio", "cpu_ratio")
        fig: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(rounds + 1):  # round 0 warms up, discarded
            per: dict[str, list[tuple[float, float, float]]] = {"kdbench": [], "trl": []}
            for _ in range(steps):
                g0, t0, c0 = ctx.timings.get("generation", 0.0), time.perf_counter(), time.process_time()
                method.train_step(ctx, batch)
                per["kdbench"].append((time.perf_counter() - t0, ctx.timings.get("generation", 0.0) - g0, time.process_time() - c0))
                g0, t0, c0 = trainer.generation_s, time.perf_counter(), time.process_time()
                trl_step(trainer, batch)
                per["trl"].append((time.perf_counter() - t0, trainer.generation_s - g0, time.process_time() - c0))
            if r:
                for who, xs in per.items():
                    step, gen, _ = sorted(xs)[len(xs) // 2]
                    fig[f"{who}_step_s"].append(step)
                    fig[f"{who}_generation_s"].append(gen)
                    fig[f"{who}_cpu_s"].append(float(np.median([x[2] for x in xs])))
                fig["ratio"].append(fig["kdbench_step_s"][-1] / fig["trl_step_s"][-1])
                fig["cpu_ratio"].append(fig["kdbench_cpu_s"][-1] / fig["trl_cpu_s"][-1])
    versions = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    return {"setup": {"batch": size["batch"], "max_new_tokens": new_tokens, "rounds": rounds, "steps_per_round": steps, **GKD_PAIR,
                      "prompt_length": int(batch.inputs["prompt_ids"].shape[1]), "versions": versions, "threads": torch.get_num_threads(),
                      "load_average": os.getloadavg()},
            "equal_loss": equal, "figures": {k: spread(v) for k, v in fig.items()}}


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB; NaN where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    return float("nan")


def gkd_memory(who: str, size: dict[str, Any], steps: int, new_tokens: int) -> dict[str, float]:
    """Memory of ``steps`` steps of ``who`` alone in this process: the resident set before
    them and its high-water mark during them (Linux: the mark is reset first through
    /proc/self/clear_refs, so setup's own peak does not hide the steps'), in MB."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        method, ctx, trainer, batch = gkd_setup(size, new_tokens, Path(tmp))
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _proc_status_mb("VmRSS")
        for _ in range(steps):
            method.train_step(ctx, batch) if who == "kdbench" else trl_step(trainer, batch)
        peak = _proc_status_mb("VmHWM")
        return {"rss_before_steps_mb": before, "peak_rss_during_steps_mb": peak, "steps_added_mb": peak - before}


def report_trl(out: dict[str, Any], size_flag: list[str], steps: int, new_tokens: int, json_path: Path | None) -> int:
    import subprocess

    mem = {}
    for who in ("kdbench", "trl"):
        cmd = [sys.executable, __file__, "--gkd-memory", who, "--steps", str(steps), "--gkd-new-tokens", str(new_tokens), *size_flag]
        mem[who] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    out["memory"] = mem
    s, f = out["setup"], out["figures"]
    print(f"on-policy GKD step (lambda {s['lmbda']}, beta {s['beta']}, T {s['temperature']}), batch {s['batch']} x prompt {s['prompt_length']}, "
          f"up to {s['max_new_tokens']} new tokens; {', '.join(f'{k} {v}' for k, v in s['versions'].items())}; {s['threads']} thread(s), "
          f"load average {', '.join(f'{x:.1f}' for x in s['load_average'])} at the end")
    print(f"equal loss on the same samples: kdbench {out['equal_loss']['kdbench']:.8f}, TRL {out['equal_loss']['trl']:.8f} "
          f"(relative difference {out['equal_loss']['rel_diff']:.1e})")
    for k, v in f.items():
        print(f"{k:22s} {v['median']:.4f} [{v['min']:.4f}, {v['max']:.4f}]")
    for who, m in mem.items():
        print(f"{who:8s} RSS before its steps {m['rss_before_steps_mb']:.0f} MB, peak during them {m['peak_rss_during_steps_mb']:.0f} MB "
              f"(+{m['steps_added_mb']:.1f} MB), a process of its own")
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=2))
    return 0


def timed(call: Any) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of ``call()``: the wall clock and the process's CPU time (all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - t0, time.process_time() - c0


def with_width(size: dict[str, Any], width: int | None) -> dict[str, Any]:
    """``size`` with its student ``width`` wide (4 heads, MLP 3 x width), or as it is."""
    if width is None:
        return size
    if width % 8:
        raise SystemExit(f"--gen-width must be a multiple of 8 (4 heads of an even width), got {width}")
    return {**size, "student": {**size["student"], "hidden": width, "intermediate": 3 * width, "heads": 4}}


@torch.no_grad()
def forward_costs(lm: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor, at: list[int]) -> dict[int, dict[str, float]]:
    """Per new-token index ``n`` in ``at``: one cached step (position ``P + n - 1`` fed
    against a cache of the ``P + n - 1`` before it, the prefill untimed) and one full
    forward of all ``P + n`` positions, in seconds per generated token (a step makes one
    token per row), wall and CPU; the sequence is the prompts and ``tokens`` decoded after them."""
    from kdbench.generation import cache_argument, last_logits_argument, positions

    cache_arg, keep = cache_argument(lm), last_logits_argument(lm)
    ids = torch.cat([prompt_ids, tokens], 1)
    mask = torch.cat([prompt_mask.long(), torch.ones_like(tokens)], 1)
    pos, rows, p = positions(mask), ids.shape[0], prompt_ids.shape[1]
    was = lm.training
    lm.eval()
    out: dict[int, dict[str, float]] = {}
    for n in at:
        end = p + n
        full = timed(lambda: lm(input_ids=ids[:, :end], attention_mask=mask[:, :end], position_ids=pos[:, :end], use_cache=False, **keep))
        past = getattr(lm(input_ids=ids[:, :end - 1], attention_mask=mask[:, :end - 1], position_ids=pos[:, :end - 1], use_cache=True, **keep), cache_arg)
        step = timed(lambda: lm(input_ids=ids[:, end - 1:end], attention_mask=mask[:, :end], position_ids=pos[:, end - 1:end], use_cache=True,
                                **{cache_arg: past}, **keep))
        out[n] = {"length": end, "cached_step_s_per_token": step[0] / rows, "full_forward_s_per_token": full[0] / rows,
                  "cached_step_cpu_s_per_token": step[1] / rows, "full_forward_cpu_s_per_token": full[1] / rows}
    lm.train(was)
    return out


def kv_cache(lm: Any, batch: Batch, length: int, rounds: int) -> dict[str, Any]:
    """Greedy decoding with and without the cache, alternating, ``rounds`` times; then the
    per-length costs (:func:`forward_costs`) as many times, each figure's spread over rounds."""
    p_ids, p_mask = batch.inputs["prompt_ids"], batch.inputs["prompt_mask"]
    keys = ("cache_s_per_token", "no_cache_s_per_token", "ratio", "cache_cpu_s_per_token", "no_cache_cpu_s_per_token", "cpu_ratio")
    kv: dict[str, list[float]] = {k: [] for k in keys}
    tokens = None
    for _ in range(rounds):  # cache and no cache alternate, round by round
        for use_cache, label in ((True, "cache"), (False, "no_cache")):
            c0 = time.process_time()  # -1: never stops: all `length` tokens
            g = decode(lm, p_ids, p_mask, length, eos_token_id=-1, pad_token_id=0, use_cache=use_cache)
            kv[f"{label}_cpu_s_per_token"].append((time.process_time() - c0) / g.tokens.numel())
            kv[f"{label}_s_per_token"].append(g.seconds / g.tokens.numel())
            if tokens is None:
                tokens = g.tokens
            elif not torch.equal(tokens, g.tokens):
                raise SystemExit("decoding with and without the cache gave different tokens; no timing")
        kv["ratio"].append(kv["no_cache_s_per_token"][-1] / kv["cache_s_per_token"][-1])
        kv["cpu_ratio"].append(kv["no_cache_cpu_s_per_token"][-1] / kv["cache_cpu_s_per_token"][-1])
    at = sorted({1, *range(16, length, 16), length - 1} & set(range(1, length)))
    per_round = [forward_costs(lm, p_ids, p_mask, tokens, at) for _ in range(rounds)]
    by_length = {n: {k: spread([r[n][k] for r in per_round]) for k in per_round[0][n] if k != "length"} | {"length": per_round[0][n]["length"]}
                 for n in at}
    return {"kv_cache": {k: spread(v) for k, v in kv.items()}, "by_length": by_length}


def print_kv(out: dict[str, Any], length: int, rounds: int) -> None:
    setup = out["setup"]
    print(f"KV cache, student width {setup['gen_width']}, batch {setup['batch']}, {setup['threads']} thread(s), load average "
          f"{', '.join(f'{x:.1f}' for x in setup['load_average'])} at the start")
    for label, key in (("wall", "ratio"), ("CPU", "cpu_ratio")):
        r = out["kv_cache"][key]
        c = out["kv_cache"]["cache_s_per_token" if key == "ratio" else "cache_cpu_s_per_token"]["median"]
        n = out["kv_cache"]["no_cache_s_per_token" if key == "ratio" else "no_cache_cpu_s_per_token"]["median"]
        print(f"  at length {length}, {label:4s} seconds: no-cache / cache per token {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}] over {rounds} "
              f"round(s) (cache {c * 1e6:.1f} us, no cache {n * 1e6:.1f} us per token)")
    print(f"  {'new token':>9s} {'length':>6s} {'cached step us/token':>22s} {'full forward us/token':>22s} {'full / cached':>13s}   (CPU)")
    for n, f in out["by_length"].items():
        step, full = f["cached_step_cpu_s_per_token"]["median"], f["full_forward_cpu_s_per_token"]["median"]
        print(f"  {n:>9d} {f['length']:>6d} {step * 1e6:>22.1f} {full * 1e6:>22.1f} {full / step:>13.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models, one round, one step: structure only")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--gen-length", type=int, default=None)
    ap.add_argument("--gen-width", type=int, default=None, help="KV cache: decode with a student this wide (default: the reference student's)")
    ap.add_argument("--kv-only", action="store_true", help="only the KV-cache figures (no method steps)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads, every mode (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--real", action="store_true", help="llm-real-cpu's models and sizes (the SmolLM2 asset)")
    ap.add_argument("--cache-examples", type=int, default=32, help="--real: training examples the caches are timed on")
    ap.add_argument("--cache-dir", type=Path, default=Path(".kdbench-cache"), help="--real: where the Shakespeare archive is kept")
    ap.add_argument("--trl", action="store_true", help="kdbench's gkd step against TRL's GKDTrainer (lambda 1)")
    ap.add_argument("--gkd-new-tokens", type=int, default=None, help="--trl: tokens sampled per step (default 10; --tiny 6)")
    ap.add_argument("--gkd-memory", choices=["kdbench", "trl"], default=None, help=argparse.SUPPRESS)  # --trl's subprocesses
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.trl or args.gkd_memory:
        size = TINY if args.tiny else REFERENCE
        new_tokens = args.gkd_new_tokens or (6 if args.tiny else 10)
        steps = args.steps or (1 if args.tiny else 5)
        if args.gkd_memory:
            print(json.dumps(gkd_memory(args.gkd_memory, size, steps, new_tokens)))
            return 0
        out = trl_comparison(size, args.rounds or (1 if args.tiny else 5), steps, new_tokens)
        flags = (["--tiny"] if args.tiny else []) + ([] if args.threads is None else ["--threads", str(args.threads)])
        return report_trl(out, flags, steps, new_tokens, args.json)
    if args.real:
        return report_real(real_sizing(args.rounds or 2, args.steps or 2, args.cache_examples, args.cache_dir), args.json)
    size = TINY if args.tiny else REFERENCE
    rounds = args.rounds or (1 if args.tiny else 5)
    steps = args.steps or (1 if args.tiny else 5)
    length = args.gen_length or (8 if args.tiny else 64)
    setup = {"tiny": args.tiny, "rounds": rounds, "steps_per_round": steps, "batch": size["batch"], "gen_length": length,
             "gen_width": with_width(size, args.gen_width)["student"]["hidden"], "threads": torch.get_num_threads(), "torch": torch.__version__,
             "load_average": os.getloadavg()}
    factory, teacher, student, encoded = build(size)
    idx = torch.arange(size["batch"])
    batch = Batch(factory.collate(encoded, idx), idx.float(), idx)
    out: dict[str, Any] = {"setup": setup}
    if not args.kv_only:
        contexts = {name: context(name, params, teacher, student, factory, encoded, size["batch"]) for name, params in METHODS.items()}
        per = interleaved(contexts, batch, rounds, steps, warm=not args.tiny)
        out["methods"] = {m: {k: spread(v) for k, v in fig.items()} for m, fig in per.items()}
        print(f"{'method':10s} {'step s':>22s} {'generation s':>22s} {'update s':>22s}")
        for m, fig in out["methods"].items():
            cells = [f"{fig[k]['median']:.4f} [{fig[k]['min']:.4f}, {fig[k]['max']:.4f}]" for k in ("step_s", "generation_s", "update_s")]
            print(f"{m:10s} " + " ".join(f"{c:>22s}" for c in cells))
    gen_student = student if args.gen_width is None else build(with_width(size, args.gen_width))[2]
    out.update(kv_cache(gen_student.lm, batch, length, rounds))
    out["memory"] = {"peak_rss_mb": peak_rss_mb()}
    print_kv(out, length, rounds)
    print(f"peak RSS {out['memory']['peak_rss_mb']:.0f} MB (the whole process)")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def report_real(out: dict[str, Any], json_path: Path | None) -> int:
    """Print (and write) the ``--real`` figures; the suite's total counts each shared cache once."""
    out["memory"] = {"peak_rss_mb": peak_rss_mb()}
    print(f"load average {', '.join(f'{x:.1f}' for x in out['setup']['load_average'])} at the end; {out['setup']['threads']} threads")
    print(f"{'method':52s} {'step s':>22s} {'generation s':>22s} {'step CPU s':>11s} {'cache s':>8s} {'cache CPU s':>11s} {'hours':>6s} {'h (CPU/threads)':>15s}")
    for m, fig in out["methods"].items():
        step, gen = fig["step_s"], fig["generation_s"]
        print(f"{m:52s} {step['median']:.3f} [{step['min']:.3f}, {step['max']:.3f}]".ljust(75)
              + f" {gen['median']:.3f} [{gen['min']:.3f}, {gen['max']:.3f}]".rjust(23)
              + f" {fig['cpu_s']['median']:11.2f} {out['cache_s_full_split'][m]:8.0f} {out['cache_cpu_s_full_split'][m]:11.0f}"
              + f" {out['estimated_hours'][m]:6.2f} {out['estimated_hours_from_cpu'][m]:15.2f}")
    print(f"evaluation per run {out['eval_run_s']:.0f} s ({out['eval_run_cpu_s']:.0f} CPU s); model load {out['setup']['model_load_s']:.0f} s; "
          f"peak RSS {out['memory']['peak_rss_mb']:.0f} MB")
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=2))
    return 0


def peak_rss_mb() -> float:
    with contextlib.suppress(ImportError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
