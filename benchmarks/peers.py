"""kdbench's distillation step side by side with the tools a user would pick instead:
torchdistill (vision) and TextBrewer (text), on the same models, weights and data, in one
process.

    python benchmarks/peers.py OUT                 # every pair, reference sizes, 3 rounds
    python benchmarks/peers.py OUT --rounds 5      # more rounds (the printed estimate grows)
    python benchmarks/peers.py OUT --tiny          # tiny random models: seconds, for CI
    python benchmarks/peers.py OUT --check-only    # the loss-equality checks, no timing
    python benchmarks/peers.py OUT --pairs vision-kd,text-tinybert
    python benchmarks/peers.py OUT --summarise     # OUT's summary again from its raw rounds

``make peers`` makes the separate environment (``.venv-peers``: the peers need torchvision,
whose PyPI wheels import only beside their own, CUDA, torch build) and runs this script
there; docs/peers.md says what it measures and how to read it.

The pairs (:data:`PAIRS`): ``vision-kd`` is Hinton KD from the CIFAR zoo's resnet56 to
resnet20 at batch 64 (kdbench ``kd`` against torchdistill's ``DistillationBox`` built from
its configuration dict with ``KDLoss`` from its loss registry); ``text-kd``, ``text-pkd``
and ``text-tinybert`` distil the MiniLM-L6 teacher into its first 3 layers at batch 16,
length 64 (kdbench ``kd``/``pkd``/``tinybert`` against TextBrewer's ``GeneralDistiller``
with the matching ``DistillationConfig``). The data are synthetic (random images; random
sentences of exactly 64 tokens, so no padding anywhere); the teachers are used as built.

Both sides run the same network code (the peers get kdbench's model objects behind a thin
``nn.Module`` adapter that a user of those tools would write), so the figures compare the
frameworks around the networks: data, loss assembly, hooks, bookkeeping, optimizer step.

Before any timing, each pair computes its loss on one batch with identical weights and
dropout masks, prints both values, and compares the students' gradients; a pair whose
values differ beyond rounding is not timed (see :func:`check_equal`). Where the two tools
define a term differently by a constant of the teacher alone (TextBrewer's soft
cross-entropy is the KL plus the teacher's entropy), the constant is computed separately,
printed, and subtracted; the gradients must then agree as they are.

Timing follows benchmarks/step_cost.py: every kdbench training step (its runner's own
recorded step: batch, step, logging) is paired with one peer step run right after it; a
round's ratio is the median of the per-step ratios (first two steps left out); rounds are
interleaved after a discarded warm-up round, reported as median [min, max]. Every round is
a fresh run on both sides: kdbench's run builds its student and optimizer, and the peer is
built again from the same initial weights (before 2026-12-06 23:40 UTC the peer's student and
optimizer state carried over from round to round, so only kdbench paid a fresh run's first
steps). Memory: the
peak resident memory increase of an unpaired warm-up run of each side, and the most memory
held by live tensors in one more such run under torch.profiler (:func:`tensor_peak_mb`). Both sides run in
this process with the same torch thread count (set, then checked before every round), the
same deterministic-kernel setting (the peer steps run inside the kdbench run's scope) and
the same allocator setting. The raw rounds and step pairs go to OUT as JSON and CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import step_cost  # noqa: E402  (the bench-text task, the step pairing, spread)
import kdbench.train.runner as runner_module  # noqa: E402
from kdbench.api import STUDENT, TEACHER, Batch, Examples, Options, Problem, RunStreams, Task  # noqa: E402
from kdbench.data import TRAIN, labels_tensor, load_task_data  # noqa: E402
from kdbench.hookspecs import hookimpl  # noqa: E402
from kdbench.registry import Registry, make_plugin_manager  # noqa: E402
from kdbench.spec import RunSpec, build_suite  # noqa: E402
from kdbench.store import ResultsStore  # noqa: E402
from kdbench.train import CostMeter, Runner, encoded_splits, seed_everything  # noqa: E402
from kdbench.train.environment import deterministic_cpu  # noqa: E402
from kdbench.train.inputs import ResolvedModel  # noqa: E402
from kdbench.train.loop import batches  # noqa: E402
from kdbench.train.teachers import load_teacher, provide_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 4
PAIR_SKIP = step_cost.PAIR_SKIP
#: what a step's time is read from: wall time (the figure for an idle machine), or the CPU time of
#: this process (all its threads; both sides alike), which other jobs on a loaded machine move far less
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock: Callable[[], float] = time.perf_counter  # the peers' steps read it; step_clock() sets it and the runner's alike
LOSS_RTOL = 1e-5  # float32 sums in another order: a few units in the 6th digit at most
GRAD_RTOL = 1e-4  # of the largest gradient entry


# --------------------------------------------------------------------------- synthetic vision task


class ImageOptions(Options):
    n_train: int = 2048


class BenchImages(Task):
    """Random 32x32 RGB images (uint8) with random labels of 100 classes: CIFAR-100's shapes."""

    name = "bench-images"
    description = "synthetic CIFAR-shaped images for the peers benchmark"
    modality = "image"
    Options = ImageOptions

    @property
    def problem(self) -> Problem:
        return Problem("classification", 100)

    @property
    def main_metric(self) -> str:
        return "accuracy"

    def load(self, cache_dir: str) -> Examples:
        rng = np.random.default_rng(0)

        def split(n: int) -> dict:
            return {"image": rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), "label": rng.integers(0, 100, n)}

        return {"train": split(self.options.n_train), "validation": split(64), "test": split(64)}

    def compute_metrics(self, predictions, labels):
        return {"accuracy": float(np.mean(predictions == labels))}


