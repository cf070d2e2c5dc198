"""Suite validation, grid expansion and run-spec hashing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kdbench.spec import SuiteError, build_suite, load_suite

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"


def smoke() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def problems(data: dict) -> list[str]:
    with pytest.raises(SuiteError) as err:
        build_suite(data)
    return err.value.problems


def test_smoke_expands_to_methods_times_seeds():
    suite = load_suite(SMOKE)
    assert len(suite.runs) == 2 * 2
    assert {(r.method, r.seed) for r in suite.runs} == {("none", 0), ("none", 1), ("kd", 0), ("kd", 1)}
    kd = next(r for r in suite.runs if r.method == "kd")
    assert kd.params == {"alpha": 0.5, "temperature": 2.0}
    none = next(r for r in suite.runs if r.method == "none")
    assert none.params == {}


def test_hash_is_stable_and_depends_on_content():
    a = build_suite(smoke()).runs
    b = build_suite(smoke()).runs
    assert [r.hash for r in a] == [r.hash for r in b]
    assert len({r.hash for r in a}) == len(a)
    reordered = dict(reversed(list(smoke().items())))  # key order does not matter
    assert sorted(r.hash for r in build_suite(reordered).runs) == sorted(r.hash for r in a)
    changed = smoke()
    changed["budget"]["steps"] = 21
    assert not {r.hash for r in build_suite(changed).runs} & {r.hash for r in a}
    # a display label does not change what a run is
    relabeled = smoke()
    relabeled["students"][0]["label"] = "other"
    assert sorted(r.hash for r in build_suite(relabeled).runs) == sorted(r.hash for r in a)
    # defaults are filled in: writing the default explicitly gives the same run
    explicit = smoke()
    explicit["methods"][0]["params"] = {}
    explicit["tasks"][0]["options"]["max_length"] = 32
    assert sorted(r.hash for r in build_suite(explicit).runs) == sorted(r.hash for r in a)


def test_teacher_hash_shared_by_methods_and_seeds():
    runs = build_suite(smoke()).runs
    assert len({r.teacher_hash for r in runs}) == 1
    other = smoke()
    other["quiz_fraction"] = 0.2
    assert build_suite(other).runs[0].teacher_hash != runs[0].teacher_hash


def test_list_of_values_is_a_grid():
    data = smoke()
    data["methods"][1]["params"] = {"alpha": [0.1, 0.9], "temperature": [1, 2, 4]}
    suite = build_suite(data)
    kd = [r for r in suite.runs if r.method == "kd"]
    assert len(kd) == 2 * 3 * 2
    assert {(r.params["alpha"], r.params["temperature"]) for r in kd} == {(a, t) for a in (0.1, 0.9) for t in (1.0, 2.0, 4.0)}


def test_several_students_sweep_capacity():
    data = smoke()
    second = copy.deepcopy(data["students"][0])
    second["options"]["tiny"]["layers"] = 2
    second["label"] = "tiny-2L"
    data["students"].append(second)
    runs = build_suite(data).runs
    assert len(runs) == 8
    assert {r.student_label for r in runs} == {"tiny-1L", "tiny-2L"}


def test_misspelt_method_names_closest():
    data = smoke()
    data["methods"][1]["name"] = "kdd"
    (p,) = problems(data)
    assert p.startswith("methods[1].name: unknown method 'kdd'.")
    assert "Did you mean 'kd'" in p


def test_wrong_fields_named_with_path_and_allowed_values():
    data = smoke()
    data["optimizer"]["name"] = "adamm"
    data["methods"][1]["params"]["temprature"] = 3
    data["budget"]["steps"] = -1
    data["tasks"][0]["options"]["train_sise"] = 5
    found = "\n".join(problems(data))
    assert "optimizer.name" in found and "'adamw', 'adam' or 'sgd'" in found
    assert "budget.steps" in found
    # plugin options are validated only once the schema passes: fix the schema errors
    data["optimizer"]["name"] = "adamw"
    data["budget"]["steps"] = 5
    found = "\n".join(problems(data))
    assert "methods[1].params.temprature: unknown field" in found
    assert "methods[1].params: allowed fields are alpha (default 0.5), temperature (default 4.0)" in found
    assert "tasks[0].options.train_sise: unknown field" in found


def test_bad_values_in_plugin_options():
    data = smoke()
    data["methods"][1]["params"] = {"alpha": 1.5}
    (p, *_) = problems(data)
    assert p.startswith("methods[1].params.alpha: Input should be less than or equal to 1")


def test_unknown_task_and_model():
    data = smoke()
    data["tasks"][0]["name"] = "movie-sentimnet"
    data["teacher"]["model"] = "bertt"
    found = "\n".join(problems(data))
    assert "tasks[0].name: unknown task 'movie-sentimnet'. Did you mean 'movie-sentiment'" in found
    assert "teacher.model: unknown model 'bertt'. Did you mean 'bert'" in found


def test_teacherless_suite_refuses_kd():
    data = smoke()
    del data["teacher"]
    (p,) = problems(data)
    assert p == "methods[1]: method 'kd' needs a teacher, but the suite has no 'teacher'"


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(SuiteError, match="expected a mapping"):
        build_suite([1, 2])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(bad)


def test_yaml_cannot_execute_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned > %s']\n" % (tmp_path / "pwned"))
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(evil)
    assert not (tmp_path / "pwned").exists()


def test_suite_name_cannot_escape_results_folder():
    data = smoke()
    data["name"] = "../../etc"
    (p,) = problems(data)
    assert p.startswith("name: String should match pattern")


def test_method_needing_what_the_model_lacks_is_refused_at_validation():
    from kdbench.api import FEATURES, Method
    from kdbench.hookspecs import hookimpl
    from kdbench.registry import Registry, make_plugin_manager
    import types

    class NeedsFeatures(Method):
        name = "needs-features"
        description = "reads CNN feature maps"
        student_needs = frozenset({"logits", FEATURES})

    pm, broken = make_plugin_manager()
    pm.register(types.SimpleNamespace(kdbench_methods=hookimpl(lambda: [NeedsFeatures])), name="t")
    data = smoke()
    data["methods"] = [{"name": "needs-features"}]
    with pytest.raises(SuiteError) as err:
        build_suite(data, registry=Registry(pm, broken))
    assert err.value.problems == [
        "methods[0]: method 'needs-features' needs the student to expose ['features'], but model 'bert' "
        "(transformer) only exposes ['attention_probs', 'attention_scores', 'embedding', 'hidden_states', 'keys', 'logits', 'queries', 'values']"
    ]


def test_data_locations_do_not_change_what_a_run_is(tmp_path):
    data = smoke()
    base = {r.hash: r.teacher_hash for r in build_suite(data).runs}
    data["tasks"][0]["options"]["source_file"] = str(tmp_path / "snippets.txt")
    moved = build_suite(data).runs
    assert moved[0].task.options["source_file"] == str(tmp_path / "snippets.txt")  # still used to load
    assert {r.hash: r.teacher_hash for r in moved} == base


def test_empty_sweep_is_an_error():
    data = smoke()
    data["methods"][1]["params"] = {"alpha": []}
    assert problems(data) == ["methods[1].params.alpha: an empty list sweeps over nothing"]


def test_tiny_bert_heads_must_divide_width():
    data = smoke()
    data["students"][0]["options"]["tiny"]["hidden"] = 17
    (p,) = problems(data)
    assert p.startswith("students[0].options.tiny: Value error, hidden (17) must be a multiple of heads (2)")
