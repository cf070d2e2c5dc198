"""Recipes: the settings a paper's official code runs, as named and cited presets.

A recipe is a YAML file ``<name>.yaml`` (every value carries a comment naming the official
file and line it comes from); the built-in ones are in ``plugins/kdbench_plugins/recipes/``::

    name: metadistil-glue
    paper: "..."
    sources: ["JetRunner/MetaDistil@80e60c1..."]
    method: {name: metadistil, params: {...}}        # what a suite's method entry gets
    training:                                       # the official student training settings
      optimizer: {...}                              # suite `optimizer` fields
      budget: {...}                                 # suite `budget` fields
      quiz_fraction: 0.1
      selection: final
      task_options: {max_length: 128}
    teacher: {...}                                  # how the official teacher was made (documentation)
    student: {...}                                  # where the official student starts (documentation)
    grid: {param: [values]}                         # the official search grid, when there is one
    differences: ["what kdbench does differently, and why"]

In a suite, a method entry may name a recipe instead of a method; the recipe supplies the
method's name and params, and the entry's own ``params`` override them key by key (a list
value there sweeps, as usual)::

    methods:
      - recipe: metadistil-glue
      - recipe: pkd-glue
        params: {beta: [100, 500]}

A suite's ``optimizer`` and ``budget`` are shared by all its methods (matched budgets), so a
recipe's ``training`` settings apply only when the suite says so, once, at the top level::

    recipe_training: metadistil-glue

Then the suite's ``optimizer``, ``budget``, ``quiz_fraction``, ``selection`` and every task's
options start from that recipe's ``training`` and the suite's own keys win (a suite budget
that gives ``steps`` or ``epochs`` replaces the recipe's length). The expanded suite is
what is validated and hashed: a suite that uses recipes gives exactly the run specs of the
same suite written out by hand.

Names resolve in ``recipes/`` next to the suite file, then in the folders plugins ship
through the ``kdbench_recipe_dirs`` hook (the built-in recipes among them). A value with a ``/`` or a ``.yaml`` suffix is a
path relative to the suite's folder (the working directory for a suite given as data) and
must stay inside it. Files are read with ``yaml.safe_load``: at most 64 KiB, 16 levels
deep, no aliases.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdbench.api import KDBenchError

MAX_BYTES = 64 * 1024
MAX_DEPTH = 16
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_SUFFIXES = (".yaml", ".yml")


class RecipeError(KDBenchError):
    """A recipe that cannot be found, read or validated."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RecipeMethod(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class RecipeTraining(_Strict):
    optimizer: dict[str, Any] = Field(default_factory=dict)
    budget: dict[str, Any] = Field(default_factory=dict)
    quiz_fraction: float | None = Field(None, ge=0, lt=1)
    selection: Literal["final", "validation"] | None = None
    task_options: dict[str, Any] = Field(default_factory=dict)


