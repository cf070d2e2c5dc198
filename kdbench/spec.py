"""Suite files and run specs.

A suite (YAML in ``benchmarks/``) is validated once, when it is loaded, against the
schema below *and* against the options each plugin declares; then it expands into frozen
:class:`RunSpec` objects. A run spec's content hash keys the results store, the teacher
cache and resume: nothing else decides what a run is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import typing
import unicodedata
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, field_validator,
                      model_serializer, model_validator)

from kdbench.api import KDBenchError, Method, ModelFacts, added, check_alignment, omit_added_defaults, refuse_bool_numbers, unhashed_fields
from kdbench.loader import MAX_BYTES, LoadError, parse_yaml, printable, snippet, unprintable
from kdbench.registry import Registry, did_you_mean, get_registry
from kdbench.recipes import expand_recipes

#: Bump when the runner's semantics change so that old results are not reused.
PROTOCOL_VERSION = 1
#: How run hashes are computed. 2: the teacher is left out of the hash of a run whose
#: method uses no teacher (changing only the teacher no longer "changes" a ``none`` run).
#: Stores written under scheme 1 stay readable: :meth:`RunSpec.legacy_hash` is the old
#: hash, and the store adopts such rows (see ``ResultsStore.adopt_legacy``).
HASH_SCHEME = 2
#: Added to ``RunSpec.unhashed`` for runs whose method uses no teacher.
TEACHER_FREE = ("teacher",)


class SuiteError(KDBenchError):
    """A suite file that does not validate; lists every bad field with its path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        # bounded: a hostile suite must not make the message (or the terminal) huge
        shown = [p if len(p) <= 500 else p[:500] + "..." for p in problems[:MAX_PROBLEMS_SHOWN]]
        more = len(problems) - len(shown)
        super().__init__(f"{source[:300]}: invalid suite\n" + "\n".join(f"  - {p}" for p in shown)
                         + (f"\n  ... and {more} more problems" if more > 0 else ""))


#: A SuiteError lists at most this many problems (the rest are counted).
MAX_PROBLEMS_SHOWN = 50


#: Seeds are below this bound. torch's CPU generator (mt19937) and numpy's legacy seed
#: use only a seed's low 32 bits, so seeds 2**32 apart would be one random stream counted
#: as two seeds in n, the spread and the paired test; the 2**20 margin keeps a run's
#: derived streams (seed + 1 for the quiz order, seed + 1_000_003 for CRD's negatives:
#: ``kdbench.api.stream_seed``) below 2**32 too.
MAX_SEED = 2**32 - 2**20

#: Budget bounds: a typo (``steps: 1e12``) must fail at validation, not train forever or
#: run out of memory building its evaluation schedule. Raise them for one command with
#: the environment variables KDBENCH_MAX_STEPS / KDBENCH_MAX_EPOCHS.
MAX_STEPS = 10**7
MAX_EPOCHS = 10**4
MAX_FLOPS = 10**21  # a compute budget (Budget.flops): about 12 days of an H100 at its dense bf16 peak
MAX_BATCH = 2**20
#: A suite (tasks x students x method settings x seeds) expands to at most this many runs.
MAX_RUNS = 100_000


def budget_limit(name: str, default: int) -> int:
    """A budget bound, overridden by the environment variable ``name`` (a positive integer)."""
    import os

    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw[:40]!r} is not an integer") from None
    if value <= 0:
        raise ValueError(f"environment variable {name} must be positive, got {value}")
    return value


def check_results_setting(results: str) -> str:
    """A suite's ``results:`` is a relative folder below the working directory: a suite
    file (perhaps from someone else) must not make kdbench write elsewhere. ``--results``
    on the command line may point anywhere (that is the user's own choice)."""
    path = Path(results)
    if not results.strip() or path.is_absolute() or results.startswith("~") or ".." in path.parts:
        raise ValueError("must be a relative folder below the working directory, without '..' "
                         "(use --results on the command line for another place)")
    return results


def printable_text(text: str) -> str:
    """A label or name as a suite gives it, refused (``ValueError``) when it holds
    characters that would not print as themselves: controls, NUL, terminal escapes,
    zero-width or bidirectional format characters (two students whose labels differ by a
    zero-width space would look like one)."""
    bad = unprintable(text)
    if bad:
        raise ValueError(f"'{printable(text)[:100]}' contains invisible or control characters ({', '.join(bad[:5])}); "
                         "labels and names must be printable text")
    return text


def same_label(label: str) -> str:
    """The form labels are compared in: Unicode NFKC (so 'é' typed as one character or as
    e + accent, or a full-width letter, is one label, never two)."""
    return unicodedata.normalize("NFKC", label)


#: A printable label or name (see :func:`printable_text`).
Label = typing.Annotated[str, AfterValidator(printable_text)]


class Frozen(BaseModel):
    # inf/nan in a suite (an ``.inf`` learning rate, epochs, resources) can only fail later
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        return refuse_bool_numbers(cls, data)  # ``steps: true`` is not one step


