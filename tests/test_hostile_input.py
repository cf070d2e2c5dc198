"""Hostile input: random suite structures (hypothesis), malformed data, missing model files,
broken plugins, and the safety rules (safetensors only, safe YAML, no code execution,
no writes outside the results folder)."""

from __future__ import annotations

import copy
import re
import sys
import warnings
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdbench.registry as registry_module
from kdbench import cli
from kdbench.api import DataError
from kdbench.data import load_task_data
from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.hookspecs import hookimpl
from kdbench.registry import Registry, get_registry, make_plugin_manager
from kdbench.spec import Suite, SuiteError, SuiteSpec, TaskSpec, build_suite, load_suite
from kdbench_plugins.tasks.movie_sentiment import MovieSentiment, parse_snippets

ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "benchmarks" / "smoke.yaml").read_text())
FIELDS = set(SuiteSpec.model_fields) | {"student"}

# ----------------------------------------------------------------------------- random suites

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["kd", "none", "bert", "movie-sentiment", "../x", "adamw", "", "cuda"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(sorted(FIELDS))), inner, max_size=4)),
                      max_leaves=20)


def paths(obj, prefix=()):
    """Every (path) to a value inside a nested dict/list suite."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


ALL_PATHS = [p for p in paths(SMOKE) if p]


@st.composite
def mutated_suites(draw):
    """The smoke suite with 1-3 random edits: a value replaced, a key deleted or added."""
    data = copy.deepcopy(SMOKE)
    for _ in range(draw(st.integers(1, 3))):
        live = [p for p in paths(data) if p]
        path = draw(st.sampled_from(live or ALL_PATHS))
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            kind = draw(st.sampled_from(["replace", "delete", "add"]))
            if kind == "replace":
                parent[path[-1]] = draw(values)
            elif kind == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=6))] = draw(values)
        except (KeyError, IndexError, TypeError):
            pass
    return data


PATH_RE = re.compile(r"^(\(top level\)|\[\d+\]|\['(?:[^'\\]|\\.)*'\]|\[\"(?:[^\"\\]|\\.)*\"\]|[A-Za-z_][A-Za-z0-9_-]*)[.\[:]")


def check_answer(data) -> None:
    """A valid Suite, or a SuiteError whose every problem starts with a field path: a suite
    field, or a key of the input (quoted when it is not a plain name)."""
    try:
        suite = build_suite(data, source="fuzz.yaml")
    except SuiteError as err:
        assert err.problems, "a SuiteError must list its problems"
        keys = set(data) if isinstance(data, dict) else set()
        heads = FIELDS | {"(top level)"} | {f"[{k}]" if isinstance(k, int) else f"[{str(k)!r}]" for k in keys} | {str(k) for k in keys}
        for problem in err.problems:
            head = PATH_RE.match(problem)
            assert head is not None and ": " in problem, problem
            assert head.group(1) in heads, f"no field path in: {problem}"
        assert str(err).startswith("fuzz.yaml: invalid suite")
        return
    assert isinstance(suite, Suite) and suite.runs
    for run in suite.runs:
        assert re.fullmatch(r"[0-9a-f]{16}", run.hash)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_random_structures_give_a_suite_or_a_suite_error(data):
    check_answer(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_suites())
def test_mutated_smoke_suites_give_a_suite_or_a_suite_error(data):
    check_answer(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_random_yaml_text_gives_a_suite_error(tmp_path, text):
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_suite(path)
    except SuiteError as err:
        assert str(err).startswith(str(path))


@pytest.mark.parametrize("field, value, message", [
    ("seeds", [2**70], "seeds: Value error, seeds must be between 0 and 4293918719 (2**32 - 2**20 - 1)"),
    ("seeds", [2**32], "seeds: Value error, seeds must be between 0 and 4293918719 (2**32 - 2**20 - 1)"),
    ("seeds", [-1], "seeds: Value error, seeds must be between 0 and 4293918719 (2**32 - 2**20 - 1)"),
    ("data_seed", -5, "data_seed: Input should be greater than or equal to 0"),
    ("optimizer", {"lr": float("inf")}, "optimizer.lr: Input should be a finite number"),
    ("budget", {"epochs": float("inf")}, "budget.epochs: Input should be a finite number"),
    ("resources", {"cpus": float("nan")}, "resources.cpus: Input should be a finite number"),
    ("name", "..", "name: Value error, '..' is not a suite name"),
    ("name", "../evil", "name: String should match pattern"),
    ("name", "a/b", "name: String should match pattern"),
])
def test_values_that_could_only_fail_later_are_refused_with_their_path(field, value, message):
    data = copy.deepcopy(SMOKE) | {field: value}
    with pytest.raises(SuiteError) as err:
        build_suite(data)
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems


def test_odd_keys_are_quoted_in_the_path():
    with pytest.raises(SuiteError) as err:
        build_suite(copy.deepcopy(SMOKE) | {"bad key: x": 1})
    assert err.value.problems == ["['bad key: x']: unknown field (got 1)"]


# ----------------------------------------------------------------------------- malformed data


def small_movie_file(tmp_path: Path, extra: str = "") -> Path:
    rows = [f"{i}\t{(-1) ** i * 1.5}\tsnippet number {i} is {'good' if i % 2 == 0 else 'bad'}" for i in range(60)]
    path = tmp_path / "snippets.tsv"
    path.write_text("\n".join(rows[:3]) + ("\n" + extra if extra else "") + "\n" + "\n".join(rows[3:]) + "\n")
    return path


@pytest.mark.parametrize("line, message", [
    ("7\t1.0", "snippets.tsv:4: expected 3 tab-separated fields (id, rating, text), got 2"),
    ("7\tgreat\tsome text", "snippets.tsv:4: rating 'great' is not a number"),
])
def test_bad_tsv_rows_name_the_file_and_line(tmp_path, line, message):
    path = small_movie_file(tmp_path, line)
    with pytest.raises(DataError, match=re.escape(message)):
        parse_snippets(path.read_bytes(), str(path))
    (tmp_path / "ok").mkdir()
    good = small_movie_file(tmp_path / "ok")
    texts, labels = parse_snippets(good.read_bytes(), str(good))
    assert len(texts) == 60 and labels.tolist() == [1 - i % 2 for i in range(60)]
    with pytest.raises(DataError, match="no labelled snippets"):
        parse_snippets(b"1\t0\tneutral only\n\n", "empty.tsv")


class _Splits(MovieSentiment):
    """A task whose loader returns what the test asks for."""

    description = "test task"
    splits: dict = {}

    def load(self, cache_dir):
        return copy.deepcopy(type(self).splits)


def _task(name: str, splits: dict) -> type:
    return type(name, (_Splits,), {"name": name, "splits": splits})


def _split(labels, n_text=None):
    labels = np.asarray(labels)
    return {"text": [f"t{i}" for i in range(len(labels) if n_text is None else n_text)], "label": labels}


GOOD = {"train": _split([0, 1] * 10), "validation": _split([0, 1]), "test": _split([1, 0])}
BAD_TASKS = {
    "bad-labels": (GOOD | {"train": _split([0, 1, 2, 1])}, "task 'bad-labels': split 'train' has labels [2] outside 0..1"),
    "negative-labels": (GOOD | {"test": _split([-1, 0])}, "task 'negative-labels': split 'test' has labels [-1] outside 0..1"),
    "empty-split": (GOOD | {"validation": _split([])}, "task 'empty-split': split 'validation' is empty"),
    "missing-split": ({k: v for k, v in GOOD.items() if k != "test"}, "task 'missing-split' did not provide a 'test' split"),
    "ragged-split": (GOOD | {"train": _split([0, 1, 1], n_text=2)}, "task 'ragged-split': split 'train' column 'text' has 2 rows, labels have 3"),
    "no-labels": (GOOD | {"test": {"text": ["a"]}}, "task 'no-labels': split 'test' has no labels"),
}


class BadTasksPlugin:
    @hookimpl
    def kdbench_tasks(self):
        return [_task(name, splits) for name, (splits, _) in BAD_TASKS.items()] + [_task("good-task", GOOD)]


@pytest.fixture(scope="module")
def bad_registry() -> Registry:
    pm, broken = make_plugin_manager(extra_plugins=[BadTasksPlugin()])
    return Registry(pm, broken)


@pytest.mark.parametrize("name", sorted(BAD_TASKS))
def test_malformed_splits_raise_data_error_naming_task_and_split(bad_registry, name):
    with pytest.raises(DataError) as err:
        load_task_data(bad_registry, TaskSpec(name=name, options={}), 0.1, 0)
    assert str(err.value) == BAD_TASKS[name][1]


def suite_with(**changes) -> dict:
    data = copy.deepcopy(SMOKE)
    data.update(teacher=None, methods=[{"name": "none"}], seeds=[0], baseline="none",
                budget={"steps": 4, "batch_size": 8, "eval_every": 4, "log_every": 2})
    data.update(changes)
    return data


def test_bad_data_fails_its_runs_with_the_message_and_a_missing_model_folder_is_refused(tmp_path, bad_registry):
    """The suite goes on: the good task's run is done, each bad one failed with its culprit."""
    bad_file = small_movie_file(tmp_path, "7\t1.0")
    tasks = [{"name": "bad-labels"}, {"name": "empty-split"}, {"name": "good-task"},
             {"name": "movie-sentiment", "options": {"source_file": str(bad_file), "max_length": 16}}]
    suite = build_suite(suite_with(tasks=tasks), registry=bad_registry)
    with pytest.raises(SuiteError, match="pretrained model folder './nonexistent' does not exist"):  # refused before any run
        build_suite(suite_with(tasks=[{"name": "good-task"}], students=[{"model": "bert", "options": {"pretrained": "./nonexistent"}}]),
                    registry=bad_registry)
    run_local(suite, tmp_path / "r", registry=bad_registry, progress=False)
    rows = open_store(tmp_path / "r").runs()
    by_task = {r["task"]: r for r in rows if r["student"] == "tiny-1L"}
    assert by_task["good-task"]["status"] == "done"
    assert by_task["bad-labels"]["status"] == "failed" and BAD_TASKS["bad-labels"][1] in by_task["bad-labels"]["error"]
    assert by_task["empty-split"]["status"] == "failed" and BAD_TASKS["empty-split"][1] in by_task["empty-split"]["error"]
    assert by_task["movie-sentiment"]["status"] == "failed"
    assert f"{bad_file}:4: expected 3 tab-separated fields" in by_task["movie-sentiment"]["error"]
    assert all(r["student"] == "tiny-1L" for r in rows)


