"""Mixed-family smoke suites on the ``hf`` factory (tiny random encoders, offline
tokenizers written in code, real movie-review snippets), and the model inputs that
``kdbench validate`` refuses with a named error, exit 2, nothing written."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from kdbench import cli
from kdbench.data import TRAIN
from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.spec import SuiteError, build_suite
from kdbench.train import Runner
from kdbench.train.teachers import provide_teacher
from support.tokenizers import WORDS, write_tokenizer

SIZE = {"hidden": 16, "heads": 2, "intermediate": 32, "vocab_size": 120}


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, str]:
    """A RoBERTa-style tokenizer, and a BERT-style one over another vocabulary (the same
    words in another order: every id means another word)."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {"roberta": str(write_tokenizer(root / "roberta", "roberta")),
            "bert": str(write_tokenizer(root / "bert", "bert", tuple(reversed(WORDS)))),
            "big": str(write_tokenizer(root / "big", "bert", extra=200)),
            "plain": str(write_tokenizer(root / "plain", "roberta", specials=False))}


def hf(family: str, layers: int, tokenizer: str | None, **more) -> dict:
    return {"model": "hf", "options": {"family": family, "tiny": {"layers": layers, **SIZE}, "tokenizer": tokenizer, "dropout": 0.0, **more}}


def suite(toks: dict, student: dict, methods: list[dict], **changes) -> dict:
    teacher = {**hf("roberta", 3, toks["roberta"]), "train": {"budget": {"steps": 4, "batch_size": 8, "eval_every": 4},
                                                            "optimizer": {"name": "adamw", "lr": 0.001}}}
    data = {"name": "hf-smoke", "tasks": [{"name": "movie-sentiment", "options": {"train_size": 200, "max_length": 24}}],
            "teacher": teacher, "students": [{**student, "label": "student"}], "methods": methods, "seeds": [0],
            "budget": {"steps": 3, "batch_size": 8, "eval_every": 3, "log_every": 1},
            "optimizer": {"name": "adamw", "lr": 0.001}, "quiz_fraction": 0.1, "baseline": methods[0]["name"]}
    data.update(changes)
    return data


SAME_VOCAB = [{"name": "none"}, {"name": "kd"}, {"name": "pkd", "params": {"beta": 10.0}}, {"name": "tinybert"},
              {"name": "metadistil", "params": {"inner": "kd"}}]


def test_roberta_teacher_into_distilbert_student_sharing_a_vocabulary(tmp_path, toks):
    s = build_suite(suite(toks, hf("distilbert", 2, toks["roberta"]), SAME_VOCAB))
    outcome = run_local(s, tmp_path, progress=False)
    rows = {r["method"]: r for r in open_store(tmp_path).runs()}
    assert sorted(rows) == ["kd", "metadistil", "none", "pkd", "tinybert"]
    for name, row in rows.items():
        assert row["status"] == "done", (name, row["error"])
        assert 0 <= row["metrics"]["test"]["accuracy"] <= 100
    assert outcome is not None
    # one tokenizer: teacher and student read one encoding object
    spec = next(r for r in s.runs if r.method == "kd")
    runner = Runner(tmp_path, device="cpu", progress=False)
    p = runner._prepare(spec, provide_teacher(spec, tmp_path, open_store(tmp_path), runner.registry, runner.device))
    assert p.teacher_encoded[TRAIN] is p.encoded[TRAIN] and "token_type_ids" not in p.encoded[TRAIN]


def test_roberta_teacher_into_bert_student_with_another_vocabulary(tmp_path, toks):
    s = build_suite(suite(toks, hf("bert", 2, toks["bert"]), [{"name": "kd"}, {"name": "metadistil", "params": {"inner": "kd"}}]))
    run_local(s, tmp_path, progress=False)
    rows = open_store(tmp_path).runs()
    assert sorted(r["method"] for r in rows) == ["kd", "metadistil"]
    assert all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    spec = s.runs[0]
    runner = Runner(tmp_path, device="cpu", progress=False)
    p = runner._prepare(spec, provide_teacher(spec, tmp_path, open_store(tmp_path), runner.registry, runner.device))
    t_ids, s_ids = p.teacher_encoded[TRAIN]["input_ids"], p.encoded[TRAIN]["input_ids"]
    assert t_ids.shape[0] == s_ids.shape[0] and not torch.equal(t_ids, s_ids)
    assert "token_type_ids" in p.encoded[TRAIN] and "token_type_ids" not in p.teacher_encoded[TRAIN]