@hookimpl
def kdbench_tasks():
    return [BenchImages]


def peers_registry() -> Registry:
    """The installed plugins plus ``bench-text`` (step_cost.py) and ``bench-images``."""
    pm, broken = make_plugin_manager()
    pm.register(step_cost, name="bench-text")
    pm.register(sys.modules[__name__], name="bench-images")
    return Registry(pm, broken)


# --------------------------------------------------------------------------- the pairs


@dataclass(frozen=True)
class PairDef:
    """One kdbench method against one peer configuration."""

    name: str
    peer: str  # "torchdistill" or "textbrewer"
    method: str
    params: dict[str, Any]
    definitions: str  # how the two sides' weights correspond (docs/peers.md repeats it)


PAIRS: dict[str, PairDef] = {p.name: p for p in (
    PairDef("vision-kd", "torchdistill", "kd", {"alpha": 0.9, "temperature": 4.0},
            "kdbench kd: alpha*T^2*KL_batchmean + (1-alpha)*CE; torchdistill KDLoss: a*CE + (1-a)*T^2*KL_batchmean; "
            "equal with a = 1 - alpha (0.1)"),
    PairDef("text-kd", "textbrewer", "kd", {"alpha": 0.5, "temperature": 4.0},
            "kdbench kd: alpha*T^2*KL + (1-alpha)*CE; TextBrewer: kd_loss_weight*softCE_T + hard_label_weight*CE, softCE without T^2; "
            "kd_loss_weight = alpha*T^2, hard_label_weight = 1-alpha; softCE = KL + H(p_t^T), so the values differ by "
            "alpha*T^2*H(p_t^T), a constant of the teacher (subtracted; gradients equal)"),
    PairDef("text-pkd", "textbrewer", "pkd", {"alpha": 0.7, "temperature": 10.0, "beta": 500.0, "layer_map": "skip", "soft_reduction": "batchmean"},
            "kdbench pkd: alpha*T^2*KL_batchmean + (1-alpha)*CE + beta*mean_i MSE(normalised [CLS]); TextBrewer 'pkd' match: "
            "sum over width of the squared difference, mean over batch (= H x the MSE), per match; match weight = beta/(H*(M-1)), "
            "kd_loss_weight = alpha*T^2, hard_label_weight = 1-alpha; soft term as text-kd (constant alpha*T^2*H(p_t^T) subtracted)"),
    PairDef("text-tinybert", "textbrewer", "tinybert", {"temperature": 1.0, "soft_reduction": "sum"},
            "kdbench tinybert: sum_m MSE(A_s^m, A_t^g(m)) + sum_m MSE(H_s^m W_h, H_t^g(m)) (m = 0..M, one shared W_h) + softCE "
            "summed over classes; TextBrewer: 'attention_mse' and 'hidden_mse' matches (weight 1, the attention scores kdbench's "
            "model gives, input mask all ones) and kd_loss_type 'ce' at T 1; TextBrewer gives each hidden match its own "
            "projection (4 instead of 1): they start as copies of kdbench's W_h, so loss and student gradients are equal"),
)}


def suite_dict(pair: PairDef, tiny: bool, steps: int, batch: int) -> dict:
    """The one-run kdbench suite of a pair."""
    if pair.peer == "torchdistill":
        teacher = {"model": "cifar", "options": {"arch": "resnet14" if tiny else "resnet56"}}
        student = {"model": "cifar", "options": {"arch": "resnet8" if tiny else "resnet20"}}
        task, optimizer = "bench-images", {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "constant"}
    else:
        base = step_cost.suite_dict(tiny, steps, batch)
        teacher, student, task = base["teacher"], base["students"][0], "bench-text"
        optimizer = {"name": "adamw", "lr": 5e-5, "schedule": "linear"}
    return {"name": f"peers-{pair.name}", "tasks": [{"name": task}], "teacher": teacher, "students": [student],
            "methods": [{"name": pair.method, "params": dict(pair.params)}], "seeds": [0],
            # evaluation at the training batch size: the run's peak memory, which includes its final
            # evaluation, is then a training step's (inference keeps no graph), as the peer's is
            "budget": {"steps": steps, "batch_size": batch, "log_every": 10, "eval_batch_size": batch},
            "optimizer": optimizer, "quiz_fraction": 0.0}


def run_spec(registry: Registry, pair: PairDef, tiny: bool, steps: int, batch: int) -> RunSpec:
    return build_suite(suite_dict(pair, tiny, steps, batch), registry=registry).runs[0]


# --------------------------------------------------------------------------- models and kdbench's loss