# ----------------------------------------------------------------------------- broken plugins


@pytest.fixture
def boom_entry_point(tmp_path, monkeypatch):
    """An installed-looking plugin whose module raises on import."""
    (tmp_path / "kdbench_boom_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = registry_module.entry_points
    fake = EntryPoint(name="boom-plugin", value="kdbench_boom_plugin", group="kdbench")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [*real(group=group), fake])
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    yield
    sys.modules.pop("kdbench_boom_plugin", None)


def test_a_plugin_that_raises_on_import_is_named_and_the_others_still_work(boom_entry_point, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = get_registry(refresh=True)
    assert reg.broken["boom-plugin"] == ("entry point 'boom-plugin = kdbench_boom_plugin' failed to load: RuntimeError: boom at import")
    assert "kd" in reg.names("methods")  # the built-ins are unaffected
    bad = copy.deepcopy(SMOKE)
    bad["methods"] = [{"name": "boom-method"}]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(bad))
    capsys.readouterr()
    assert cli.main(["validate", str(path)]) == 2  # a user-facing error, exit code 2
    err = capsys.readouterr().err
    assert "methods[0].name: unknown method 'boom-method'" in err
    assert "Plugins that failed to load: boom-plugin (entry point 'boom-plugin = kdbench_boom_plugin' failed to load: RuntimeError: boom at import)" in err


