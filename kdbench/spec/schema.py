"""The suite file's schema: one frozen pydantic model per section of a suite, the bounds
a suite must stay within, and :class:`SuiteError`, which lists every bad field.

Only the shape of a suite is checked here; what the plugins accept is checked when the
suite is built (:mod:`kdbench.spec.building`). ``docs/suite-file.md`` is generated from
these models (:mod:`kdbench.suite_reference`).
"""

from __future__ import annotations

import typing
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator,
                      model_serializer, model_validator)

from kdbench.api import KDBenchError, added, omit_added_defaults, refuse_bool_numbers
from kdbench.loader import printable, snippet, unprintable


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
                               "dozen per parameter; AdamW over a MiniLM student about 3x faster on a CPU). The same update "
                               "rule, but not bit-identical to the default: runs differ in the last bits and then by seed-level "
                               "noise. Default false keeps stored runs' hashes and numbers.")


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