@dataclass
class Models:
    """A pair's teacher (the kdbench run's checkpoint), a student with the kdbench run's
    initial weights, the method object, its extra modules and the training data."""

    spec: RunSpec
    method: Any
    teacher: nn.Module
    student: nn.Module
    extra: nn.Module | None
    data: Any
    factory: Any
    encoded: dict[str, Tensor]
    labels: Tensor
    first: Batch  # the batch of the equality check
    build_student: Callable[[], nn.Module]  # a student with the run's initial weights (a deep copy would lose the models' capture hooks)


def build_models(registry: Registry, spec: RunSpec, checkpoint: Any) -> Models:
    """What the kdbench run builds before its first step, built the same way (same seed,
    so the same initial student), for the peer and for the equality check."""
    method_cls = registry.method(spec.method)
    data = load_task_data(registry, spec.task, spec.quiz_fraction, spec.data_seed)
    method = method_cls(method_cls.Params(**spec.params), data.objective)
    resolved = ResolvedModel.of(registry, spec.student)
    teacher = load_teacher(checkpoint, spec, registry, data, torch.device("cpu"), ResolvedModel.of(registry, spec.teacher)).eval()
    factory, encoded = encoded_splits(registry, spec, data, spec.student, [TRAIN], resolved)

    def build_student() -> nn.Module:
        seed_everything(spec.seed)
        return resolved.factory.build(resolved.options, data.task.problem)

    student = build_student()
    labels = labels_tensor(data, TRAIN)
    first = next(batches(factory, encoded[TRAIN], labels, spec.budget.batch_size, RunStreams(spec.seed).fresh("data"), torch.device("cpu")))
    extra = method.extra_modules(student, teacher, SimpleNamespace(sample=first, train_size=labels.shape[0], device=torch.device("cpu")))
    return Models(spec, method, teacher, student, extra, data, factory, encoded[TRAIN], labels, first, build_student)