class JunkPlugin:
    __name__ = "junk-plugin"

    @hookimpl
    def kdbench_methods(self):
        return "not a list"

    @hookimpl
    def kdbench_models(self):
        return [42]

    @hookimpl
    def kdbench_run_start(self, spec, run_dir, trackers):
        raise RuntimeError("tracker bug")


def test_a_plugin_returning_junk_is_named_and_cannot_break_a_run(tmp_path):
    pm, broken = make_plugin_manager(extra_plugins=[JunkPlugin()])
    with pytest.warns(UserWarning, match="junk-plugin") as caught:
        reg = Registry(pm, broken)
    messages = {str(w.message) for w in caught}
    assert "kdbench plugin 'junk-plugin' is broken: kdbench_methods() returned str, expected a list of Method subclasses" in messages
    assert reg.broken["junk-plugin"].startswith("kdbench_models() returned 42, which is not a named ModelFactory subclass")
    suite = build_suite(suite_with(), registry=reg)
    with pytest.warns(UserWarning, match="kdbench plugin 'junk-plugin' raised in kdbench_run_start: RuntimeError: tracker bug"):
        outcome = run_local(suite, tmp_path, registry=reg, progress=False)
    assert list(outcome.statuses.values()) == ["done"]


# ----------------------------------------------------------------------------- safety