class WithAddedFields(Frozen):
    """A spec section that gained fields after runs were stored (declared with
    :func:`kdbench.api.added`): while at their defaults they are left out of its dumps,
    hence out of run hashes."""

    @model_serializer(mode="wrap")
    def _omit_added_defaults(self, handler: SerializerFunctionWrapHandler) -> Any:
        return omit_added_defaults(self, handler(self))


class OptimizerSpec(WithAddedFields):
    """Optimizer and learning-rate schedule. ``milestones`` are optimizer steps (or
    epochs when the budget is in epochs) where the rate is multiplied by ``gamma``.
    ``fused`` (opt-in) takes PyTorch's fused step kernel."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    schedule: Literal["linear", "constant", "cosine", "multistep"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    milestones: tuple[float, ...] = ()
    gamma: float = Field(0.1, gt=0)
    grad_clip: float | None = Field(None, gt=0)
    fused: bool = added(False, "PyTorch's fused kernel for the optimizer step (one kernel over all parameters instead of a "
                               "dozen per parameter; AdamW over a MiniLM student about 4x faster on CPU). The same update "
                               "rule, but not bit-identical to the default: runs differ in the last bits and then by seed-level "
                               "noise. Default false keeps stored runs' hashes and numbers.")


def lr_factor(spec: OptimizerSpec, steps: int, steps_per_epoch: float = 1.0, epochs_budget: bool = False) -> Callable[[int], float]:
    """The schedule of ``spec`` over ``steps`` optimizer steps: ``factor(k)`` is the
    multiple of ``spec.lr`` used by the update that follows ``k`` updates (k = 0 is the
    first), as :func:`kdbench.train.build_optimizer` hands it to ``LambdaLR``. Linear
    warmup over ``int(warmup_ratio * steps)`` updates, then ``linear`` (to 0 at
    ``steps``), ``cosine`` (to 0), ``multistep`` (times ``gamma`` at each milestone:
    optimizer steps, or epochs of ``steps_per_epoch`` updates when ``epochs_budget``) or
    ``constant``. Torch-free, so reports can say what the rate was at any step."""
    warmup = int(spec.warmup_ratio * steps)
    milestones = [int(m * steps_per_epoch) if epochs_budget else int(m) for m in spec.milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec.schedule == "linear":
            return max(0.0, (steps - step) / max(steps - warmup, 1))
        if spec.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
        if spec.schedule == "multistep":
            return spec.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor


class Budget(WithAddedFields):
    """How long a student trains: ``steps`` optimizer steps, ``epochs`` over the
    training split, or ``flops``: the counted floating-point operations of the teacher's
    and student's passes (``kdbench.compute``), which buy each method the steps its
    passes afford. Identical for every method of a suite."""

    steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    flops: float | None = added(None, "compute budget: each method trains for the most steps whose teacher and student passes "
                                      "cost at most this many FLOPs (one pass of each kind counted on the run's first batch with "
                                      "PyTorch's FLOP counter: matmul, convolution, attention; times the passes the method plans, "
                                      "`Method.planned_passes`; give `steps`, `epochs` or `flops`); not for a teacher's "
                                      "fine-tuning; at most 10^21 (`KDBENCH_MAX_FLOPS`)", gt=0)
    batch_size: int = Field(32, gt=0)
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations (the end is always evaluated)")
    eval_batch_size: int = Field(256, gt=0)
    log_every: int = Field(10, gt=0)
    test_every_eval: bool = added(True, "score the test split(s) at every evaluation (the default); false: only at the reported "
                                        "one (the last under selection 'final'; under 'validation' the best-validation student's "
                                        "weights, kept in memory, are scored at the end), so the other evaluations score "
                                        "validation alone. Training is the same either way.")

    @model_validator(mode="after")
    def _one_length(self) -> "Budget":
        if sum(x is not None for x in (self.steps, self.epochs, self.flops)) != 1:
            raise ValueError("give exactly one of 'steps', 'epochs' or 'flops'")
        max_flops = budget_limit("KDBENCH_MAX_FLOPS", MAX_FLOPS)
        if self.flops is not None and self.flops > max_flops:
            raise ValueError(f"flops={snippet(self.flops, 30)} is above the bound of {max_flops:.0e} (a typo?); "
                             "set KDBENCH_MAX_FLOPS to allow more")
        max_steps, max_epochs = budget_limit("KDBENCH_MAX_STEPS", MAX_STEPS), budget_limit("KDBENCH_MAX_EPOCHS", MAX_EPOCHS)
        if self.steps is not None and self.steps > max_steps:
            raise ValueError(f"steps={snippet(self.steps, 30)} is above the bound of {max_steps} (a typo?); "
                             "set KDBENCH_MAX_STEPS to allow more")
        if self.epochs is not None and self.epochs > max_epochs:
            raise ValueError(f"epochs={snippet(self.epochs, 30)} is above the bound of {max_epochs} (a typo?); "
                             "set KDBENCH_MAX_EPOCHS to allow more")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) > MAX_BATCH:
                raise ValueError(f"{name}={snippet(getattr(self, name), 30)} is above the bound of {MAX_BATCH}")
        return self


class TaskSpec(Frozen):
    name: Label
    options: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(Frozen):
    """A model family (``model``: a registered model name) and its options. ``label`` is
    only a display name for reports (e.g. the student's capacity in a sweep)."""

    model: Label
    options: dict[str, Any] = Field(default_factory=dict)
    label: Label | None = None


class TeacherTraining(Frozen):
    """How the teacher is fine-tuned (once per task, teacher spec and seed)."""

    budget: Budget
    optimizer: OptimizerSpec = OptimizerSpec()
    seed: int = Field(0, ge=0, lt=MAX_SEED)


class TeacherSpec(ModelSpec):
    train: TeacherTraining | None = Field(None, description="omit to use the model as it is built, without fine-tuning")


class MethodEntry(Frozen):
    """A method and its hyper-parameters; a list value sweeps over its items.
    ``students`` (labels) restricts the entry to those students, so a suite can sweep one
    factor at a time (e.g. temperature on one student, capacity at one temperature)."""

    name: Label
    params: dict[str, Any] = Field(default_factory=dict)
    label: Label | None = Field(None, min_length=1, max_length=100,
                              description="the name of this entry's leaderboard row (with the swept parameters' values when "
                                          "it sweeps), in reports and run lines; default: the method's name and the parameters "
                                          "that tell its rows apart. Display only: never part of a run's hash")
    students: list[Label] | None = Field(None, min_length=1, description="only with these students (labels); default all")
    #: Report-only (never part of a run's hash): per task and student, the report keeps the
    #: setting of this entry's sweep with the best mean validation score over seeds (ties:
    #: the first in suite order) for the leaderboard and comparisons; see kdbench.report.selection.
    grid_selection: Literal["validation"] | None = Field(
        None, description="choose this entry's grid point per task on the validation split, in the report")


class PairSpec(Frozen):
    """A teacher and the student distilled from it (suites whose pairs differ in both)."""

    teacher: TeacherSpec
    student: ModelSpec


class Reference(Frozen):
    """A published number to compare with, and where it was read."""

    task: Label
    method: Label
    value: float
    metric: Label | None = None
    student: Label | None = None
    teacher: Label | None = None
    citation: Label
    std: float | None = Field(None, ge=0, description="the published spread over seeds, where given")
    n: int | None = Field(None, ge=1, description="the published number of seeds, where given")
    protocol: Label | None = Field(None, description="how the number was obtained, e.g. 'best test epoch' or 'last epoch'")


class Resources(Frozen):
    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)


