"""Issue 26's bad input for the model plugins beside ``hf`` (whose cases are in
tests/test_hf_suites.py), and a family that exposes no attention: each a named error at
``kdbench validate`` (exit 2), the results folder never created. Checkpoints and
tokenizers are made in code (tiny, random, no downloads)."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import yaml

from kdbench import cli
from kdbench.api import ATTENTION_PROBS, ATTENTION_SCORES, HIDDEN_STATES, QUERIES
from kdbench.encoders import family_capabilities
from kdbench.hookspecs import hookimpl
from kdbench.registry import Registry, get_registry, make_plugin_manager, set_registry
from support.suites import smoke_data
from support.tokenizers import write_tokenizer


def _eos_tokenizer(folder: Path, extra: int = 0) -> None:
    """A RoBERTa-style tokenizer whose ``</s>`` is its end of sequence (a causal LM needs one)."""
    from transformers import AutoTokenizer

    write_tokenizer(folder, "roberta", extra=extra)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.eos_token = "</s>"
    tok.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """A 3-layer BERT with its tokenizer, one whose tokenizer is larger than its embedding,
    a 2-block GPT-2 with its tokenizer, and a lone tokenizer of 408 tokens."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    bert_cfg = AutoConfig.for_model("bert", num_hidden_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                    vocab_size=120)
    for name, extra in (("bert-3", 0), ("bert-big-tokenizer", 300)):
        AutoModel.from_config(bert_cfg).save_pretrained(str(root / name))
        write_tokenizer(root / name, "bert", extra=extra)
    gpt_cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2, vocab_size=120, n_positions=64)
    AutoModelForCausalLM.from_config(gpt_cfg).save_pretrained(str(root / "gpt2-2"))
    _eos_tokenizer(root / "gpt2-2")
    _eos_tokenizer(root / "big-tokenizer", extra=300)
    (root / "empty").mkdir()
    return {p.name: str(p) for p in root.iterdir()}


def _student(model: str, options: dict) -> dict:
    return {"students": [{"model": model, "options": options, "label": "s"}]}


def _lm_suite(options: dict) -> dict:
    """A language-model suite (no teacher) with the causal LM ``options`` as its student."""
    data = smoke_data(tasks=[{"name": "algorithmic"}], methods=[{"name": "sft"}], **_student("causal-lm", options))
    data.pop("teacher")
    return data


def cases(f: dict[str, str]) -> dict[str, tuple[dict, str]]:
    """name -> (suite, what the error must say)."""
    return {
        "bert: unknown folder": (smoke_data(**_student("bert", {"pretrained": "./no/such/model"})),
                                 "pretrained model folder './no/such/model' does not exist"),
        "bert: a folder without config.json": (smoke_data(**_student("bert", {"pretrained": f["empty"]})), "has no config.json"),
        "bert: layers the config lacks": (smoke_data(**_student("bert", {"pretrained": f["bert-3"], "layers": [0, 5]})),
                                          "bert option layers: [5] out of range, the model has layers 0..2"),
        "bert: num_layers over the teacher's": (
            smoke_data(teacher={"model": "bert", "options": {"pretrained": f["bert-3"], "num_layers": 4}}),
            "teacher: model 'bert': bert option num_layers: 4 but the model has only 3 layers"),
        "bert: a tokenizer not the model's": (smoke_data(**_student("bert", {"pretrained": f["bert-big-tokenizer"]})),
                                              "the tokenizer has 408 tokens but the model's embedding has 120 rows"),
        "causal-lm: unknown folder": (_lm_suite({"pretrained": "./no/such/model"}),
                                      "pretrained model folder './no/such/model' does not exist"),
        "causal-lm: num_layers over the model's": (_lm_suite({"pretrained": f["gpt2-2"], "num_layers": 3}),
                                                   "causal-lm option num_layers: 3 but the model has only 2 blocks"),
        "causal-lm: layers the config lacks": (_lm_suite({"pretrained": f["gpt2-2"], "layers": [0, 4]}),
                                               "layers/num_layers: [4] out of range, the model has blocks 0..1"),
        "causal-lm: a tokenizer not the model's": (_lm_suite({"pretrained": f["gpt2-2"], "tokenizer": f["big-tokenizer"]}),
                                                   "the tokenizer has 408 tokens but the model's embedding has 120 rows"),
        "hf: a checkpoint of no registered family": (smoke_data(**_student("hf", {"pretrained": f["gpt2-2"]})),
                                                     "no registered model family covers"),
    }


def _refused(tmp_path: Path, data: dict, message: str, capsys) -> None:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(data)))
    results = tmp_path / "results"
    assert cli.main(["validate", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not results.exists()


CASES = ["bert: unknown folder", "bert: a folder without config.json", "bert: layers the config lacks",
         "bert: num_layers over the teacher's", "bert: a tokenizer not the model's", "causal-lm: unknown folder",
         "causal-lm: num_layers over the model's", "causal-lm: layers the config lacks", "causal-lm: a tokenizer not the model's",
         "hf: a checkpoint of no registered family"]


@pytest.mark.parametrize("case", CASES)
def test_bad_model_input_is_a_named_error_at_validate(tmp_path, folders, case, capsys) -> None:
    data, message = cases(folders)[case]
    _refused(tmp_path, data, message, capsys)


def test_the_same_models_with_good_options_validate(tmp_path, folders, capsys) -> None:
    for data in (smoke_data(**_student("bert", {"pretrained": folders["bert-3"], "num_layers": 2})),
                 _lm_suite({"pretrained": folders["gpt2-2"], "num_layers": 1})):
        path = tmp_path / "suite.yaml"
        path.write_text(yaml.safe_dump(data))
        assert cli.main(["validate", str(path), "--results", str(tmp_path / "results")]) == 0, capsys.readouterr().err
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------ a family without attention


def _no_attention_registry() -> Registry:
    Bert = get_registry().family("bert")

    class NoAttention(Bert):  # type: ignore[misc, valid-type]
        """BERT's layout, declared without an attention capture point (as a family whose
        attention kdbench cannot read would be)."""

        name = "bert-no-attention"
        model_types = ("bert",)  # built tiny by its name here; never matched to a checkpoint
        attention = None

    plugin = types.SimpleNamespace(kdbench_families=hookimpl(lambda: [NoAttention]))
    return Registry(*make_plugin_manager([plugin]))


def test_a_family_without_an_attention_capture_point_exposes_no_attention() -> None:
    family = _no_attention_registry().family("bert-no-attention")
    assert family_capabilities(family) == {"logits", HIDDEN_STATES, "embedding"}
    assert {ATTENTION_PROBS, ATTENTION_SCORES, QUERIES} <= family_capabilities(get_registry().family("bert"))


@pytest.mark.parametrize("method,needs", [("tinybert", "['attention_scores']"), ("minilm", "['attention_probs', 'values']")])
def test_a_method_needing_attention_on_a_family_with_none_is_refused(tmp_path, method, needs, capsys) -> None:
    tiny = {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}
    data = smoke_data(**_student("hf", {"family": "bert-no-attention", "tiny": tiny}), methods=[{"name": method}], baseline=method)
    # a teacher of a family with attention and the same (hashing) tokenizer: only the student lacks what the method reads
    data["teacher"] |= {"model": "hf", "options": {"family": "bert", "tiny": {**tiny, "layers": 2}}}
    set_registry(_no_attention_registry())
    try:
        _refused(tmp_path, data, f"method '{method}' needs the student to expose {needs}", capsys)
    finally:
        set_registry(None)