SOURCES = sorted([*(ROOT / "kdbench").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])
FORBIDDEN = {
    r"\byaml\.(load|unsafe_load|full_load|load_all|unsafe_load_all)\(": "yaml.safe_load only",
    r"\b(Unsafe|Full)?Loader\b": "no non-safe YAML loader",
    r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(|\bdill\.|\bmarshal\.loads?\(|\bjoblib\.load\(": "no pickle of files",
    r"\btorch\.save\(": "checkpoints through safetensors",
    r"(?<![\w.])(eval|exec)\(": "no code execution",
    r"trust_remote_code\s*=\s*True": "no remote code",
    r"shell\s*=\s*True": "no shell",
}


def test_the_source_has_no_unsafe_loading_or_code_execution():
    assert len(SOURCES) > 20
    offences = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for pattern, rule in FORBIDDEN.items():
            for m in re.finditer(pattern, text):
                offences.append(f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)} ({rule})")
        # torch.load only with weights_only=True, in the same call
        for m in re.finditer(r"\btorch\.load\(", text):
            call = text[m.start(): text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                offences.append(f"{path.relative_to(ROOT)}: {call} (torch.load needs weights_only=True)")
        # a custom unpickler must restrict what it builds
        if re.search(r"\bpickle\.Unpickler\b", text) and "def find_class" not in text:
            offences.append(f"{path.relative_to(ROOT)}: pickle.Unpickler without a restricting find_class")
    assert offences == []


def test_the_safety_scan_would_catch_offences():
    bad = "x = torch.load(f)\ny = yaml.load(s, Loader=yaml.Loader)\neval('1')\ntorch.save(m, p)\n"
    hits = [rule for pattern, rule in FORBIDDEN.items() if re.search(pattern, bad)]
    assert set(hits) == {"yaml.safe_load only", "no non-safe YAML loader", "no code execution", "checkpoints through safetensors"}
    assert not any(re.search(pattern, "model.eval()\nself.exec_(x)\nyaml.safe_load(s)\nDataLoader(d)") for pattern in FORBIDDEN)


@pytest.mark.parametrize("payload", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:subprocess.call [['touch', '{marker}']]",
    "!!python/name:os.system",
])
def test_a_suite_file_cannot_run_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: {payload.format(marker=marker)}\n" + yaml.safe_dump({k: v for k, v in SMOKE.items() if k != "name"}))
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(path)
    assert not marker.exists()


def test_names_from_the_suite_cannot_write_outside_the_results_folder(tmp_path, monkeypatch):
    """Labels, task and method names with '../' either are refused (names must be
    registered) or only ever show up as text: every file the run writes is under results/."""
    for field, value in [("tasks", [{"name": "../../movie-sentiment"}]), ("methods", [{"name": "../none"}])]:
        with pytest.raises(SuiteError, match=re.escape(f"{field}[0].name: unknown")):
            build_suite(suite_with(**{field: value}))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    data = suite_with(
        name="x..y", results="results",  # relative to the working directory
        tasks=[{"name": "movie-sentiment", "options": {"train_size": 40, "max_length": 16}}],
        teacher=SMOKE["teacher"] | {"label": "../../../teacher-escape"},
        students=[SMOKE["students"][0] | {"label": "../../../../student-escape"}],
        methods=[{"name": "kd", "label": "../../method-escape", "params": {"alpha": 0.5}}], baseline="kd")
    suite = build_suite(data)
    before = {p for p in tmp_path.rglob("*")}
    outcome = run_local(suite, suite.results_dir(), progress=False)
    assert list(outcome.statuses.values()) == ["done"]
    written = {p for p in tmp_path.rglob("*")} - before
    results = (work / "results").resolve()
    assert written and all(p.resolve().is_relative_to(results) or p == results for p in written), sorted(map(str, written))
    assert {p.name for p in written} >= {"store.sqlite", "model.safetensors"}
    (row,) = open_store(results).runs()
    assert row["student"] == "../../../../student-escape"  # kept as text only