class SuiteSpec(Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=200)  # results/<name>: one path component
    description: str = ""
    results: str | None = Field(None, description="results folder; default results/<name>")
    tasks: list[TaskSpec] = Field(min_length=1)
    teacher: TeacherSpec | None = None
    students: list[ModelSpec] = Field(default_factory=list)
    pairs: list[PairSpec] = Field(default_factory=list, description="teacher/student pairs, instead of 'teacher' x 'students'")
    methods: list[MethodEntry] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    budget: Budget
    optimizer: OptimizerSpec = OptimizerSpec()
    quiz_fraction: float = Field(0.1, ge=0, lt=1)
    data_seed: int = Field(0, ge=0, lt=MAX_SEED)
    selection: Literal["final", "validation"] = "final"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resources: Resources = Resources()
    trackers: list[str] = Field(default_factory=list)
    references: list[Reference] = Field(default_factory=list)
    #: The method every other is compared against; default: the first method listed.
    baseline: str | None = None
    #: Per task name, the smallest difference that matters, on the report's x100 scale
    #: (points). Tasks not named get their metric's default (kdbench.report.frame.DEFAULT_MARGIN:
    #: one point for proportions and correlations, none for unbounded metrics). Reports
    #: say "significant, below the margin" for smaller significant differences, claim
    #: equivalence within it only by two one-sided tests, and flag a task whose teacher is
    #: not above chance by more than it. Not part of any run's hash.
    margins: dict[str, float] = Field(default_factory=dict)

    @field_validator("margins")
    @classmethod
    def _margins_positive(cls, margins: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in margins.items() if not v > 0]
        if bad:
            raise ValueError(f"margins must be positive numbers of points (x100 scale); {bad[0]!r} is not")
        return margins

    @model_validator(mode="before")
    @classmethod
    def _default_baseline(cls, data: Any) -> Any:
        methods = data.get("methods") if isinstance(data, dict) else None
        if isinstance(data, dict) and data.get("baseline") is None and isinstance(methods, list) and methods:
            first = methods[0]
            name = first.get("name") if isinstance(first, dict) else getattr(first, "name", None)
            if isinstance(name, str):
                data = {**data, "baseline": name}
        return data

    @model_validator(mode="before")
    @classmethod
    def _student_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "student" in data:
            if "students" in data:
                raise ValueError("give either 'student' or 'students', not both")
            data = {k: v for k, v in data.items() if k != "student"} | {"students": [data["student"]]}
        return data

    @model_validator(mode="after")
    def _margins_name_tasks(self) -> "SuiteSpec":
        names = {t.name for t in self.tasks}
        unknown = sorted(set(self.margins) - names)
        if unknown:
            raise ValueError(f"margins names task {unknown[0]!r}, which the suite does not run (tasks: {', '.join(sorted(names))})")
        return self

    @model_validator(mode="after")
    def _models_given(self) -> "SuiteSpec":
        if self.pairs and (self.teacher is not None or self.students):
            raise ValueError("give either 'pairs' or 'teacher'/'students', not both")
        if not self.pairs and not self.students:
            raise ValueError("give 'students' (with an optional 'teacher'), or 'pairs'")
        return self

    @field_validator("seeds", mode="before")
    @classmethod
    def _no_bool_seeds(cls, seeds: Any) -> Any:
        # YAML's true/false would otherwise become seeds 1/0 (``[true, 0]`` is not two seeds)
        if isinstance(seeds, list) and any(isinstance(s, bool) for s in seeds):
            raise ValueError("seeds must be integers, not true/false")
        return seeds

    @field_validator("results")
    @classmethod
    def _results_inside(cls, results: str | None) -> str | None:
        return None if results is None else check_results_setting(results)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        if any(not 0 <= s < MAX_SEED for s in seeds):
            raise ValueError(f"seeds must be between 0 and {MAX_SEED - 1} (2**32 - 2**20 - 1): random generators use "
                             "a seed's low 32 bits, so larger seeds would repeat smaller ones")
        return seeds

    @field_validator("name")
    @classmethod
    def _name_is_not_a_path(cls, name: str) -> str:
        if set(name) == {"."}:  # results/<name> must stay below results/
            raise ValueError(f"'{name}' is not a suite name (it would name a folder outside results/)")
        return name


