"""The suite file reference (``docs/suite-file.md``), generated from the schema.

Every section of a suite file is a pydantic model in :mod:`kdbench.spec.schema`; this module
walks them from :class:`kdbench.spec.SuiteSpec` down and writes one table per section:
each field's type, default, bounds and meaning. The meaning is the field's own
``description`` in the schema, else the short note kept here in :data:`NOTES` (a test
fails when a note names a field the schema no longer has, or when the committed page
differs from what this module writes now)::

    python -m kdbench.suite_reference --write     # regenerate docs/suite-file.md
    python -m kdbench.suite_reference --check     # exit 1 when the page is stale
    python -m kdbench.suite_reference --plugins   # every installed plugin's options (stdout)

Plugin options (a method's ``params``, a task's or model's ``options``) belong to the
installed plugins, not to the suite schema: ``--plugins`` prints them from the registry.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

PAGE = Path(__file__).resolve().parents[1] / "docs" / "suite-file.md"

#: Meanings of fields whose schema gives no ``description`` ("Model.field": text).
NOTES: dict[str, str] = {
    "SuiteSpec.name": "the suite's name; results go to `results/<name>/` unless `results` says otherwise",
    "SuiteSpec.description": "free text, shown in reports",
    "SuiteSpec.tasks": "the data sets every method is trained and scored on",
    "SuiteSpec.teacher": "the one teacher of every student (fine-tuned once per task, teacher spec and seed); "
                         "omit for suites of teacher-free methods",
    "SuiteSpec.students": "the students; several make a capacity sweep. `student:` (one) is accepted too",
    "SuiteSpec.methods": "the methods compared, each with its parameters (a list value sweeps)",
    "SuiteSpec.seeds": "one run per seed of every (task, student, method setting); distinct, 0 to 2**63-1",
    "SuiteSpec.budget": "how long each student trains: identical for every method",
    "SuiteSpec.optimizer": "the students' optimizer and schedule: identical for every method",
    "SuiteSpec.quiz_fraction": "share of train carved off as the quiz split, for every method (MetaDistil's quiz set)",
    "SuiteSpec.data_seed": "seeds the split carve-outs (kept fixed across the run seeds)",
    "SuiteSpec.selection": "the reported evaluation: `final` (the last) or `validation` (the best on validation; "
                           "never the test split)",
    "SuiteSpec.device": "`auto` takes a GPU when there is one",
    "SuiteSpec.resources": "what each run asks of a cluster executor (`--executor ray`)",
    "SuiteSpec.trackers": "registered trackers that watch every run (`kdbench list trackers`), e.g. `tensorboard`",
    "SuiteSpec.references": "published numbers the report compares with",
    "SuiteSpec.baseline": "the method every other is compared with; default: the first method listed",
    "TaskSpec.name": "a registered task (`kdbench list tasks`)",
    "TaskSpec.options": "the task's options (`python -m kdbench.suite_reference --plugins`)",
    "ModelSpec.model": "a registered model family (`kdbench list models`)",
    "ModelSpec.options": "the model family's options (`python -m kdbench.suite_reference --plugins`)",
    "ModelSpec.label": "the student's name in reports (display only: not part of a run's hash); unique in a suite",
    "TeacherSpec.model": "a registered model family (`kdbench list models`)",
    "TeacherSpec.options": "the model family's options",
    "TeacherSpec.label": "display name (not hashed)",
    "TeacherTraining.budget": "the teacher's fine-tuning budget",
    "TeacherTraining.optimizer": "the teacher's fine-tuning optimizer",
    "TeacherTraining.seed": "the teacher's fine-tuning seed (one teacher serves every run seed)",
    "MethodEntry.name": "a registered method (`kdbench list methods`)",
    "MethodEntry.params": "the method's parameters; a list value sweeps over its items (a grid over all lists)",
    "PairSpec.teacher": "this pair's teacher",
    "PairSpec.student": "this pair's student",
    "OptimizerSpec.name": "the optimizer",
    "OptimizerSpec.lr": "peak learning rate",
    "OptimizerSpec.weight_decay": "decoupled for AdamW, L2 for Adam and SGD",
    "OptimizerSpec.momentum": "SGD only",
    "OptimizerSpec.nesterov": "SGD only",
    "OptimizerSpec.schedule": "after warm-up: linear to 0, constant, cosine to 0, or x`gamma` at each milestone",
    "OptimizerSpec.warmup_ratio": "share of the steps with a linear warm-up from 0",
    "OptimizerSpec.milestones": "`multistep`: optimizer steps (epochs when the budget is in epochs) where the rate is "
                                "multiplied by `gamma`",
    "OptimizerSpec.gamma": "`multistep`'s factor",
    "OptimizerSpec.grad_clip": "clip the gradient's global norm to this value",
    "Budget.steps": "optimizer steps (give `steps`, `epochs` or `flops`); at most 10^7 (`KDBENCH_MAX_STEPS` raises it)",
    "Budget.epochs": "passes over the training split (give `steps`, `epochs` or `flops`); at most 10^4 (`KDBENCH_MAX_EPOCHS`)",
    "Budget.batch_size": "training batch size",
    "Budget.eval_batch_size": "largest evaluation batch (halved on a GPU out-of-memory)",
    "Budget.log_every": "steps between logged losses",
    "Resources.cpus": "CPUs a run asks of a cluster",
    "Resources.gpus": "GPUs a run asks of a cluster (fractions share one)",
    "Reference.task": "the task the number is for",
    "Reference.method": "the method (a method name of the suite)",
    "Reference.value": "the published number, on the report's scale (x100)",
    "Reference.metric": "its metric; default the task's main metric",
    "Reference.student": "the student label it is for; default any",
    "Reference.teacher": "the teacher it is for; default any",
    "Reference.citation": "where it was read (paper, table)",
}

RECIPES = """\
## Expanded before validation