def kdbench_loss(m: Models, student: nn.Module, batch: Batch, extra: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """kdbench's loss on ``batch``: the method's own :meth:`~kdbench.api.Method.loss` on the
    outputs its needs ask for, the teacher in eval mode without grad, as the runner's
    step computes it."""
    with torch.no_grad():
        t_out = m.teacher(batch.inputs_for(TEACHER), need=m.method.teacher_needs)
    s_out = student(batch.inputs_for(STUDENT), need=m.method.student_needs)
    ctx = SimpleNamespace(extra=extra if extra is not None else m.extra, step=0, total_steps=m.spec.budget.steps, problem=m.data.objective)
    return m.method.loss(s_out, t_out, batch, ctx)


def teacher_entropy(teacher_logits: Tensor, temperature: float) -> Tensor:
    """``mean_b H(softmax(t_b / T))``: what TextBrewer's soft cross-entropy adds to the KL."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def definition_offset(pair: PairDef, m: Models, batch: Batch) -> float:
    """The peer's loss minus kdbench's by definition on ``batch``: a constant of the teacher
    (0 where the definitions agree). TextBrewer's kd and pkd configurations weigh the soft
    cross-entropy by alpha*T^2, which adds alpha*T^2*H(p_t^T) to kdbench's alpha*T^2*KL."""
    if pair.peer != "textbrewer" or pair.method == "tinybert":
        return 0.0
    with torch.no_grad():
        t_logits = m.teacher(batch.inputs_for(TEACHER)).logits
    p = pair.params
    return float(p["alpha"] * p["temperature"] ** 2 * teacher_entropy(t_logits, p["temperature"]))


# --------------------------------------------------------------------------- the peers


class LogitsOf(nn.Module):
    """The adapter a torchdistill user writes around a model taking a dict: images in,
    logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model({"pixel_values": x}).logits


def _cycle(loader: Any, on_epoch: Callable[[], None] = lambda: None) -> Iterator[Any]:
    while True:
        on_epoch()
        yield from loader


class TorchdistillKD:
    """torchdistill's KD step: a ``DistillationBox`` from a configuration dict (the shape of
    its ``configs/sample/cifar*/kd/*.yaml`` ``train`` section), ``WeightedSumLoss`` over the
    registry's ``KDLoss``; a step is its example loop's body (``forward_process`` then
    ``post_forward_process``: backward, optimizer step, zero_grad)."""

    def __init__(self, pair: PairDef, m: Models):
        from torch.utils.data import RandomSampler, TensorDataset
        from torchdistill.core.distillation import get_distillation_box

        p, o, b = pair.params, m.spec.optimizer, m.spec.budget  # the peer's weights come from the pair, as kdbench's spec does
        self.student = m.build_student().train()
        self.teacher = m.teacher
        images = m.encoded["pixel_values"]
        config = {
            "num_epochs": 1,
            "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                                  "kwargs": {"batch_size": b.batch_size, "num_workers": 0, "drop_last": True}},
            "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
            "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [], "requires_grad": True, "frozen_modules": []},
            "optimizer": {"key": "SGD", "kwargs": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
                "criterion": {"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                                          "teacher_module_path": ".", "teacher_module_io": "output",
                                                          "temperature": p["temperature"], "alpha": 1 - p["alpha"], "reduction": "batchmean"}},
                "weight": 1.0}}}},
        }
        self.box = get_distillation_box(LogitsOf(self.teacher), LogitsOf(self.student), {"train": TensorDataset(images, m.labels)}, config,
                                        torch.device("cpu"), None, False, 1)
        self.teacher.eval()  # kdbench's teacher runs in eval mode; torchdistill's pre-epoch process leaves it as given
        self.optimizer = self.box.optimizer
        self.batches = _cycle(self.box.train_data_loader, lambda: self.box.pre_epoch_process(epoch=0))

    def loss(self, batch: Batch) -> Tensor:
        return self.box.forward_process(batch.inputs["pixel_values"], batch.labels, {})

    def step(self) -> float:
        t0 = _clock()
        x, y, supp = next(self.batches)
        self.box.pre_forward_process(x, y, supp)
        loss = self.box.forward_process(x, y, supp)
        self.box.post_forward_process(loss)
        return _clock() - t0


class TextModel(nn.Module):
    """The adapter a TextBrewer user writes: keyword inputs in, the outputs the
    adaptor reads out; with ``labels`` the student also returns its cross-entropy (as a
    Hugging Face classifier does), which TextBrewer weighs as the hard-label loss."""

    def __init__(self, model: nn.Module, need: frozenset[str]):
        super().__init__()
        self.model, self.need = model, need

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None, labels: Tensor | None = None) -> dict:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.model(inputs, need=self.need)
        return {"out": out, "loss": F.cross_entropy(out.logits.float(), labels) if labels is not None else None}


def text_adaptor(hard: bool) -> Callable[[dict, dict], dict]:
    def adaptor(batch: dict, results: dict) -> dict:
        out = results["out"]
        d = {"logits": out.logits, "inputs_mask": batch["attention_mask"]}
        if out.hidden_states is not None:
            d["hidden"] = out.hidden_states
        if out.attention_scores is not None:
            d["attention"] = out.attention_scores
        if hard and results["loss"] is not None:
            d["losses"] = results["loss"]
        return d
    return adaptor


class _Examples(torch.utils.data.Dataset):
    def __init__(self, encoded: dict[str, Tensor], labels: Tensor):
        self.encoded, self.labels = encoded, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def textbrewer_config(pair: PairDef, student_layers: int, teacher_layers: int, width: int) -> dict[str, Any]:
    """The ``DistillationConfig`` arguments matching kdbench's method (see :data:`PAIRS`)."""
    p = pair.params
    if pair.method == "tinybert":
        g = [k * teacher_layers // student_layers for k in range(student_layers + 1)]
        att = [{"layer_T": g[k + 1] - 1, "layer_S": k, "feature": "attention", "loss": "attention_mse", "weight": 1.0} for k in range(student_layers)]
        hid = [{"layer_T": g[k], "layer_S": k, "feature": "hidden", "loss": "hidden_mse", "weight": 1.0, "proj": ["linear", width, width]}
               for k in range(student_layers + 1)]
        return {"temperature": p["temperature"], "kd_loss_type": "ce", "kd_loss_weight": 1.0, "hard_label_weight": 0.0,
                "intermediate_matches": att + hid}
    config = {"temperature": p["temperature"], "kd_loss_type": "ce", "kd_loss_weight": p["alpha"] * p["temperature"] ** 2,
              "hard_label_weight": 1 - p["alpha"], "intermediate_matches": []}
    if pair.method == "pkd":
        pairs = [(i, i * teacher_layers // student_layers) for i in range(1, student_layers)]
        config["intermediate_matches"] = [{"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "pkd", "weight": p["beta"] / (width * len(pairs))}
                                          for s, t in pairs]
    return config


class TextBrewerStep:
    """TextBrewer's ``GeneralDistiller`` with the matching ``DistillationConfig``; a step is
    the body of its ``train_with_num_steps`` loop (``train_on_batch``, ``write_loss``,
    backward, optimizer and scheduler step, zero_grad) on a ``DataLoader`` of dict batches,
    inside the distiller's context (teacher eval, student train), as ``with distiller:
    distiller.train(...)`` runs it. No TensorBoard directory (``log_dir=None``)."""

    def __init__(self, pair: PairDef, m: Models, workdir: str):
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
        from transformers import get_linear_schedule_with_warmup

        d = m.student.describe()
        t = m.teacher.describe()
        self.student = m.build_student().train()
        need_s, need_t = frozenset(m.method.student_needs), frozenset(m.method.teacher_needs)
        config = textbrewer_config(pair, d["num_layers"], t["num_layers"], d["hidden_size"])
        self.distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=workdir, log_dir=None), DistillationConfig(**config),
                                          TextModel(m.teacher, need_t), TextModel(self.student, need_s),
                                          text_adaptor(False), text_adaptor(True))
        if m.extra is not None:  # TextBrewer's projections start as copies of kdbench's shared W_h
            for proj in self.distiller.projs:
                if proj is not None:
                    proj.load_state_dict(m.extra.state_dict())
        o, b = m.spec.optimizer, m.spec.budget
        optimizer = torch.optim.AdamW(self.student.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        self.optimizer, self.scheduler, _ = self.distiller.initialize_training(
            optimizer, get_linear_schedule_with_warmup, {"num_warmup_steps": 0, "num_training_steps": 10**6}, None)
        self.distiller.__enter__()  # what `with distiller:` does: teacher eval, student train
        self.loader = torch.utils.data.DataLoader(_Examples(m.encoded, m.labels), batch_size=b.batch_size, shuffle=True, drop_last=True)
        self.batches = _cycle(self.loader)
        self.writer_step = 0

    def loss(self, batch: Batch) -> Tensor:
        return self.distiller.train_on_batch({**batch.inputs, "labels": batch.labels}, {})[0]

    def step(self) -> float:
        t0 = _clock()
        total_loss, losses = self.distiller.train_on_batch(next(self.batches), {})
        self.distiller.write_loss(total_loss, self.writer_step, losses)
        self.writer_step += 1
        total_loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return _clock() - t0


def build_peer(pair: PairDef, m: Models, workdir: str) -> Any:
    return TorchdistillKD(pair, m) if pair.peer == "torchdistill" else TextBrewerStep(pair, m, workdir)


# --------------------------------------------------------------------------- equality


def _grads(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def check_equal(pair: PairDef, m: Models, peer: Any) -> dict[str, Any]:
    """Both sides' loss on the first batch of the run, from the same weights with the same
    dropout masks (the generator seeded alike before each side's forward passes); the
    students' gradients compared entry by entry. The peer's student is restored after."""
    batch = m.first
    saved = copy.deepcopy(peer.student.state_dict())
    ours = m.build_student().train()
    extra = copy.deepcopy(m.extra) if m.extra is not None else None
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        mine, parts = kdbench_loss(m, ours, batch, extra)
    mine.backward()
    peer.student.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        theirs = peer.loss(batch)
    theirs.backward()
    g_mine, g_theirs = _grads(ours), _grads(peer.student)
    peer.student.zero_grad(set_to_none=True)
    peer.student.load_state_dict(saved)
    if hasattr(peer, "optimizer"):
        peer.optimizer.zero_grad(set_to_none=True)
    offset = definition_offset(pair, m, batch)
    a, b = mine.item(), theirs.item() - offset
    # relative to the largest value in play: the peer's value carries the rounding of its own
    # magnitude (48.8 for text-pkd, minus an offset of 48.5, leaves 0.32 with the 48.8's rounding)
    loss_diff = abs(a - b) / max(abs(a), abs(theirs.item()), 1e-12)
    missing = sorted(set(g_mine) ^ set(g_theirs))
    scale = max(float(g.abs().max()) for g in g_mine.values())
    grad_diff = max(float((g_mine[k] - g_theirs[k]).abs().max()) for k in g_mine if k in g_theirs) / max(scale, 1e-12)
    equal = loss_diff <= LOSS_RTOL and grad_diff <= GRAD_RTOL and not missing
    return {"pair": pair.name, "kdbench_loss": a, "peer_loss": theirs.item(), "definition_offset": offset, "peer_loss_minus_offset": b,
            "loss_rel_diff": loss_diff, "grad_rel_diff": grad_diff, "grad_params_only_one_side": missing, "equal": equal,
            "kdbench_parts": {k: float(v) for k, v in parts.items()}, "definitions": pair.definitions}


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def step_clock(name: str) -> Iterator[None]:
    """Inside, both sides time their steps with ``CLOCKS[name]``: the peers' steps here and
    kdbench's training loop (its ``time.perf_counter``, swapped for the duration)."""
    global _clock
    import kdbench.train.loop as loop_module

    saved = loop_module.time, _clock
    _clock = CLOCKS[name]
    loop_module.time = SimpleNamespace(perf_counter=_clock)  # type: ignore[assignment]
    try:
        yield
    finally:
        loop_module.time, _clock = saved


def peer_alone(peer: Any, steps: int) -> dict[str, float]:
    """``steps`` peer steps alone (inside kdbench's deterministic-kernel setting, as in the
    paired runs): the median step and the peak memory increase."""
    meter = CostMeter(torch.device("cpu"))
    with deterministic_cpu(), meter:
        times = [peer.step() for _ in range(steps)]
    return {"step_s_median": float(np.median(times)), "peak_mem_increase_mb": meter.summary()["peak_mem_increase_mb"]}


METER_START, METER_END = "peers.meter_start", "peers.meter_end"


@contextlib.contextmanager
def meter_marks() -> Iterator[None]:
    """Inside, every kdbench run's :class:`CostMeter` marks where it starts and stops in a
    running torch profile (:func:`tensor_peak_mb` reads the marks)."""
    class MarkedMeter(runner_module.CostMeter):  # type: ignore[misc]
        def __enter__(self) -> "MarkedMeter":
            with torch.profiler.record_function(METER_START):
                pass
            return super().__enter__()

        def __exit__(self, *exc: Any) -> None:
            with torch.profiler.record_function(METER_END):
                pass
            super().__exit__(*exc)

    with step_cost.runner_meter(MarkedMeter):
        yield


def tensor_peak_mb(run: Callable[[], Any]) -> float:
    """The most memory (MB) held at once by CPU tensors allocated during ``run`` (every
    allocation and free torch.profiler records, in time order), between a kdbench meter's
    marks where :func:`meter_marks` put them, else over all of ``run``. Unlike the resident
    memory, it does not depend on how the allocator laid out the heap before, so it
    compares the two sides' steps alike (docs/peers.md, "Why the figures are what they
    are"). Reads the profiler's event tree, where each allocation
    keeps its own time (the per-operation totals of ``prof.events()`` move a free inside an
    operation, such as the optimizer's step, to that operation's start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events: list[tuple[int, int, int]] = []  # (time ns, address, bytes: + allocated, - freed)
    marks: dict[str, int] = {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        elif node.name in (METER_START, METER_END):
            marks[node.name] = node.start_time_ns
        stack.extend(node.children)
    start, end = marks.get(METER_START, -math.inf), marks.get(METER_END, math.inf)
    # only blocks allocated inside the window count: a free of an older block (a previous
    # run's models, collected when the meter starts) must not lower the figure
    live: dict[int, int] = {}
    total = peak = 0
    for t, ptr, size in sorted(events, key=lambda e: e[0]):
        if t < start:
            continue
        if t >= end:
            break
        if size > 0:
            live[ptr] = size
            total += size
        elif ptr in live:
            total -= live.pop(ptr)
        peak = max(peak, total)
    return peak / 2**20


def versions() -> dict[str, str]:
    """Versions of both sides and the kdbench commit (``+dirty`` with local changes)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "torchdistill", "textbrewer", "transformers", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        out["kdbench_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        out["kdbench_commit"] = "unknown"
    return out


def check_threads(expected: int) -> int:
    """The thread count both sides compute with (one process, one setting); refuses a
    library having changed it."""
    n = torch.get_num_threads()
    if n != expected:
        raise SystemExit(f"torch uses {n} threads, not the {expected} set at the start: something changed it; the sides would differ")
    return n


def peers_missing(names: list[str]) -> list[str]:
    """The peer packages that the selected pairs need and that do not import here."""
    missing = []
    for peer in sorted({PAIRS[n].peer for n in names}):
        try:
            __import__(peer)
        except ImportError:
            missing.append(peer)
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for the raw rounds (created; files inside are replaced)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds after the warm-up (at least 3)")
    ap.add_argument("--steps", type=int, default=None, help="steps per side, pair and round (default 20; 4 with --tiny)")
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated subset of {', '.join(PAIRS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (resnet14 -> resnet8, 4 -> 2 layer BERTs of width 32)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall (default; for an idle machine) or cpu: this process's CPU time per step, for a machine shared with other jobs")
    ap.add_argument("--check-only", action="store_true", help="the loss-equality checks only")
    ap.add_argument("--no-warmup", action="store_true", help="skip the discarded warm-up round (tests only: memory then from paired runs)")
    ap.add_argument("--summarise", action="store_true",
                    help="measure nothing: write OUT/summary.json again from OUT's rounds.json (and the memory figures of its summary.json) and print it")
    args = ap.parse_args(argv)
    if args.summarise:
        return resummarise(args.out)
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (a spread needs rounds)")
    names = [n.strip() for n in args.pairs.split(",") if n.strip()]
    unknown = [n for n in names if n not in PAIRS]
    if unknown or not names:
        ap.error(f"unknown pairs {unknown} (known: {', '.join(PAIRS)})")
    missing = peers_missing(names)
    if missing:
        raise SystemExit(f"{', '.join(missing)} not importable here: run `make peers` (it makes .venv-peers with the peers installed)")
    torch.set_num_threads(args.threads)
    steps = args.steps or (4 if args.tiny else 20)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]), "versions": versions(),
           "threads": check_threads(args.threads), "interop_threads": torch.get_num_interop_threads(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "processor": platform.processor(), "tiny": args.tiny, "steps": steps, "rounds": args.rounds, "clock": args.clock,
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"threads: torch {env['threads']} (both sides, one process), interop {env['interop_threads']}, {env['cpus']} CPUs")

    registry = peers_registry()
    batch_of = {"torchdistill": 16 if args.tiny else 64, "textbrewer": 16}
    equality: list[dict] = []
    rounds: list[dict] = []
    memory: dict[str, dict[str, float]] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore(Path(tmp) / "store.sqlite")
        runner = Runner(tmp, registry, device="cpu", progress=False, share_teacher_outputs=False)  # the peers compute the teacher every step too
        setups: dict[str, tuple[RunSpec, RunSpec, Any]] = {}
        for name in names:  # build and check every pair before timing any
            pair = PAIRS[name]
            spec = run_spec(registry, pair, args.tiny, steps, batch_of[pair.peer])
            warm = run_spec(registry, pair, args.tiny, WARMUP_STEPS, batch_of[pair.peer])
            checkpoint = provide_teacher(spec, Path(tmp), store, registry, runner.device)
            m = build_models(registry, spec, checkpoint)
            peer = build_peer(pair, m, tmp)
            result = check_equal(pair, m, peer)
            equality.append(result)
            offset = f" - definition offset {result['definition_offset']:.6f} = {result['peer_loss_minus_offset']:.6f}" if result["definition_offset"] else ""
            print(f"[{name}] loss on the same batch and weights: kdbench {result['kdbench_loss']:.6f}, {pair.peer} {result['peer_loss']:.6f}{offset}; "
                  f"relative difference {result['loss_rel_diff']:.1e} (limit {LOSS_RTOL:.0e}), student gradients {result['grad_rel_diff']:.1e} "
                  f"(limit {GRAD_RTOL:.0e}): {'EQUAL' if result['equal'] else 'DIFFERENT: not timed'}")
            if result["equal"]:
                setups[name] = (spec, warm, (checkpoint, peer, m))
        (args.out / "equality.json").write_text(json.dumps(equality, indent=1) + "\n")
        if args.check_only or not setups:
            (args.out / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
            return 0 if all(r["equal"] for r in equality) else 1

        def through_kdbench(spec: RunSpec, checkpoint: Any, peer: Any | None) -> tuple[dict, list[tuple[float, float]]]:
            pairs: list[tuple[float, float]] = []
            store.claim(spec, rerun=True)
            with step_cost.paired_with(peer, pairs) if peer is not None else contextlib.nullcontext():
                result = runner.run(spec, checkpoint)
            store.finish(spec, result.status, cost=result.cost, error=result.error)
            if result.status != "done":
                raise SystemExit(f"{spec.method} {result.status}: {result.error}")
            return result.cost, pairs

        if not args.no_warmup:  # one-off costs out of round 1; unpaired, so each side's memory is its own
            per_round = 0.0
            for name, (spec, warm, (checkpoint, peer, _)) in setups.items():
                t0 = time.perf_counter()
                cost, _ = through_kdbench(warm, checkpoint, None)
                run_s = time.perf_counter() - t0
                alone = peer_alone(peer, WARMUP_STEPS)
                memory[name] = {"kdbench": cost["peak_mem_increase_mb"], "peer": alone["peak_mem_increase_mb"]}
                with meter_marks():  # one more unpaired run of each side, under the profiler: live tensors
                    memory[name]["kdbench_tensors"] = tensor_peak_mb(lambda: through_kdbench(warm, checkpoint, None))
                peer.optimizer.state.clear()  # a run's optimizer starts without state, as kdbench's does in every run
                memory[name]["peer_tensors"] = tensor_peak_mb(lambda: peer_alone(peer, WARMUP_STEPS))
                # a paired run: the run's fixed part (preparation, evaluation) plus steps x (kdbench step + peer step)
                per_round += run_s - WARMUP_STEPS * cost["step_s_median"] + steps * (cost["step_s_median"] + alone["step_s_median"])
            print(f"warm-up done; expected: about {per_round * args.rounds / 60:.1f} min more for {args.rounds} rounds of {steps} paired "
                  "steps per pair (from the warm-up's step times)", flush=True)
        with step_clock(args.clock):  # the warm-up's memory figures come from the unpaired runs above, whatever the clock
            for r in range(args.rounds):
                check_threads(args.threads)
                for name, (spec, warm, (checkpoint, peer, m)) in setups.items():
                    # A round is one fresh run on each side: kdbench's run builds its student and
                    # optimizer anew, so the peer does too (its first steps then pay the same
                    # first-touch and optimizer-state costs, which a peer carried over from the
                    # round before would not)
                    del peer
                    peer = build_peer(PAIRS[name], m, tmp)
                    setups[name] = (spec, warm, (checkpoint, peer, m))
                    cost, pairs = through_kdbench(spec, checkpoint, peer)
                    kept = pairs[PAIR_SKIP:] if len(pairs) > 2 * PAIR_SKIP else pairs
                    ratio = float(np.median([a / b for a, b in kept]))
                    rounds.append({"pair": name, "round": r + 1, "kdbench_over_peer": ratio, "kdbench_s_median": float(np.median([a for a, _ in kept])),
                                   "peer_s_median": float(np.median([b for _, b in kept])), "steps": [list(p) for p in pairs],
                                   "skipped_first": len(pairs) - len(kept), "kdbench_peak_mem_increase_mb": cost["peak_mem_increase_mb"]})
                    print(f"round {r + 1}/{args.rounds} {name}: kdbench/{PAIRS[name].peer} {ratio:.3f} (kdbench {rounds[-1]['kdbench_s_median']:.4f} s, "
                          f"peer {rounds[-1]['peer_s_median']:.4f} s {args.clock} per step)", file=sys.stderr, flush=True)
        check_threads(args.threads)
    env["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env["wall_s"] = time.perf_counter() - t_start
    try:
        env["load_average_end"] = list(os.getloadavg())
    except OSError:
        pass
    summary = summarise(rounds, memory)
    write_outputs(args.out, env, equality, rounds, summary)
    print_summary(summary, env)
    return 0 if all(r["equal"] for r in equality) else 1


def summarise(rounds: list[dict], memory: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per pair: the ratio kdbench / peer (median of the per-round medians, [min, max]), each
    side's s/step the same way, each side's peak memory increase, and the pooled paired
    steps (:func:`pooled_steps`)."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["pair"] for r in rounds):
        mine = [r for r in rounds if r["pair"] == name]
        out[name] = {"peer": PAIRS[name].peer, "rounds": len(mine),
                     "kdbench_over_peer": step_cost.spread([r["kdbench_over_peer"] for r in mine]),
                     "kdbench_s": step_cost.spread([r["kdbench_s_median"] for r in mine]),
                     "peer_s": step_cost.spread([r["peer_s_median"] for r in mine]),
                     "peak_mem_increase_mb": memory.get(name, {"kdbench": float(np.median([r["kdbench_peak_mem_increase_mb"] for r in mine])), "peer": math.nan}),
                     "steps_pooled": pooled_steps(mine)}
    return out


BOOTSTRAP = 4000  # resamples of the rounds for the pooled interval
BOOTSTRAP_SEED = 0


def pooled_steps(rounds: list[dict]) -> dict[str, Any]:
    """Every kept paired step of one pair's rounds (a round's first ``skipped_first`` steps
    left out, as in its ratio): the median of the per-step ratios kdbench / peer, a 95 %
    interval for it from resampling whole rounds with replacement (steps of one round share
    the machine's state, so rounds, not steps, are the independent units; seeded), the
    share of steps where kdbench was slower, and a verdict: ``no difference measurable``
    when the interval holds 1.0, else which side was faster. This says whether a median
    over rounds a little above or below 1.0 is a difference at all."""
    per_round = [np.array([a / b for a, b in r["steps"][r["skipped_first"]:]]) for r in rounds]
    per_round = [x for x in per_round if x.size]
    if not per_round:
        return {"steps": 0}
    pooled = np.concatenate(per_round)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, len(per_round), (BOOTSTRAP, len(per_round)))
    medians = np.array([np.median(np.concatenate([per_round[i] for i in pick])) for pick in picks])
    lo, hi = (float(q) for q in np.percentile(medians, [2.5, 97.5]))
    verdict = "no difference measurable" if lo <= 1.0 <= hi else ("kdbench slower" if lo > 1.0 else "kdbench faster")
    return {"steps": int(pooled.size), "median": float(np.median(pooled)), "ci95": [lo, hi],
            "kdbench_slower_share": float(np.mean(pooled > 1.0)), "verdict": verdict}


def resummarise(out: Path) -> int:
    """``--summarise``: the summary of a finished run's folder, computed again from its raw
    rounds with the current :func:`summarise` (memory figures, measured only in the
    warm-up, are kept from its summary.json)."""
    try:
        rounds = json.loads((out / "rounds.json").read_text())
        env = json.loads((out / "environment.json").read_text())
        old = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{out}: not a finished peers.py folder ({exc})") from None
    summary = summarise(rounds, {k: v["peak_mem_increase_mb"] for k, v in old.items()})
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_summary(summary, env)
    return 0


def write_outputs(out: Path, env: dict, equality: list[dict], rounds: list[dict], summary: dict) -> None:
    (out / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    (out / "rounds.json").write_text(json.dumps(rounds, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "peer", "round", "step", "kdbench_s", "peer_s", "in_ratio"])
        for r in rounds:
            for i, (a, b) in enumerate(r["steps"], start=1):
                w.writerow([r["pair"], PAIRS[r["pair"]].peer, r["round"], i, f"{a:.6f}", f"{b:.6f}", int(i > r["skipped_first"])])


def print_summary(summary: dict, env: dict) -> None:
    load = env.get("load_average_end")
    print(f"{env['rounds']} rounds x {env['steps']} paired steps per pair, {env['threads']} threads, {env['clock']} clock"
          + (f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end" if load else "") + f", {env['wall_s'] / 60:.1f} min")
    print(f"{'pair':<15}{'peer':<14}{'kdbench/peer':>13}{'[min, max]':>17}{'kdbench s':>11}{'peer s':>9}{'mem +MB kdb':>13}{'peer':>8}"
          f"{'tensors MB kdb':>16}{'peer':>8}")
    for name, s in summary.items():
        r, mem = s["kdbench_over_peer"], s["peak_mem_increase_mb"]
        span = f"[{r['min']:.3f}, {r['max']:.3f}]"
        print(f"{name:<15}{s['peer']:<14}{r['median']:>13.3f}{span:>17}{s['kdbench_s']['median']:>11.4f}"
              f"{s['peer_s']['median']:>9.4f}{mem['kdbench']:>13.1f}{mem['peer']:>8.1f}"
              f"{mem.get('kdbench_tensors', math.nan):>16.1f}{mem.get('peer_tensors', math.nan):>8.1f}")
    print("pooled paired steps: median of the per-step ratios, 95 % interval from resampling rounds, share of steps kdbench was slower")
    for name, s in summary.items():
        q = s.get("steps_pooled", {})
        if q.get("steps"):
            print(f"{name:<15}{q['steps']:>5} steps  {q['median']:.4f} [{q['ci95'][0]:.4f}, {q['ci95'][1]:.4f}]  "
                  f"slower in {100 * q['kdbench_slower_share']:.0f} %  {q['verdict']}")


if __name__ == "__main__":
    sys.exit(main())