class RunSpec(Frozen):
    """One run, fully resolved: every plugin option with its default filled in."""

    protocol: int = PROTOCOL_VERSION
    task: TaskSpec
    task_version: int
    teacher: TeacherSpec | None
    student: ModelSpec
    method: str
    params: dict[str, Any]
    seed: int
    data_seed: int
    quiz_fraction: float
    budget: Budget
    optimizer: OptimizerSpec
    selection: Literal["final", "validation"]
    #: dotted paths of location options (data folders): not part of what the run *is*
    unhashed: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """The spec as hashed: display labels and location options left out."""
        return drop_paths(self.model_dump(mode="json", exclude={"student": {"label"}, "unhashed": True}), self.unhashed)

    @property
    def hash(self) -> str:
        return content_hash(self.identity())

    def _identity_with_teacher(self) -> dict[str, Any]:
        kept = tuple(p for p in self.unhashed if p not in TEACHER_FREE)
        return drop_paths(self.model_dump(mode="json", exclude={"student": {"label"}, "unhashed": True}), kept)

    @property
    def legacy_hash(self) -> str | None:
        """The hash under scheme 1 (teacher always hashed), where it differs from ``hash``."""
        if not set(TEACHER_FREE) <= set(self.unhashed):
            return None
        return content_hash(self._identity_with_teacher())

    @property
    def teacher_hash(self) -> str | None:
        if self.teacher is None:
            return None
        # the suite's teacher (also for a run whose method uses none, so reports still find it)
        ident = self._identity_with_teacher()
        return content_hash({"protocol": PROTOCOL_VERSION, "task": ident["task"], "task_version": self.task_version,
                             "teacher": ident["teacher"], "data_seed": self.data_seed, "quiz_fraction": self.quiz_fraction})

    @property
    def student_label(self) -> str:
        return self.student.label or describe_model(self.student)

    def params_label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))


