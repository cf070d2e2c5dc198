"""Row names never show a parameter left unset as "None": a null value reads as the word
its method's field declares (``kdbench.api.nullable``: token-kd's ``teacher_topk`` reads
"full") or "off"; checked on the function that makes row names, on the grid-selection
settings, and on the committed llm-cpu report (two token-kd entries, one with the full
teacher) in every file format, with the run hashes the store holds."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from kdbench.api import NULL_READS, Options, nullable, null_reads
from kdbench.report import build_report
from kdbench.report.formats import write_outputs
from kdbench.report.frame import label
from kdbench.report.selection import swept_label
from kdbench.report.text import render_report
from kdbench.spec import load_suite
from kdbench.store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]


class _Params(Options):
    k: int | None = nullable("a top-k", reads="full", ge=1)
    clip: float | None = nullable("a clip")


def test_nullable_declares_the_word_and_leaves_the_dump_alone():
    assert (null_reads(_Params, "k"), null_reads(_Params, "clip"), null_reads(_Params, "absent")) == ("full", "off", "off")
    assert NULL_READS == "off"
    assert _Params().model_dump(mode="json") == {"k": None, "clip": None}  # what run specs (and hashes) hold
    with pytest.raises(ValueError):
        _Params(k=0)  # the constraints still apply


def test_row_names_read_null_as_the_methods_word():
    varying = {"teacher_topk"}
    assert label("token-kd", {"teacher_topk": None, "temperature": 1.0}, varying) == "token-kd(teacher_topk=full)"
    assert label("token-kd", {"teacher_topk": 16, "temperature": 1.0}, varying) == "token-kd(teacher_topk=16)"
    # an entry's label names the row; the registered method says how null reads
    assert label("kd-full", {"teacher_topk": None}, varying, "token-kd") == "kd-full(teacher_topk=full)"
    assert label("metadistil", {"teacher_grad_clip": None}, {"teacher_grad_clip"}) == "metadistil(teacher_grad_clip=off)"
    assert label("not-registered", {"x": None}, {"x"}) == "not-registered(x=off)"
    assert swept_label({"teacher_topk": None, "temperature": 2.0}, ["teacher_topk", "temperature"], "skew-kl") == \
        "teacher_topk=full, temperature=2.0"


@pytest.fixture(scope="module")
def llm_cpu(tmp_path_factory):
    """The committed llm-cpu report rebuilt from a copy of its store (the committed file is
    never opened for writing)."""
    folder = tmp_path_factory.mktemp("llm-cpu")
    shutil.copy(ROOT / "results" / "llm-cpu" / "store.sqlite", folder / "store.sqlite")
    suite = load_suite(ROOT / "benchmarks" / "llm-cpu.yaml")
    store = ResultsStore(folder / "store.sqlite")
    rep = build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="llm-cpu")
    return suite, rep, folder


def test_llm_cpu_rows_name_the_full_teacher_in_every_format(llm_cpu):
    suite, rep, folder = llm_cpu
    rows = set(rep.board["method"])
    assert {"token-kd(teacher_topk=full)", "token-kd(teacher_topk=16)"} <= rows
    files = write_outputs(rep, ["md", "csv", "json", "html", "latex"], folder / "out", plots=False)
    texts = {p.name: p.read_text() for p in files} | {"terminal": render_report(rep, "terminal")}
    assert {".md", ".csv", ".json", ".html", ".tex"} <= {Path(n).suffix for n in texts if n != "terminal"}
    for name, text in texts.items():
        assert "teacher_topk=None" not in text, name
    main = [n for n in texts if Path(n).stem in ("leaderboard", "report", "terminal")]
    assert {Path(n).suffix for n in main} == {".md", ".csv", ".json", ".html", ".tex", ""}, main
    for name in main:
        assert "teacher_topk=full" in texts[name].replace("\\_", "_"), name  # LaTeX escapes the underscore
    # names only: the store's runs are the suite's, hash for hash
    db = sqlite3.connect(f"file:{ROOT / 'results' / 'llm-cpu' / 'store.sqlite'}?mode=ro", uri=True)
    assert {h for (h,) in db.execute("select hash from runs")} == {r.hash for r in suite.runs}