class Recipe(_Strict):
    name: str
    paper: str
    sources: list[str] = Field(min_length=1, description="repository@commit of each official code base read")
    method: RecipeMethod
    training: RecipeTraining = RecipeTraining()
    teacher: dict[str, Any] = Field(default_factory=dict, description="how the official teacher was made (documentation)")
    student: dict[str, Any] = Field(default_factory=dict, description="how the official student starts (documentation)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="the official search grid (documentation)")
    differences: list[str] = Field(default_factory=list)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plugin_dirs() -> list[Path]:
    """The recipe folders the registered plugins ship (the built-in recipes first)."""
    from kdbench.registry import get_registry

    return get_registry().recipe_dirs()


def search_dirs(source: str | None) -> list[Path]:
    """Where recipe names resolve: ``recipes/`` next to the suite file, then the plugins'."""
    dirs = []
    if source and Path(source).is_file():
        dirs.append(Path(source).resolve().parent / "recipes")
    dirs += [d for d in plugin_dirs() if d not in dirs]
    return dirs


def available(source: str | None = None) -> list[str]:
    """The recipe names a suite at ``source`` can use."""
    names: set[str] = set()
    for d in search_dirs(source):
        if d.is_dir():
            names |= {p.stem for p in d.iterdir() if p.suffix in _SUFFIXES and _NAME.fullmatch(p.stem)}
    return sorted(names)


def _base_dir(source: str | None) -> Path:
    return Path(source).resolve().parent if source and Path(source).is_file() else Path.cwd().resolve()


def resolve(ref: Any, source: str | None = None) -> Path:
    """The file a recipe reference names. Raises :class:`RecipeError`."""
    if not isinstance(ref, str) or not ref:
        raise RecipeError(f"a recipe is named by a string, got {_short(ref)}")
    if "/" in ref or "\\" in ref or ref.endswith(_SUFFIXES):
        base = _base_dir(source)
        path = (base / ref).resolve()
        if not path.is_relative_to(base):
            raise RecipeError(f"recipe path {_short(ref)} leads outside the suite's folder {base}")
        if path.suffix not in _SUFFIXES:
            raise RecipeError(f"recipe path {_short(ref)} is not a .yaml file")
        if not path.is_file():
            raise RecipeError(f"no recipe file {_short(ref)} in {base}")
        return path
    if not _NAME.fullmatch(ref):
        raise RecipeError(f"{_short(ref)} is not a recipe name (letters, digits, '_', '-', '.')")
    for d in search_dirs(source):
        for suffix in _SUFFIXES:
            path = d / f"{ref}{suffix}"
            if path.is_file():
                if not path.resolve().is_relative_to(d.resolve()):  # a symlink out of the folder
                    raise RecipeError(f"recipe {ref!r} in {d} links outside that folder")
                return path
    names = available(source)
    close = difflib.get_close_matches(ref, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise RecipeError(f"unknown recipe {ref!r}.{hint} Available recipes: {', '.join(names) or '(none)'}")


def _parse(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise RecipeError(f"recipe {path} is {len(raw)} bytes; recipes are at most {MAX_BYTES}")
    try:
        text = raw.decode("utf-8")
        depth = 0
        for event in yaml.parse(text, yaml.SafeLoader):  # before building anything
            if isinstance(event, yaml.AliasEvent):
                raise RecipeError(f"recipe {path} uses a YAML alias; write values out")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeError(f"recipe {path} is nested more than {MAX_DEPTH} levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {_short(str(exc), 200)}") from None


def load_recipe(ref: Any, source: str | None = None) -> Recipe:
    """Read and validate the recipe ``ref`` names (see :func:`resolve`)."""
    path = resolve(ref, source)
    data = _parse(path)
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of recipe fields")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        why = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()[:10])
        raise RecipeError(f"recipe {path}: {why}") from None
    if recipe.name != path.stem:
        raise RecipeError(f"recipe {path}: its name {recipe.name!r} differs from the file name {path.stem!r}")
    return recipe


def apply_training(data: dict[str, Any], training: RecipeTraining) -> dict[str, Any]:
    """The suite ``data`` with the recipe's training settings under the suite's own keys."""
    out = dict(data)
    out["optimizer"] = {**training.optimizer, **(data.get("optimizer") or {})}
    budget = dict(data.get("budget") or {})
    length = {k: v for k, v in training.budget.items() if k in ("steps", "epochs")}
    if not {"steps", "epochs"} & budget.keys():
        budget = {**length, **budget}
    out["budget"] = {**{k: v for k, v in training.budget.items() if k not in ("steps", "epochs")}, **budget}
    for key in ("quiz_fraction", "selection"):
        if key not in data and getattr(training, key) is not None:
            out[key] = getattr(training, key)
    if training.task_options and isinstance(data.get("tasks"), list):
        out["tasks"] = [{**t, "options": {**training.task_options, **(t.get("options") or {})}}
                        if isinstance(t, dict) and isinstance(t.get("options") or {}, dict) else t for t in data["tasks"]]
    return out


def expand_method(entry: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """A suite method entry ``{recipe: ..., params: overrides}`` written out."""
    if "name" in entry and entry["name"] != recipe.method.name:
        raise RecipeError(f"the recipe {recipe.name!r} is for method {recipe.method.name!r}, not {_short(entry['name'])}")
    params = entry.get("params") or {}
    if not isinstance(params, dict):
        raise RecipeError("params: expected a mapping of overrides")
    rest = {k: v for k, v in entry.items() if k not in ("recipe", "name", "params")}
    return {"name": recipe.method.name, "params": {**recipe.method.params, **params}, **rest}


def expand_recipes(data: dict[str, Any], source: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """(suite ``data`` with ``recipe:`` method entries and ``recipe_training`` written out,
    the problems found, one line each for the suite's error). ``data`` itself comes back
    when it uses no recipe."""
    methods = data.get("methods")
    entries = list(enumerate(methods)) if isinstance(methods, list) else []
    uses = [i for i, m in entries if isinstance(m, dict) and "recipe" in m]
    if not uses and "recipe_training" not in data:
        return data, []
    problems: list[str] = []
    out = dict(data)
    if "recipe_training" in data:
        out.pop("recipe_training")
        try:
            out = apply_training(out, load_recipe(data["recipe_training"], source).training)
        except RecipeError as err:
            problems.append(f"recipe_training: {err}")
    if uses:
        new_methods = list(methods)
        for i in uses:
            try:
                new_methods[i] = expand_method(methods[i], load_recipe(methods[i]["recipe"], source))
            except RecipeError as err:
                problems.append(f"methods[{i}].recipe: {err}")
        out["methods"] = new_methods
    return out, problems