def content_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def drop_paths(obj: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    for path in paths:
        *parents, leaf = path.split(".")
        node: Any = obj
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return obj


def _label_clashes(pairs: list[tuple[TeacherSpec | None, str | None, ModelSpec, str]]) -> list[str]:
    """Reports group runs by student label: two different students (or pairs) under one
    label would be averaged together as if they were seeds of one."""
    seen: dict[str, tuple[str, str]] = {}
    problems = []
    for teacher, _, student, _ in pairs:
        label = student.label or describe_model(student)
        if unprintable(label):  # a label made from the options (no 'label' given) is checked here
            problems.append(f"students: the label '{printable(label)[:100]}' contains invisible or control characters "
                            f"({', '.join(unprintable(label)[:5])}); give the student a printable 'label'")
        what = json.dumps([teacher.model_dump(mode="json") if teacher else None,
                           student.model_dump(mode="json", exclude={"label"})], sort_keys=True)
        first_label, first_what = seen.setdefault(same_label(label), (label, what))
        if first_label != label:
            problems.append(f"students: the labels {ascii(first_label[:100])} and {ascii(label[:100])} differ only "
                            "in Unicode form (they print alike); give students clearly different labels")
        elif first_what != what:
            problems.append(f"students: two different students (or teacher/student pairs) have the label '{printable(label)[:100]}'; "
                            "labels must be unique in a suite (reports would average them together)")
    return list(dict.fromkeys(problems))


def selected_label(entry: MethodEntry) -> str:
    """The name a ``grid_selection`` entry's leaderboard row starts with."""
    return entry.label or entry.name


#: leaderboard rows of their own that a method entry's label may not take
RESERVED_ROWS = ("teacher", "chance")


def _overlap(a: MethodEntry, b: MethodEntry) -> bool:
    return a.students is None or b.students is None or bool(set(a.students) & set(b.students))


def _row_name_clashes(methods: list[MethodEntry]) -> list[str]:
    """Two entries whose rows would share a name (for a shared student) would be averaged
    together in the report as if they were seeds of one setting: a label must differ from
    every other entry's label and from the method name of every unlabelled entry.
    (Two grid-selection entries are checked by :func:`_selection_clashes`.)"""
    problems = []
    for i, m in enumerate(methods):
        if m.label is None:
            continue
        if m.label in RESERVED_ROWS:
            problems.append(f"methods[{i}].label: '{m.label}' names the report's {m.label} row; choose another label")
        for j, other in enumerate(methods):
            if j == i or not _overlap(m, other) or (m.grid_selection and other.grid_selection):
                continue
            if (j < i and other.label == m.label) or (other.label is None and other.name == m.label):
                what = "has the same label" if other.label == m.label else f"is the method '{other.name}' without a label"
                problems.append(f"methods[{i}].label: methods[{j}] {what}, so both would be the leaderboard row "
                                f"'{m.label[:100]}' for the same students; give each entry its own label")
    return problems


def _selection_clashes(methods: list[MethodEntry]) -> list[str]:
    """Two entries selected on validation under one row name (and a shared student) would
    be averaged together in the report as if they were seeds of one setting."""
    problems, seen = [], {}
    for i, m in enumerate(methods):
        if not m.grid_selection:
            continue
        for j in seen.get(same_label(selected_label(m)), []):
            other = methods[j].students
            if m.students is None or other is None or set(m.students) & set(other):
                problems.append(f"methods[{i}].grid_selection: methods[{j}] is also '{selected_label(m)[:100]}' selected on "
                                "validation for the same students; give one of them a 'label' (reports name the row by it)")
        seen.setdefault(same_label(selected_label(m)), []).append(i)
    return problems


def entry_settings(spec: SuiteSpec, index: int, registry: Registry | None = None) -> list[dict[str, Any]]:
    """The settings (validated params, defaults filled in, as run specs hold them) that
    method entry ``index`` of a valid suite sweeps, in suite order, each once."""
    registry = registry or get_registry()
    entry = spec.methods[index]
    params_cls = registry.method(entry.name).Params
    out: dict[str, dict[str, Any]] = {}
    for combo in expand_grid(params_cls, entry.params):
        opts = params_cls.model_validate(combo, context={"registry": registry}).model_dump(mode="json")
        out.setdefault(json.dumps(opts, sort_keys=True), opts)
    return list(out.values())


def describe_model(spec: ModelSpec) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(spec.options.items()) if k not in {"pretrained", "path"})
    return f"{spec.model}({opts})" if opts else spec.model


# --------------------------------------------------------------------------- loading


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _fmt_loc(prefix: str, loc: tuple) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(str(part)):  # a key with spaces, dots, colons...: quote it
            path += f"[{str(part)!r}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _pydantic_problems(prefix: str, err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        msg = e["msg"]
        ctx = e.get("ctx") or {}
        if e["type"] == "literal_error" and "expected" in ctx:
            msg = f"{msg} (allowed: {ctx['expected']})"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = f" (got {snippet(e['input'])})" if e["type"] != "missing" and not isinstance(e.get("input"), dict) else ""
        out.append(f"{_fmt_loc(prefix, tuple(e['loc']))[:200]}: {msg[:300]}{got}")
    return out


def _allowed_fields(options_cls: type[BaseModel]) -> str:
    return ", ".join(f"{n} (default {f.default!r})" if not f.is_required() else f"{n} (required)" for n, f in options_cls.model_fields.items()) or "none"


def _check_options(prefix: str, options_cls: type[BaseModel], values: dict[str, Any], problems: list[str],
                   context: dict[str, Any] | None = None) -> dict[str, Any] | None:
    try:
        return options_cls.model_validate(values, context=context).model_dump(mode="json")
    except ValidationError as err:
        found = _pydantic_problems(prefix, err)
        if any(p.endswith("unknown field") or "unknown field (" in p for p in found):
            found.append(f"{prefix}: allowed fields are {_allowed_fields(options_cls)}")
        problems.extend(found)
        return None


def _is_list_field(options_cls: type[BaseModel], name: str) -> bool:
    field = options_cls.model_fields.get(name)
    if field is None:
        return False
    ann = field.annotation
    origins = {typing.get_origin(a) for a in ([ann] + list(typing.get_args(ann)))}
    return bool(origins & {list, tuple}) or ann in (list, tuple)