def test_pkd_across_tokenizers_is_refused_naming_method_tokenizers_and_why(toks):
    with pytest.raises(SuiteError) as err:
        build_suite(suite(toks, hf("bert", 2, toks["bert"]), [{"name": "kd"}, {"name": "pkd", "params": {"beta": 10.0}}]))
    text = str(err.value)
    assert "method 'pkd' needs teacher and student to see the same token positions" in text
    assert "position 0 ([CLS])" in text and "hf tiny roberta" in text and "hf tiny bert" in text
    assert text.count("TokenizersBackend#") == 2


def test_pkd_refuses_a_tokenizer_with_no_classification_token_first(toks):
    data = suite(toks, hf("distilbert", 2, toks["plain"]), [{"name": "pkd", "params": {"beta": 10.0}}])
    data["teacher"] = hf("roberta", 3, toks["plain"])
    with pytest.raises(SuiteError, match=r"pkd's patient term reads the \[CLS\] vector at position 0, but the student's tokenizer puts no "
                                         "special token first"):
        build_suite(data)
    build_suite({**data, "methods": [{"name": "pkd", "params": {"beta": 0.0}}]})  # no patient term: nothing read at position 0


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toks) -> str:
    """A saved 3-layer RoBERTa-family encoder with its tokenizer."""
    from transformers import AutoConfig, AutoModel

    folder = tmp_path_factory.mktemp("ckpt") / "roberta-3"
    cfg = AutoConfig.for_model("roberta", num_hidden_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                               vocab_size=120, pad_token_id=0, bos_token_id=1, eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(str(folder))
    write_tokenizer(folder, "roberta")
    return str(folder)


def bad_cases(toks: dict, ckpt: str) -> dict[str, tuple[dict, str]]:
    """name -> (suite changes, what the error must say)."""
    good_student = hf("distilbert", 2, toks["roberta"])
    return {
        "unknown family": ({"students": [{**hf("gpt9", 2, None), "label": "s"}]}, "unknown family 'gpt9'"),
        "unknown folder": ({"students": [{"model": "hf", "options": {"pretrained": "./no/such/model"}, "label": "s"}]},
                           "pretrained model folder './no/such/model' does not exist"),
        "layers it lacks": ({"students": [{"model": "hf", "options": {"pretrained": ckpt, "layers": [0, 5]}, "label": "s"}]},
                            "layers [5] out of range, the model has layers 0..2"),
        "num_layers over the teacher's": ({"teacher": {"model": "hf", "options": {"pretrained": ckpt, "num_layers": 4}},
                                           "students": [{**good_student, "label": "s"}]}, "num_layers 4 but the model has only 3 layers"),
        "student deeper than teacher": ({"teacher": {"model": "hf", "options": {"pretrained": ckpt}},
                                         "students": [{**hf("distilbert", 4, toks["roberta"]), "label": "s"}],
                                         "methods": [{"name": "pkd", "params": {"beta": 10.0}}], "baseline": "pkd"},
                                        "the student has 4 layers and the teacher only 3"),
        "tokenizer not the model's": ({"students": [{**hf("bert", 2, toks["big"]), "label": "s"}]},
                                      "the tokenizer has 308 tokens but the model's embedding has 120 rows"),
        "attention from a family without scores": ({"students": [{**hf("deberta-v2", 2, toks["roberta"]), "label": "s"}],
                                                    "methods": [{"name": "tinybert"}], "baseline": "tinybert"},
                                                   "method 'tinybert' needs the student to expose ['attention_scores']"),
        "pooler on a family without one": ({"students": [{**hf("distilbert", 2, toks["roberta"], pooling="pooler"), "label": "s"}]},
                                           "family 'distilbert' has no pooler"),
    }


CASES = ["unknown family", "unknown folder", "layers it lacks", "num_layers over the teacher's", "student deeper than teacher",
         "tokenizer not the model's", "attention from a family without scores", "pooler on a family without one"]


@pytest.mark.parametrize("case", CASES)
def test_bad_model_input_is_refused_at_validate_with_exit_2_and_nothing_written(tmp_path, toks, checkpoint, case, capsys):
    changes, message = bad_cases(toks, checkpoint)[case]
    data = suite(toks, hf("distilbert", 2, toks["roberta"]), [{"name": "kd"}])
    data.update(copy.deepcopy(changes))
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    results = tmp_path / "results"
    assert cli.main(["validate", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert cli.main(["run", str(path), "--results", str(results)]) == 2
    assert not results.exists()
