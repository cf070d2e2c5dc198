"""Bad input for the methods published since 2021, refused by `kdbench validate` / `run`
with exit code 2 and a message naming the field, before anything is written: a method that
needs feature maps on a model exposing none, a layer index beyond the model, a temperature
curriculum with no steps, MLKD's empty temperature list, bad compute budgets
(``budget.flops``), and the companion suite itself valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdbench import cli
from kdbench.registry import set_registry

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"
VISION = ROOT / "benchmarks" / "vision-cpu-2021.yaml"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    set_registry(None)
    try:
        code = cli.main(list(args))
    finally:
        set_registry(None)
    return code, capsys.readouterr().err


def suite_with(tmp_path: Path, base: Path, methods: list[dict]) -> Path:
    data = yaml.safe_load(base.read_text())
    data["methods"] = [{"name": "kd"}, *methods]
    data["baseline"] = "kd"
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("base, method, expected", [
    (SMOKE, {"name": "reviewkd"}, "methods[1]: method 'reviewkd' needs the student to expose ['features', 'preact_features'], but model 'bert' (transformer)"),
    (VISION, {"name": "ctkd", "params": {"curriculum_fraction": 0}}, "methods[1].params.curriculum_fraction: Input should be greater than 0"),
    (VISION, {"name": "mlkd", "params": {"temperatures": []}}, "methods[1].params.temperatures: List should have at least 1 item"),
    (VISION, {"name": "mlkd", "params": {"temperatures": [2.0, -1.0]}}, "methods[1].params.temperatures[1]: Input should be greater than 0"),
    # a layer index beyond the model: read from the models' facts before anything is built
    (SMOKE, {"name": "minilm", "params": {"teacher_layer": 7}},
     "method 'minilm' distils teacher layer 7, but the teacher model has 2 layers (valid: 0..1, or -1..-2 counting from the last)"),
    (SMOKE, {"name": "minilmv2", "params": {"relation_heads": 2, "student_layer": -2}},
     "method 'minilmv2' distils student layer -2, but the student model has 1 layers (valid: 0..0, or -1..-1 counting from the last)"),
    (VISION, {"name": "fitnet", "params": {"hint_layer": 3}},
     "method 'fitnet' uses hint_layer 3, but the student model (cnn [2, 4, 8]) exposes only 3 feature maps (indices 0..2)"),
])
def test_refused_at_validate_and_nothing_written(tmp_path, capsys, base: Path, method: dict, expected: str) -> None:
    suite = suite_with(tmp_path, base, [method])
    code, err = run_cli(capsys, "validate", str(suite))
    assert code == 2 and expected in err, err
    results = tmp_path / "results"
    code, err = run_cli(capsys, "run", str(suite), "--results", str(results))
    assert code == 2 and expected in err and not results.exists()


@pytest.mark.parametrize("budget, method, expected", [
    ({"flops": 1e12, "steps": 10}, None, "budget: Value error, give exactly one of 'steps', 'epochs' or 'flops'"),
    ({"flops": 0}, None, "budget.flops: Input should be greater than 0"),
    ({"flops": True}, None, "flops: must be a number, not true/false"),
    ({"flops": 1e22}, None, "flops=1e+22 is above the bound of 1e+21"),
    ({"flops": 1e12}, {"name": "rkl"}, "methods[1]: method 'rkl' runs its own training step without planning its passes"),
    ({"flops": 1e12}, "teacher", "teacher.train.budget.flops: a teacher's fine-tuning has no method whose passes could be counted"),
])
def test_bad_compute_budgets_are_refused_at_validate_and_nothing_written(tmp_path, capsys, budget: dict, method, expected: str) -> None:
    data = yaml.safe_load(SMOKE.read_text())
    if method == "teacher":
        data["teacher"]["train"]["budget"] = {**budget, "batch_size": 16}
        data["budget"] = {"flops": 1e12, "batch_size": 16}
    else:
        data["budget"] = {**budget, "batch_size": 16}
        data["methods"] = [{"name": "kd"}, method] if method else [{"name": "kd"}]
    data["baseline"] = "kd"
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    code, err = run_cli(capsys, "validate", str(suite))
    assert code == 2 and expected in err, err
    results = tmp_path / "results"
    code, err = run_cli(capsys, "run", str(suite), "--results", str(results))
    assert code == 2 and expected in err and not results.exists()


def test_a_compute_budget_validates_for_kd_and_metadistil(capsys, tmp_path) -> None:
    data = yaml.safe_load(SMOKE.read_text())
    data["budget"] = {"flops": 1e12, "batch_size": 16}
    data["methods"], data["baseline"] = [{"name": "kd"}, {"name": "metadistil"}], "kd"
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    set_registry(None)
    try:
        code = cli.main(["validate", str(suite)])
    finally:
        set_registry(None)
    out = capsys.readouterr().out
    runs = len(data["seeds"]) * 2
    assert code == 0 and f"{runs * 1e12:.3g} student-run FLOPs (steps follow from each method's counted passes)" in out, out


def test_companion_suite_expands_as_designed() -> None:
    from kdbench.spec import load_suite

    suite = load_suite(VISION)
    assert len(suite.runs) == 10 * (5 + 4 * 3)  # 10 seeds; 5 single settings, 4 swept over 3 values
    ls = [r for r in suite.runs if r.params.get("logit_standardization")]
    assert {r.method for r in ls} == {"kd", "dkd"} and len(ls) == 2 * 3 * 10
    assert {r.method for r in suite.runs} == {"none", "kd", "dkd", "dist", "mlkd", "ctkd", "reviewkd"}


def test_minilm_paper_suite_schema_and_references() -> None:
    # the schema and references (tests/test_suites.py validates every suite against the registry)
    from kdbench.recipes import expand_recipes
    from kdbench.spec import SuiteSpec

    path = ROOT / "benchmarks" / "paper-glue-minilm.yaml"
    data, problems = expand_recipes(yaml.safe_load(path.read_text()), str(path))
    assert not problems
    spec = SuiteSpec.model_validate(data)
    assert [m.name for m in spec.methods] == ["none", "kd", "minilm", "minilmv2"]
    refs = {(r.task, r.method): r.value for r in spec.references}
    assert refs == {("glue-mnli", "minilm"): 83.3, ("glue-sst2", "minilm"): 91.5, ("glue-qnli", "minilm"): 90.5,
                    ("glue-cola", "minilm"): 47.5, ("glue-rte", "minilm"): 68.8, ("glue-mnli", "minilmv2"): 82.8}
    assert all(r.citation.startswith("microsoft/unilm@300eef0 minilm/README.md") and r.protocol for r in spec.references)


def test_nlp_minilm_suite_shares_nlp_cpus_teacher_and_baseline_runs() -> None:
    from kdbench.spec import load_suite

    base, new = load_suite(ROOT / "benchmarks" / "nlp-cpu.yaml"), load_suite(ROOT / "benchmarks" / "nlp-cpu-minilm.yaml")
    assert {r.teacher_hash for r in new.runs} == {r.teacher_hash for r in base.runs}
    shared = {r.hash for r in new.runs if r.method in ("none", "kd", "pkd", "tinybert")}
    assert len(shared) == 2 * 4 * 9 and shared <= {r.hash for r in base.runs}
    assert sorted({r.method for r in new.runs}) == ["kd", "minilm", "minilmv2", "none", "pkd", "tinybert"]
