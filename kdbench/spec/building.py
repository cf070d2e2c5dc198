"""Building a suite: read and parse a suite file, validate it against the schema
(:mod:`kdbench.spec.schema`) and against the options each plugin declares, check every
method against every teacher/student pair it will meet, and expand it into
:class:`~kdbench.spec.run.RunSpec` objects. Every problem is collected with its field path
into one :class:`~kdbench.spec.schema.SuiteError`."""

from __future__ import annotations

import itertools
import json
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kdbench.api import KDBenchError, Method, ModelFacts, check_alignment, unhashed_fields
from kdbench.loader import MAX_BYTES, LoadError, parse_yaml, printable, snippet, unprintable
from kdbench.registry import Registry, did_you_mean, get_registry
from kdbench.recipes import expand_recipes
from kdbench.spec.run import TEACHER_FREE, RunSpec, describe_model
from kdbench.spec.schema import MAX_RUNS, MethodEntry, ModelSpec, SuiteError, SuiteSpec, TaskSpec, TeacherSpec, same_label


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