- `methods[i].recipe: NAME` fills the entry's `name` and `params` from
  the recipe NAME (a cited official setting: `plugins/kdbench_plugins/recipes/NAME.yaml`, or
  a recipe folder a plugin adds through `kdbench_recipe_dirs`); `params` given beside it
  override single values.
- `recipe_training: NAME` at the top adopts that recipe's `optimizer` and `budget` for the
  whole suite (every method trains under it).

See `kdbench/recipes.py` and `docs/FIDELITY.md`.
"""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = ", ".join(_type_name(a) for a in args)
        return {list: "list", tuple: "list", dict: "mapping"}[origin] + (f" of {inner}" if origin is not dict and inner else "")
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _models_in(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models_in(a)]


def _bounds(info: Any) -> str:
    names = {"Gt": ("> ", "gt"), "Ge": (">= ", "ge"), "Lt": ("< ", "lt"), "Le": ("<= ", "le"),
             "MinLen": ("length >= ", "min_length"), "MaxLen": ("length <= ", "max_length")}
    out = []
    for m in info.metadata:
        kind = type(m).__name__
        if kind in names:
            prefix, attr = names[kind]
            out.append(prefix + str(getattr(m, attr)))
        elif hasattr(m, "pattern") and m.pattern:
            out.append(f"matches `{m.pattern}`")
    return ", ".join(out)


def _default(info: Any) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "its defaults" if value.model_dump() else "{}"
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def section(model: type[BaseModel]) -> str:
    """One model's table: field, type, default, bounds, meaning."""
    doc = " ".join((model.__doc__ or "").split()).replace("``", "`")
    rows = [f"## {model.__name__}", ""] + ([doc, ""] if doc and not doc.startswith(("Usage docs", "!!!")) else [])
    rows += ["| field | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        meaning = info.description or NOTES.get(f"{model.__name__}.{name}", "")
        rows.append(f"| `{name}` | {_cell(_type_name(info.annotation))} | {_cell(_default(info))} | {_cell(_bounds(info))} "
                    f"| {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """``root`` and every model its fields reach, in first-reached order."""
    seen: list[type[BaseModel]] = []
    queue = [root]
    while queue:
        model = queue.pop(0)
        if model in seen:
            continue
        seen.append(model)
        for info in model.model_fields.values():
            queue += _models_in(info.annotation)
    return seen


def render() -> str:
    """The whole page."""
    from kdbench.spec import SuiteSpec

    parts = ["# Suite file reference", "",
             "<!-- generated by `python -m kdbench.suite_reference --write` from the schema in kdbench/spec/schema.py; "
             "do not edit by hand (tests/test_docs.py fails when it is stale) -->", "",
             "A suite is a YAML file (read with `yaml.safe_load`, bounded: 1 MB, 64 levels, 10 000 characters a value). "
             "Unknown fields, infinite or NaN numbers and out-of-range values are refused by `kdbench validate` with "
             "the field's path (exit code 2), before anything is written. The top level is a "
             "[SuiteSpec](#suitespec); a method's `params` and a task's or model's `options` are the plugin's own "
             "(`python -m kdbench.suite_reference --plugins` lists them with their defaults; every option is filled "
             "in with its default in the run spec that is hashed).", ""]
    parts += [section(m) for m in models(SuiteSpec)]
    parts.append(RECIPES)
    return "\n".join(parts).rstrip() + "\n"


def plugin_options() -> str:
    """Every installed plugin's options (methods' ``Params``, tasks' and models' ``Options``)."""
    from kdbench.registry import get_registry

    reg = get_registry()
    out = []
    for kind, attr in (("methods", "Params"), ("tasks", "Options"), ("models", "Options")):
        for name, entry in sorted(reg.entries[kind].items()):
            cls = getattr(entry.cls, attr, None)
            if cls is not None and issubclass(cls, BaseModel):
                out.append(section(cls).replace(f"## {cls.__name__}", f"## {kind[:-1]} `{name}` ({entry.plugin})", 1))
    return "\n".join(out)


def stale_notes() -> list[str]:
    """Keys of :data:`NOTES` that name no field of the schema any more."""
    from kdbench.spec import SuiteSpec

    fields = {f"{m.__name__}.{f}" for m in models(SuiteSpec) for f in m.model_fields}
    return sorted(set(NOTES) - fields)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdbench.suite_reference", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(PAGE.parents[1])}")
    g.add_argument("--check", action="store_true", help="exit 1 when the committed page differs from the schema")
    g.add_argument("--plugins", action="store_true", help="print every installed plugin's options")
    args = p.parse_args(argv)
    if args.plugins:
        print(plugin_options())
    elif args.write:
        PAGE.write_text(render(), encoding="utf-8")
    elif args.check:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != render():
            print(f"{PAGE} is stale: run `python -m kdbench.suite_reference --write`", file=sys.stderr)
            return 1
    else:
        print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