def expand_grid(options_cls: type[BaseModel], params: dict[str, Any]) -> list[dict[str, Any]]:
    """A list value (for a field that is not itself a list) is a sweep: the Cartesian
    product of all swept fields, in the order written."""
    keys, choices = [], []
    for key, value in params.items():
        keys.append(key)
        swept = isinstance(value, list) and not _is_list_field(options_cls, key)
        if swept and not value:
            raise ValueError(f"{key}: an empty list sweeps over nothing")
        choices.append(value if swept else [value])
    size = 1
    for c in choices:
        size *= len(c)
    if size > MAX_RUNS:  # refuse before building it: 10 swept fields of 10 values are 10^10 runs
        raise ValueError(f"(sweep): the sweep has {size:,} points, more than the bound of {MAX_RUNS:,} runs")
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


class Suite:
    """A validated suite and its expansion into run specs."""

    def __init__(self, spec: SuiteSpec, runs: list[RunSpec], source: str):
        self.spec = spec
        self.runs = runs
        self.source = source

    @property
    def name(self) -> str:
        return self.spec.name

    def results_dir(self, override: str | Path | None = None) -> Path:
        return Path(override or self.spec.results or Path("results") / self.spec.name)


def load_suite(path: str | Path, registry: Registry | None = None) -> Suite:
    """Read, parse (bounded: see :mod:`kdbench.loader`), validate and expand a suite file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SuiteError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = parse_yaml(raw)
    except LoadError as exc:
        raise SuiteError(str(path), [exc.problem]) from None
    return build_suite(data, source=str(path), registry=registry)


def build_suite(data: Any, source: str = "<suite>", registry: Registry | None = None) -> Suite:
    """Validate a parsed suite (a dict) and expand it. Raises :class:`SuiteError`."""
    registry = registry or get_registry()
    if not isinstance(data, dict):
        raise SuiteError(source, [f"(top level): expected a mapping of suite fields, got {type(data).__name__}"])
    data, recipe_problems = expand_recipes(data, source)  # `recipe:` method entries, `recipe_training`
    if recipe_problems:
        raise SuiteError(source, recipe_problems)
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as err:
        raise SuiteError(source, _pydantic_problems("", err)) from None
    except ValueError as err:  # raised by a 'before' validator
        raise SuiteError(source, [f"(top level): {err}"]) from None
    builder = _SuiteBuilder(spec, registry)
    builder.check()
    if builder.problems:
        raise SuiteError(source, sorted(dict.fromkeys(builder.problems), key=builder.problems.index))
    return Suite(spec, builder.runs(), source)


#: (teacher, its modality, student, its modality): one teacher/student pair of a suite
_Pair = tuple["TeacherSpec | None", "str | None", "ModelSpec", str]


class _SuiteBuilder:
    """Checks a validated :class:`SuiteSpec` against the registry (collecting every problem
    with its field path) and expands it into run specs."""

    def __init__(self, spec: SuiteSpec, registry: Registry):
        self.spec, self.registry = spec, registry
        self.problems: list[str] = []
        self.tasks: list[tuple[TaskSpec, int, str]] = []
        self.unhashed: dict[str, tuple[str, ...]] = {}  # task name / model name -> location fields
        self.factories: dict[str, type] = {}
        self.pairs: list[_Pair] = []
        self.methods: list[tuple[str, dict[str, Any], frozenset[str] | None, bool]] = []

    def check(self) -> None:
        spec = self.spec
        self._check_tasks()
        self._check_pairs()
        self._check_modalities()
        self.problems.extend(_label_clashes(self.pairs))
        student_labels = list(dict.fromkeys(st.label or describe_model(st) for _, _, st, _ in self.pairs))  # as reports show them
        for i, m in enumerate(spec.methods):
            self._check_method(i, m, student_labels)
        self.problems.extend(_selection_clashes(spec.methods))
        self.problems.extend(_row_name_clashes(spec.methods))
        teacher_budgets = [("teacher", spec.teacher.train.budget)] if spec.teacher and spec.teacher.train else []
        teacher_budgets += [(f"pairs[{i}].teacher", p.teacher.train.budget) for i, p in enumerate(spec.pairs) if p.teacher.train]
        self.problems += [f"{where}.train.budget.flops: a teacher's fine-tuning has no method whose passes could be counted "
                          "ahead; give its budget in steps or epochs" for where, budget in teacher_budgets if budget.flops is not None]
        if spec.baseline not in {m.name for m in spec.methods}:
            self.problems.append(f"baseline: '{spec.baseline}' is not one of the suite's methods.{did_you_mean(spec.baseline, [m.name for m in spec.methods])}")
        for i, tracker in enumerate(spec.trackers):
            if tracker not in self.registry.entries["trackers"]:
                self.problems.append(f"trackers[{i}]: {self.registry.unknown_message('trackers', tracker)}")
        n_runs = len(self.tasks) * len(self.pairs) * len(self.methods) * len(spec.seeds)
        if n_runs > MAX_RUNS:
            self.problems.append(f"(top level): the suite expands to {n_runs:,} runs, more than the bound of {MAX_RUNS:,}")
        if not self.problems:  # the models' configs are read only for an otherwise valid suite
            self._check_models()

    def _lookup(self, kind: str, name: str, where: str) -> type | None:
        entry = self.registry.entries[kind].get(name)
        if entry is None:
            self.problems.append(f"{where}: {self.registry.unknown_message(kind, name)}")
            return None
        return entry.cls

    def _check_tasks(self) -> None:
        for i, t in enumerate(self.spec.tasks):
            cls = self._lookup("tasks", t.name, f"tasks[{i}].name")
            if cls is not None:
                opts = _check_options(f"tasks[{i}].options", cls.Options, t.options, self.problems)
                if opts is not None:
                    self._check_objective(i, cls, t.options)
                    self.tasks.append((TaskSpec(name=t.name, options=opts), cls.version, cls.modality))
                    self.unhashed[f"task:{t.name}"] = tuple(f"task.options.{f}" for f in sorted(unhashed_fields(cls.Options)))

    def _check_objective(self, i: int, cls: type, given: dict[str, Any]) -> None:
        """The objective the task names exists and accepts the task's label layout.
        ``given``: the suite's task options, already valid (validated from them, not from
        their dump, which an options class need not accept back)."""
        try:
            task = cls(cls.Options.model_validate(given))
            name, problem = task.objective, task.problem
        except Exception as exc:  # a task plugin's bug: named, not a traceback
            self.problems.append(f"tasks[{i}]: task '{cls.name}' cannot say its objective: {type(exc).__name__}: {exc}")
            return
        objective_cls = self.registry.entries["objectives"].get(name)
        if objective_cls is None:
            self.problems.append(f"tasks[{i}]: task '{cls.name}' names its objective '{name}', but: "
                                 f"{self.registry.unknown_message('objectives', name)}")
            return
        self.problems.extend(f"tasks[{i}]: {why}" for why in objective_cls.cls(task, problem).check_task(task))

    def _model(self, m: ModelSpec, where: str) -> tuple[Any, str] | None:
        """``m`` with its options filled in and checked, and its model's modality."""
        cls = self._lookup("models", m.model, f"{where}.model")
        if cls is None:
            return None
        self.factories[m.model] = cls
        self.unhashed[f"model:{m.model}"] = tuple(sorted(unhashed_fields(cls.Options)))
        opts = _check_options(f"{where}.options", cls.Options, m.options, self.problems)
        return (m.model_copy(update={"options": opts}), cls.modality) if opts is not None else None

    def _check_pairs(self) -> None:
        """The teacher x students grid, or the suite's explicit pairs."""
        spec = self.spec
        if spec.pairs:
            for i, pair in enumerate(spec.pairs):
                t, st = self._model(pair.teacher, f"pairs[{i}].teacher"), self._model(pair.student, f"pairs[{i}].student")
                if t and st:
                    self.pairs.append((t[0], t[1], st[0], st[1]))
            return
        teacher = self._model(spec.teacher, "teacher") if spec.teacher is not None else None
        for i, st_spec in enumerate(spec.students):
            st = self._model(st_spec, f"students[{i}]")
            if st:
                self.pairs.append((teacher[0] if teacher else None, teacher[1] if teacher else None, st[0], st[1]))

    def _check_modalities(self) -> None:
        for task, _, modality in self.tasks:
            for _, t_mod, st_spec, st_mod in self.pairs:
                for role, mod in (("teacher", t_mod), (f"student {st_spec.label or st_spec.model}", st_mod)):
                    if mod is not None and mod != modality:
                        self.problems.append(f"tasks: task '{task.name}' is {modality} data but the {role} model is for {mod}")

    def _check_method(self, i: int, m: Any, student_labels: list[str]) -> None:
        for label in m.students or []:
            if same_label(label) not in {same_label(x) for x in student_labels}:
                self.problems.append(f"methods[{i}].students: no student labelled '{label}'.{did_you_mean(label, student_labels)} "
                                     f"Students: {', '.join(student_labels)}")
        cls = self._lookup("methods", m.name, f"methods[{i}].name")
        if cls is None:
            return
        if cls.uses_teacher and not (self.spec.teacher is not None or self.spec.pairs):
            self.problems.append(f"methods[{i}]: method '{m.name}' needs a teacher, but the suite has no 'teacher'")
        self._check_capabilities(i, m.name, cls)
        if self.spec.budget.flops is not None and cls.train_step is not Method.train_step and cls.planned_passes is Method.planned_passes:
            self.problems.append(f"methods[{i}]: method '{m.name}' runs its own training step without planning its passes "
                                 "(Method.planned_passes), so a budget in flops cannot say how many steps it gets; give the budget in steps")
        try:
            grid = expand_grid(cls.Params, m.params)
        except ValueError as err:
            self.problems.append(f"methods[{i}].params.{err}")
            grid = []
        settings = []
        for combo in grid:
            opts = _check_options(f"methods[{i}].params", cls.Params, combo, self.problems, {"registry": self.registry})
            if opts is not None:
                self.methods.append((m.name, opts, frozenset(map(same_label, m.students)) if m.students else None, cls.uses_teacher))
                self.problems += [f"methods[{i}].params.{k}: '{printable(v)[:100]}' contains invisible or control characters "
                                  f"({', '.join(unprintable(v)[:5])})" for k, v in opts.items() if isinstance(v, str) and unprintable(v)]
                settings.append(json.dumps(opts, sort_keys=True))
        if m.grid_selection and grid and len(settings) == len(grid) and len(set(settings)) < 2:
            self.problems.append(f"methods[{i}].grid_selection: method '{m.name}' sweeps nothing here (no parameter has a list "
                                 "of values), so there is no grid point to choose; remove grid_selection or sweep a "
                                 "parameter, e.g. temperature: [2.0, 4.0]")

    def _check_capabilities(self, i: int, name: str, cls: type) -> None:
        roles = {("student", st.model, cls.student_needs) for _, _, st, _ in self.pairs}
        if cls.uses_teacher:
            roles |= {("teacher", t.model, cls.teacher_needs) for t, _, _, _ in self.pairs if t is not None}
        for role, model, needs in sorted(roles, key=lambda r: (r[0] != "student", r[1])):
            factory = self.factories.get(model)
            missing = sorted(set(needs) - set(factory.capabilities)) if factory is not None else []
            if missing:
                self.problems.append(f"methods[{i}]: method '{name}' needs the {role} to expose {missing}, but model "
                                     f"'{model}' ({factory.family}) only exposes {sorted(factory.capabilities)}")

    def _facts(self, m: ModelSpec, where: str) -> ModelFacts | None:
        """``m``'s facts from its factory's :meth:`~kdbench.api.ModelFactory.inspect`
        (memoised per model spec), a problem recorded when it is refused."""
        key = m.model_dump_json()
        if key not in self._facts_memo:
            factory = self.factories[m.model]
            try:
                self._facts_memo[key] = factory().inspect(factory.Options(**m.options))
            except KDBenchError as exc:
                self._facts_memo[key] = None
                self.problems.append(f"{where}: model '{m.model}': {exc}")
        return self._facts_memo[key]

    def _check_models(self) -> None:
        """Each method against each teacher/student pair, before anything is built: the
        models' facts (layers, width, heads, tokenizer), the method's own
        :meth:`~kdbench.api.Method.check_models`, and aligned token positions."""
        self._facts_memo: dict[str, ModelFacts | None] = {}
        problems = {}
        for task, _, _ in self.tasks:
            task_cls = self.registry.task(task.name)
            try:
                problem = task_cls(task_cls.Options.model_validate(task.options)).problem
            except Exception:  # noqa: BLE001 - a task whose problem needs its data: the runner checks the built models
                continue
            for i, (teacher, _, student, _) in enumerate(self.pairs):
                where = f"pairs[{i}]" if self.spec.pairs else "teacher"
                t_facts = self._facts(teacher, f"{where}.teacher" if self.spec.pairs else "teacher") if teacher is not None else None
                s_facts = self._facts(student, f"{where}.student" if self.spec.pairs else f"students[{i}]")
                for j, (name, params, only, uses_teacher) in enumerate(self.methods):
                    if s_facts is None or (only is not None and (student.label or describe_model(student)) not in only):
                        continue
                    if uses_teacher and teacher is not None and t_facts is None:
                        continue
                    cls = self.registry.method(name)
                    try:
                        method = cls(cls.Params(**params), problem)
                        if uses_teacher and t_facts is not None:
                            check_alignment(method, t_facts.encoder_id, s_facts.encoder_id, t_facts.name, s_facts.name)
                        method.check_models(s_facts, t_facts if uses_teacher else None)  # type: ignore[arg-type]
                    except KDBenchError as exc:
                        problems.setdefault(str(exc), f"methods ({name}) with teacher {t_facts.name if t_facts else '-'} and "
                                                      f"student {s_facts.name}: {exc}")
        self.problems.extend(problems.values())

    def _unhashed(self, task: TaskSpec, teacher: TeacherSpec | None, student: ModelSpec, uses_teacher: bool) -> tuple[str, ...]:
        return (self.unhashed[f"task:{task.name}"]
                + tuple(f"student.options.{f}" for f in self.unhashed[f"model:{student.model}"])
                + (tuple(f"teacher.options.{f}" for f in self.unhashed[f"model:{teacher.model}"]) if teacher is not None else ())
                + (TEACHER_FREE if teacher is not None and not uses_teacher else ()))

    def runs(self) -> list[RunSpec]:
        spec = self.spec
        runs: list[RunSpec] = []
        seen: set[str] = set()
        for (task, version, _), (teacher, _, student, _), (method, params, only, uses_teacher), seed in itertools.product(
                self.tasks, self.pairs, self.methods, spec.seeds):
            if only is not None and same_label(student.label or describe_model(student)) not in only:
                continue
            run = RunSpec(task=task, task_version=version, teacher=teacher, student=student, method=method, params=params,
                          seed=seed, data_seed=spec.data_seed, quiz_fraction=spec.quiz_fraction, budget=spec.budget,
                          optimizer=spec.optimizer, selection=spec.selection,
                          unhashed=self._unhashed(task, teacher, student, uses_teacher))
            if run.hash not in seen:  # a grid can repeat a point (e.g. [1, 1.0])
                seen.add(run.hash)
                runs.append(run)
        return runs
