"""Per-role inputs: teacher and student each read their own encoding of the same examples,
one shared object when they share a tokenizer, and methods that compare token positions
refused at validation for two tokenizers."""

from __future__ import annotations

import pytest
import torch

from kdbench.api import STUDENT, TEACHER, Batch, check_alignment
from kdbench.data import QUIZ, TRAIN
from kdbench.spec import SuiteError, build_suite
from kdbench.train import Runner
from kdbench.train.loop import batches
from kdbench.train.teachers import provide_teacher
from kdbench.executors.phases import open_store
from support.suites import smoke_data


class _Index:
    """A factory stand-in: collates by indexing, like the default ModelFactory.collate."""

    def collate(self, encoded, index):
        return {k: v[index] for k, v in encoded.items()}


def test_batch_without_teacher_inputs_shares_the_students_object():
    inputs = {"x": torch.arange(4)}
    b = Batch(inputs, torch.zeros(4), torch.arange(4))
    assert b.teacher_inputs is inputs and b.inputs_for(TEACHER) is inputs and b.inputs_for(STUDENT) is inputs
    assert b.shares_inputs
    other = {"x": torch.arange(4) + 10}
    b2 = Batch(inputs, torch.zeros(4), torch.arange(4), other)
    assert b2.inputs_for(TEACHER) is other and not b2.shares_inputs
    with pytest.raises(ValueError, match="unknown role 'pilot'"):
        b.inputs_for("pilot")


def test_batches_collate_the_teachers_encoding_at_the_same_indices():
    student = {"ids": torch.arange(10)[:, None] * 2}
    teacher = {"ids": torch.arange(10)[:, None] * 3 + 1, "extra": torch.arange(10)}
    labels = torch.arange(10)
    gen = torch.Generator().manual_seed(0)
    it = batches(_Index(), student, labels, 4, gen, torch.device("cpu"), teacher=(_Index(), teacher))
    for _ in range(5):
        b = next(it)
        assert torch.equal(b.inputs["ids"][:, 0], b.index * 2)
        assert torch.equal(b.teacher_inputs["ids"][:, 0], b.index * 3 + 1)
        assert torch.equal(b.teacher_inputs["extra"], b.index) and torch.equal(b.labels, b.index)
    # the same encoding object: one collate, one batch object for both roles
    shared = next(batches(_Index(), student, labels, 4, torch.Generator().manual_seed(0), torch.device("cpu"), teacher=(_Index(), student)))
    assert shared.teacher_inputs is shared.inputs


def _tiny(vocab: int, layers: int = 1, hidden: int = 16) -> dict:
    return {"model": "bert", "options": {"tiny": {"layers": layers, "hidden": hidden, "heads": 2, "intermediate": 32, "vocab_size": vocab}}}


def _two_vocab_suite(methods: list[dict], teacher_vocab: int = 500, student_vocab: int = 1000) -> dict:
    """The smoke suite with a teacher whose (hashing) vocabulary is smaller than the
    student's: a student id fed to the teacher would index past its embedding."""
    teacher = {**_tiny(teacher_vocab, layers=2, hidden=16), "train": {"budget": {"steps": 4, "batch_size": 16, "eval_every": 4},
                                                                 "optimizer": {"name": "adamw", "lr": 0.001}}}
    return smoke_data(teacher=teacher, students=[{**_tiny(student_vocab, layers=2), "label": "s"}], methods=methods, seeds=[0],
                      budget={"steps": 3, "batch_size": 8, "eval_every": 3, "log_every": 1})


@pytest.mark.parametrize("method", [{"name": "kd"}, {"name": "metadistil", "params": {"inner": "kd"}}, {"name": "prokt"}])
def test_per_example_methods_train_across_tokenizers(tmp_path, method):
    suite = build_suite(_two_vocab_suite([method]))
    (spec,) = suite.runs
    runner = Runner(tmp_path, device="cpu", progress=False, share_teacher_outputs=False)
    teacher = provide_teacher(spec, tmp_path, open_store(tmp_path), runner.registry, runner.device)
    p = runner._prepare(spec, teacher)
    assert p.teacher_encoded[TRAIN] is not p.encoded[TRAIN]
    assert int(p.teacher_encoded[TRAIN]["input_ids"].max()) < 500 <= int(p.encoded[TRAIN]["input_ids"].max())
    result = runner.run(spec, teacher)
    assert result.status == "done", result.error


def test_one_tokenizer_one_encoding_object(tmp_path):
    suite = build_suite(_two_vocab_suite([{"name": "kd"}], teacher_vocab=1000))
    (spec,) = suite.runs
    runner = Runner(tmp_path, device="cpu", progress=False)
    p = runner._prepare(spec, provide_teacher(spec, tmp_path, open_store(tmp_path), runner.registry, runner.device))
    for split in (TRAIN, QUIZ, "validation"):
        assert p.teacher_encoded[split] is p.encoded[split]


@pytest.mark.parametrize("method,why", [({"name": "pkd", "params": {"beta": 0.0}}, "position 0"),
                                        ({"name": "tinybert"}, "token by token"),
                                        ({"name": "metadistil", "params": {"inner": "pkd", "beta": 0.0}}, "position 0")])
def test_position_methods_refused_across_tokenizers_at_validation(method, why):
    with pytest.raises(SuiteError) as err:
        build_suite(_two_vocab_suite([method]))
    text = str(err.value)
    assert f"method '{method['name']}' needs teacher and student to see the same token positions" in text
    assert why in text and "bert:tiny500" in text and "bert:tiny1000" in text


def test_check_alignment_passes_per_example_methods_and_equal_encodings():
    from kdbench_plugins.methods.kd import KD
    from kdbench_plugins.methods.pkd import PKD

    check_alignment(KD, "a", "b")
    check_alignment(PKD, "a", "a")
    with pytest.raises(Exception, match="method 'pkd'.*tokenizer is a .model T. and the student's b .model S."):
        check_alignment(PKD, "a", "b", "T", "S")
