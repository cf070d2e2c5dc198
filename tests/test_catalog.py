"""`kdbench list methods --format md`: the method table generated from the registry, the
CLI that prints it, and README.md's copy of it (between its methods markers), which must
agree with the registry so the README's list of methods cannot go stale."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdbench import cli
from kdbench.api import ATTENTION_SCORES, FEATURES, HIDDEN_STATES, LOGITS, Method
from kdbench.catalog import BEGIN, END, between_markers, methods_markdown, needs_in_words
from kdbench.hookspecs import hookimpl
from kdbench.registry import Registry, get_registry, make_plugin_manager

README = Path(__file__).resolve().parents[1] / "README.md"


class Piped(Method):
    name = "piped"
    description = "a method whose formula holds a pipe"
    formula = "KL(p_t || p_s) + |x|"
    citation = "Nobody 2099, Journal of | Pipes"
    student_needs = frozenset({LOGITS, HIDDEN_STATES})
    teacher_needs = frozenset({LOGITS, ATTENTION_SCORES, FEATURES})


class Bare(Method):
    name = "bare"
    description = "no formula given"
    uses_teacher = False
    teacher_needs = frozenset({LOGITS, FEATURES})  # ignored: it has no teacher


class _Plugin:
    @staticmethod
    @hookimpl
    def kdbench_methods() -> list[type[Method]]:
        return [Piped, Bare]


def test_rows_by_hand() -> None:
    pm, broken = make_plugin_manager([_Plugin])
    table = methods_markdown(Registry(pm, broken), "[bp][ai][rp]e*").splitlines()
    assert table == [
        "| method | loss | citation | reads | MetaDistil can wrap it |",
        "|---|---|---|---|---|",
        "| `bare` | no formula given | - | logits | no |",
        "| `piped` | `KL(p_t \\|\\| p_s) + \\|x\\|` | Nobody 2099, Journal of \\| Pipes | logits, hidden states, attention, features | yes |",
    ]
    assert needs_in_words(Piped) == "logits, hidden states, attention, features"


def test_every_registered_method_is_a_row_with_a_formula_and_a_citation() -> None:
    reg = get_registry()
    rows = methods_markdown(reg).splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == reg.names("methods")
    # the vision and classic transformer methods give a one-line formula (the language-model
    # methods added alongside are described in words until they do)
    for name in ("none", "kd", "dkd", "crd", "at", "fitnet", "pkd", "tinybert", "prokt", "dist", "mlkd", "ctkd", "reviewkd", "minilm", "minilmv2"):
        cls = reg.get("methods", name)
        assert cls.formula and (cls.citation or name == "none"), name
    for name in ("dist", "mlkd", "ctkd", "reviewkd"):
        assert name in reg.names("methods")


def test_cli_prints_the_table_and_refuses_md_for_other_kinds(capsys) -> None:
    assert cli.main(["list", "methods", "--format", "md"]) == 0
    assert capsys.readouterr().out == methods_markdown(get_registry())
    assert cli.main(["list", "methods", "d*", "--format", "md"]) == 0
    assert [r.split("`")[1] for r in capsys.readouterr().out.splitlines()[2:]] == ["dist", "dkd"]
    assert cli.main(["list", "tasks", "--format", "md"]) == 2
    assert "kdbench list methods --format md" in capsys.readouterr().err


def test_readme_table_is_the_registrys() -> None:
    text = README.read_text()
    found = between_markers(text)
    if found is None:
        pytest.skip(f"README.md has no {BEGIN} ... {END} markers yet (its owner adds them)")
    assert found == methods_markdown(get_registry()).strip(), (
        "README.md's method table is stale: replace the lines between the methods markers with "
        "the output of `kdbench list methods --format md`")
