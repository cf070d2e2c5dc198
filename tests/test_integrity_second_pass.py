"""Fault injection for issue 27, the integrity second pass: caches keyed by content, every
identity column under the checksum, seeds and labels that cannot alias, strict types,
named file-system errors, atomic report writes, stale claims and exit codes.

Each test's first docstring line names the case (as in test_integrity.py). Only the
end-to-end cache test trains (tiny models, a few seconds); the rest inject faults into
store rows, cache files, source files and suite texts.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import kdbench.data as data_module
from kdbench import cli
from kdbench.api import DataError
from kdbench.data import TaskData, encode_split
from kdbench.loader import printable, unprintable
from kdbench.report import build_report, render_report
from kdbench.report.html import render_html
from kdbench.report.text import report_json
from kdbench.sources import check_source_file, read_source_file
from kdbench.spec import MAX_SEED, SuiteError, build_suite
from kdbench.store import (CHECKSUM_2, CORRUPT, DONE, RUN_CHECKED, RUN_IDENTITY, RUNNING, UNVERIFIED, VERIFIED, ResultsStore,
                           StoreIntegrityWarning, owner_alive, row_checksum)
from kdbench.train import artefacts
from kdbench.train import teachers as teachers_mod

ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "benchmarks" / "smoke.yaml").read_text())
METRICS = {"main_metric": "accuracy", "test": {"accuracy": 0.533}, "validation": {"accuracy": 0.5}}


def smoke(**changes) -> dict:
    data = copy.deepcopy(SMOKE)
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def specs():
    return build_suite(smoke()).runs


def finished_store(path: Path, specs, metrics=METRICS) -> ResultsStore:
    store = ResultsStore(path)
    for spec in specs:
        assert store.claim(spec)
        store.finish(spec, DONE, metrics=metrics, cost={"wall_s": 2.0, "train_s": 1.0}, env={})
    return store


def sql(path: Path, statement: str, *args) -> None:
    con = sqlite3.connect(path)
    con.execute(statement, args)
    con.commit()
    con.close()


# ============================================================ 1. caches keyed by content


class CountingFactory:
    """An encoder whose output depends on the text, with a settable id and file hash."""

    name = "counting"
    calls = 0

    def __init__(self, encoder="enc-a", files=""):
        self.encoder, self.files = encoder, files

    def encoder_id(self, options):
        return self.encoder

    def encoder_fingerprint(self, options):
        return self.files

    def encode(self, options, examples, max_length):
        CountingFactory.calls += 1
        return {"input_ids": torch.tensor([[len(t), max_length] for t in examples["text"]])}


def text_data(texts, max_length=8) -> TaskData:
    return TaskData(SimpleNamespace(max_length=max_length), {"train": {"text": list(texts), "label": np.zeros(len(texts))}})  # type: ignore[arg-type]


def test_tokenisation_cache_is_rebuilt_when_any_input_changes(tmp_path, monkeypatch):
    """case: the texts change at the same path (and the encoder, its files, max_length)."""
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path))
    key = {"task": {"name": "t", "options": {"source_file": "/same/path.txt"}}}

    def encode(factory, data):
        monkeypatch.setattr(data_module, "_ENCODED", {})  # the disk cache decides, not the process memo
        before = CountingFactory.calls
        out = encode_split(factory, None, data, "train", key)
        return out["input_ids"], CountingFactory.calls - before

    first, built = encode(CountingFactory(), text_data(["aa", "bbb"]))
    assert built == 1 and first.tolist() == [[2, 8], [3, 8]]
    assert encode(CountingFactory(), text_data(["aa", "bbb"]))[1] == 0  # same inputs: read from the cache
    changed, built = encode(CountingFactory(), text_data(["aaaa", "b"]))  # new text, same path and key parts
    assert built == 1 and changed.tolist() == [[4, 8], [1, 8]]
    assert encode(CountingFactory(encoder="enc-b"), text_data(["aa", "bbb"]))[1] == 1  # another tokenizer
    assert encode(CountingFactory(files="vocab-v2"), text_data(["aa", "bbb"]))[1] == 1  # its files changed
    other_length, built = encode(CountingFactory(), text_data(["aa", "bbb"], max_length=16))  # another option
    assert built == 1 and other_length[:, 1].tolist() == [16, 16]
    assert len(list((tmp_path / "encoded").glob("*.safetensors"))) == 5
    assert not list((tmp_path / "encoded").glob("*tmp*"))


def test_task_data_memo_reads_a_changed_source_file_again_in_the_same_process(tmp_path, monkeypatch):
    """case: the data file rewritten while a process lives on (a Ray worker of a cluster
    that serves several kdbench run, a notebook): was served from the memo by task spec,
    so the new run trained on the old texts and recorded their fingerprints."""
    from kdbench.registry import get_registry

    monkeypatch.setattr(data_module, "_TASK_DATA", {})
    lines = [f"{i}\t{(-1) ** i * 1.5}\tsnippet number {i}" for i in range(60)]
    src = tmp_path / "snippets.txt"
    src.write_text("\n".join(lines))
    (spec,) = {r.task.model_dump_json(): r.task for r in build_suite(smoke(tasks=[{"name": "movie-sentiment", "options": {
        "source_file": str(src), "max_length": 16}}])).runs}.values()
    first = data_module.load_task_data(get_registry(), spec, 0.1, 0)
    assert data_module.load_task_data(get_registry(), spec, 0.1, 0) is first  # unchanged: the memo
    src.write_text("\n".join(line.replace("\t1.5\t", "\tX\t").replace("\t-1.5\t", "\t1.5\t").replace("\tX\t", "\t-1.5\t")
                             for line in lines))  # same path and size, every label flipped
    second = data_module.load_task_data(get_registry(), spec, 0.1, 0)
    assert second is not first and len(data_module._TASK_DATA) == 1  # the old copy is let go
    for split in ("train", "test"):
        assert second.fingerprints[split]["sha256"] != first.fingerprints[split]["sha256"]
        np.testing.assert_array_equal(second.splits[split]["label"], 1 - first.splits[split]["label"])


def bert_folder(folder: Path, words: list[str]) -> Path:
    """A BERT checkpoint folder as the hub ships one: config.json, vocab.txt (one token a
    line, its line number its id) and tokenizer_config.json."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).to_json_file(folder / "config.json")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return folder


def test_a_changed_vocabulary_file_rebuilds_the_tokenisation_cache_in_the_same_process(tmp_path, monkeypatch):
    """case: vocab.txt of a local tokenizer rewritten while the process runs (was: the
    tokenizer stayed in memory by path, so its encoder id and the cache key stayed the old ones)."""
    from kdbench_plugins.models.bert import BertFactory, BertOptions
    from kdbench_plugins.models.hf import HFFactory, HFOptions

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_module, "_ENCODED", {})
    words = ["good", "bad", "film"]
    folder = bert_folder(tmp_path / "ckpt", words)
    data = text_data(["good film", "bad film"])
    key = {"task": {"name": "t", "options": {}}}
    calls = []
    real = BertFactory.encode
    monkeypatch.setattr(BertFactory, "encode", lambda self, *a: calls.append(1) or real(self, *a))
    factory, options = BertFactory(), BertOptions(pretrained=str(folder))

    def ids():
        return encode_split(factory, options, data, "train", key)["input_ids"][:, :4].tolist()

    before = (factory.encoder_id(options), factory.encoder_fingerprint(options))
    assert ids() == [[2, 5, 7, 3], [2, 6, 7, 3]] and len(calls) == 1  # [CLS] good film [SEP]
    # encoding leaves truncation and padding set on the tokenizer: not part of its identity
    # (was: the id changed after the first encoding, so the next look-up missed the cache)
    assert factory.encoder_id(options) == before[0]
    assert ids() == [[2, 5, 7, 3], [2, 6, 7, 3]] and len(calls) == 1  # unchanged: from the cache
    bert_folder(folder, list(reversed(words)))  # same path, new vocabulary: film 5, bad 6, good 7
    assert ids() == [[2, 7, 5, 3], [2, 6, 5, 3]] and len(calls) == 2
    after = (factory.encoder_id(options), factory.encoder_fingerprint(options))
    assert after[0] != before[0] and after[1] != before[1] and len(after[1]) == 16
    hf = HFFactory()
    hf_options = HFOptions(pretrained=str(folder))
    assert hf.encoder_fingerprint(hf_options) == after[1]  # the same files, the same fingerprint
    bert_folder(folder, words)  # back to the first vocabulary: the first cache file again
    assert ids() == [[2, 5, 7, 3], [2, 6, 7, 3]] and len(calls) == 2
    assert (factory.encoder_id(options), factory.encoder_fingerprint(options)) == before
    assert hf.encoder_fingerprint(hf_options) == before[1]
    assert BertFactory().encoder_fingerprint(BertOptions(tiny={"layers": 1, "hidden": 8, "heads": 2, "intermediate": 8,
                                                                "vocab_size": 50})) == ""


def test_hub_tokenizer_files_are_keyed_by_the_cached_snapshot(tmp_path, monkeypatch):
    """case: a hub tokenizer updated upstream and downloaded again (the cache's refs/main
    moves to a new snapshot): its fingerprint changes, and the process's tokenizer is read again."""
    import huggingface_hub.constants as hub_constants

    from kdbench.encoders import TokenizerCache, tokenizer_files_sha256

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--acme--tok"
    assert tokenizer_files_sha256("acme/tok") == ""  # not downloaded yet

    def snapshot(commit: str, vocab: str) -> None:
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / "vocab.txt").write_text(vocab)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    snapshot("a" * 40, "[PAD]\ngood\n")
    first = tokenizer_files_sha256("acme/tok")
    cache, loads = TokenizerCache(), []
    assert cache.get("acme/tok", lambda: loads.append(1) or "tokenizer v1") == "tokenizer v1"
    assert cache.get("acme/tok", lambda: loads.append(1) or "never") == "tokenizer v1" and len(loads) == 1
    snapshot("b" * 40, "[PAD]\nbad\n")
    assert tokenizer_files_sha256("acme/tok") not in ("", first)
    assert cache.get("acme/tok", lambda: loads.append(1) or "tokenizer v2") == "tokenizer v2" and len(loads) == 2
    assert tokenizer_files_sha256("not a repo name!") == ""


def _logits_key(monkeypatch, tmp_path, *, weights=1.0, texts=("a", "bb"), encoder="enc-a", files="", max_length=8):
    path = tmp_path / f"ckpt-{weights}.safetensors"
    sha = artefacts.write_tensors(path, {"w": torch.full((2,), weights)})
    checkpoint = teachers_mod.TeacherCheckpoint("t0", path, sha)
    registry = SimpleNamespace(model=lambda name: type("F", (CountingFactory,), {"Options": dict,
                                                                                "__init__": lambda self: CountingFactory.__init__(self, encoder, files)}))
    spec = SimpleNamespace(teacher=SimpleNamespace(model="counting", options={}))
    return teachers_mod.logits_inputs(checkpoint, spec, registry, text_data(texts, max_length))  # type: ignore[arg-type]


def test_teacher_logits_key_changes_with_each_input(tmp_path, monkeypatch):
    """case: retrained teacher, new train data, another tokenizer, its files, max_length."""
    base = _logits_key(monkeypatch, tmp_path)
    assert _logits_key(monkeypatch, tmp_path) == base
    variants = [dict(weights=2.0), dict(texts=("a", "bc")), dict(encoder="enc-b"), dict(files="v2"), dict(max_length=9)]
    keys = [_logits_key(monkeypatch, tmp_path, **v) for v in variants]
    assert base not in keys and len(set(keys)) == len(keys)


def test_cached_teacher_logits_are_recomputed_for_another_key(tmp_path):
    """case: the teacher's cached train logits after the data changed and the teacher was retrained."""
    path = tmp_path / "teachers" / "t0" / "model.safetensors"
    checkpoint = teachers_mod.TeacherCheckpoint("t0", path, artefacts.write_tensors(path, {"w": torch.ones(2)}))
    old = teachers_mod.shared_train_logits(checkpoint, lambda: torch.zeros(3, 2), "key-old-data")
    assert old.sum() == 0
    same = teachers_mod.shared_train_logits(checkpoint, lambda: pytest.fail("recomputed with the same inputs"), "key-old-data")
    torch.testing.assert_close(same, old)
    with pytest.warns(UserWarning, match="another checkpoint, data or tokenisation"):
        new = teachers_mod.shared_train_logits(checkpoint, lambda: torch.ones(3, 2), "key-new-data")
    assert new.sum() == 6
    assert teachers_mod.shared_train_logits(checkpoint, lambda: pytest.fail("recomputed"), "key-new-data").sum() == 6


LINES = [f"{i}\t{(-1) ** i * 1.5}\tsnippet number {i} is {'good' if i % 2 == 0 else 'bad'}" for i in range(80)]


def test_rerun_after_new_data_uses_logits_of_the_new_teacher_on_the_new_data(tmp_path, monkeypatch, fault_registry):
    """case: the issue's scenario end to end: data changed at the same path, --rerun."""
    from kdbench.executors.local import run_local
    from kdbench.spec import load_suite
    from kdbench.train.inputs import encoded_splits
    from kdbench.train.evaluation import predict

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_module, "_TASK_DATA", {})
    monkeypatch.setattr(data_module, "_ENCODED", {})
    src = tmp_path / "snippets.txt"
    src.write_text("\n".join(LINES))
    suite_data = smoke(tasks=[{"name": "movie-sentiment", "options": {"source_file": str(src), "max_length": 16}}],
                       methods=[{"name": "kd"}], seeds=[0], results=None,
                       budget={"steps": 4, "batch_size": 8, "eval_every": 4, "log_every": 2})
    suite_data["teacher"]["train"]["budget"] = {"steps": 4, "batch_size": 8}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite_data))
    results = tmp_path / "results"
    run_local(load_suite(path, fault_registry), results, registry=fault_registry, progress=False)
    src.write_text("\n".join(line.replace("good", "fine").replace("bad", "poor") for line in LINES))
    monkeypatch.setattr(data_module, "_TASK_DATA", {})
    suite = load_suite(path, fault_registry)
    from kdbench.integrity import preflight
    from kdbench.executors.phases import open_store

    preflight(suite, open_store(results), suite.runs, rerun=True)
    run_local(suite, results, rerun=True, registry=fault_registry, progress=False)
    spec = suite.runs[0]
    store = open_store(results)
    checkpoint = teachers_mod.ready_teacher(store, results, spec.teacher_hash)
    data = data_module.load_task_data(fault_registry, spec.task, spec.quiz_fraction, spec.data_seed)
    key = teachers_mod.logits_inputs(checkpoint, spec, fault_registry, data)
    assert artefacts.read_metadata(checkpoint.logits_path)[teachers_mod.LOGITS_KEY] == key
    teacher = teachers_mod.load_teacher(checkpoint, spec, fault_registry, data, torch.device("cpu"))
    factory, encoded = encoded_splits(fault_registry, spec, data, spec.teacher, ["train"])
    live = predict(teacher, factory, encoded["train"], 5, torch.device("cpu"))
    cached = teachers_mod.shared_train_logits(checkpoint, lambda: pytest.fail("stale key"), key)
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)


# ============================================================ 2. the checksum covers identity


BAD_VALUES = {"task": "movie-rating", "method": "phantom", "student": "tiny-1L ", "seed": 7, "params": '{"alpha": 0.9}',
              "teacher_hash": "0000000000000000"}


@pytest.mark.parametrize("scheme", [1, 2])
@pytest.mark.parametrize("column", RUN_IDENTITY)
def test_one_changed_identity_column_makes_the_row_corrupt(tmp_path, specs, column, scheme):
    """case: one changed byte in task, method, student, seed, params or teacher (new and old rows)."""
    path = tmp_path / "store.sqlite"
    spec = next(s for s in specs if s.method == "kd")
    finished_store(path, [spec])
    if scheme == 1:  # a row as written before identity columns were covered
        con = sqlite3.connect(path)
        con.row_factory = sqlite3.Row
        row = dict(con.execute("SELECT * FROM runs").fetchone())
        con.execute("UPDATE runs SET checksum=?", (row_checksum(row, RUN_CHECKED),))
        con.commit()
        con.close()
    store = ResultsStore(path)
    assert [r["integrity"] for r in store.runs()] == [VERIFIED]
    sql(path, f"UPDATE runs SET {column}=?", BAD_VALUES[column])
    with pytest.warns(StoreIntegrityWarning, match=spec.hash):
        assert store.runs() == []  # never a phantom row
    (row,) = store.runs(include_corrupt=True)
    assert row["integrity"] == CORRUPT
    if scheme == 1:
        assert column in row["integrity_problem"]


def test_a_row_retrained_for_a_damaged_identity_is_whole_again(tmp_path, specs):
    """case: --rerun of a row whose method column was changed: the damage is not kept under a new checksum."""
    from kdbench.integrity import preflight

    path = tmp_path / "store.sqlite"
    spec = next(s for s in specs if s.method == "kd")
    store = finished_store(path, [spec])
    sql(path, "UPDATE runs SET method='phantom'")
    out = preflight(build_suite(smoke()), store, [spec], rerun=False, load_data=lambda s: SimpleNamespace(fingerprints={}))
    assert out.corrupt == 1
    assert store.claim(spec)
    store.finish(spec, DONE, metrics=METRICS, cost={}, env={})
    (row,) = store.runs()
    assert row["method"] == "kd" and row["integrity"] == VERIFIED


def test_seed_stored_as_text_or_real_is_corrupt(tmp_path, specs):
    """case: the seed column holds text or a fraction: pairing by seed must not move."""
    path = tmp_path / "store.sqlite"
    finished_store(path, specs[:1])
    store = ResultsStore(path)
    for value in (f"seed {specs[0].seed}", float(specs[0].seed) + 0.5):  # SQLite keeps these as text and real
        sql(path, "UPDATE runs SET seed=?", value)
        assert [r["integrity"] for r in store.runs(include_corrupt=True)] == [CORRUPT]


def test_new_rows_carry_scheme_2_and_committed_rows_still_verify(tmp_path, specs):
    """case: committed stores keep verifying (old checksum, identity checked against the spec)."""
    store = finished_store(tmp_path / "store.sqlite", specs[:1])
    con = sqlite3.connect(tmp_path / "store.sqlite")
    assert con.execute("SELECT checksum FROM runs").fetchone()[0].startswith(CHECKSUM_2)
    con.close()
    assert store.get(specs[0].hash)["integrity"] == VERIFIED
    old_rows: set[tuple[str, str]] = set()  # (hash, checksum) of the rows of stores wholly before scheme 2
    mixed: dict[Path, list[dict]] = {}
    for folder in sorted((ROOT / "results").iterdir()):
        for db in folder.glob("*.sqlite"):
            copy_path = tmp_path / folder.name / db.name
            copy_path.parent.mkdir()
            shutil.copy(db, copy_path)
            rows = ResultsStore(copy_path, readonly=True).runs(include_corrupt=True)
            finished = [r for r in rows if r["status"] == DONE]
            assert finished and all(r["integrity"] == VERIFIED for r in finished), db
            # a store committed before scheme 2 is never re-checksummed (every row keeps the old
            # scheme); a store made since carries scheme 2 on the rows it trained
            schemes = {str(r["checksum"]).startswith(CHECKSUM_2) for r in finished}
            if schemes == {False}:
                old_rows |= {(r["hash"], str(r["checksum"])) for r in finished}
            elif len(schemes) == 2:
                mixed[db] = [r for r in finished if not str(r["checksum"]).startswith(CHECKSUM_2)]
    # a mix only where a suite reused another suite's runs (nlp-cpu-minilm holds nlp-cpu's kd,
    # pkd, tinybert and none rows): every old-scheme row is a row of an old store, unchanged
    for db, rows in mixed.items():
        strays = [r["hash"] for r in rows if (r["hash"], str(r["checksum"])) not in old_rows]
        assert not strays, f"{db}: old-scheme rows found in no store committed before scheme 2: {strays}"


def test_verify_counts_verified_unverified_and_corrupt(tmp_path, monkeypatch, capsys):
    """case: kdbench verify on a store with one verified, one unverified and one corrupt row."""
    monkeypatch.chdir(tmp_path)
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(smoke(results="res")))
    suite = build_suite(smoke(results="res"))
    db = tmp_path / "res" / "store.sqlite"
    finished_store(db, suite.runs[:3])
    assert cli.main(["verify", str(suite_path)]) == 0
    out = capsys.readouterr().out
    assert "3 finished and verified" in out and "0 corrupt" in out and f"{len(suite.runs) - 3} not in the store" in out
    sql(db, "UPDATE runs SET checksum=NULL, finished_at=0 WHERE hash=?", suite.runs[0].hash)  # from before checksums
    sql(db, "UPDATE runs SET method='phantom' WHERE hash=?", suite.runs[1].hash)
    assert cli.main(["verify", str(suite_path)]) == cli.EXIT_CORRUPT == 5
    out = capsys.readouterr().out
    assert "1 finished and verified" in out and "1 finished but unverified" in out and "1 corrupt" in out
    assert suite.runs[0].hash in out and f"{suite.runs[1].hash}: method disagree" in out


def test_every_report_format_names_unverified_corrupt_and_missing_runs(tmp_path, specs):
    """case: rows from before checksums reported like verified ones; a corrupt row called 'not in the store yet'."""
    db = tmp_path / "store.sqlite"
    store = finished_store(db, specs[:3])
    sql(db, "UPDATE runs SET checksum=NULL, finished_at=0 WHERE hash=?", specs[0].hash)
    sql(db, "UPDATE runs SET metrics=replace(metrics, '0.533', '0.933') WHERE hash=?", specs[1].hash)
    report = build_report(store, [s.hash for s in specs], chance=False)
    assert report.integrity.verified == 1 and report.integrity.unverified == [specs[0].hash]
    assert report.integrity.corrupt == [specs[1].hash] and report.missing == len(specs) - 3
    texts = {fmt: render_report(report, fmt) for fmt in ("terminal", "md", "latex")}
    texts["html"] = render_html(report)
    texts["json"] = json.dumps(report_json(report))
    for fmt, text in texts.items():
        assert specs[0].hash in text and "unverified" in text, fmt
        assert specs[1].hash in text and "failed their checksum" in text, fmt
        assert f"{len(specs) - 3} run(s) of the suite not in the store yet" in text, fmt
    from kdbench.report.formats import write_outputs

    written = write_outputs(report, ["csv"], tmp_path, plots=False)
    side = next(p for p in written if p.name.endswith("store_integrity.csv"))
    assert side.read_text().splitlines()[1:] == [f"{specs[1].hash},corrupt", f"{specs[0].hash},unverified"]


# ============================================================ 3. seeds and labels


@pytest.mark.parametrize("field,value", [("seeds", [0, 2**32]), ("seeds", [MAX_SEED]), ("data_seed", 2**32 + 5)])
def test_seeds_that_would_alias_are_refused(field, value):
    """case: seeds 2**32 apart (bit-identical runs counted as two seeds)."""
    with pytest.raises(SuiteError, match=field):
        build_suite(smoke(**{field: value}))
    assert build_suite(smoke(seeds=[0, MAX_SEED - 1])).runs


def test_teacher_training_seed_is_bounded_too():
    """case: the teacher's fine-tuning seed above the bound."""
    data = smoke()
    data["teacher"]["train"]["seed"] = 2**32
    with pytest.raises(SuiteError, match=r"teacher\.train\.seed"):
        build_suite(data)


def test_largest_seed_keeps_its_derived_streams_below_2_32():
    """case: seed + the fixed stream offsets (quiz +1, CRD +1_000_003) past 2**32 would wrap."""
    from kdbench.api import stream_seed

    assert all(stream_seed(MAX_SEED - 1, s) < 2**32 for s in ("data", "quiz", "crd-negatives"))


STUDENT = SMOKE["students"][0]


@pytest.mark.parametrize("label", ["tiny\u200b", "tiny\u202eL1", "tiny\x00", "tiny\x1b[31m", "tiny\u2028"])
def test_labels_with_invisible_or_control_characters_are_refused(tmp_path, label, capsys, monkeypatch):
    """case: zero-width space, right-to-left override, NUL, terminal escape, line separator in a label."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(smoke(students=[dict(STUDENT, label=label)], results="res")))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", str(suite)]) == 2
    assert cli.main(["run", str(suite)]) == 2
    err = capsys.readouterr().err
    assert "invisible or control characters" in err and not unprintable(err.replace("\n", ""))
    assert not (tmp_path / "res").exists()


def test_method_labels_and_student_filters_compare_after_normalisation():
    """case: the same label typed as NFC and NFD: one label, never two students."""
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    with pytest.raises(SuiteError, match="differ only in Unicode form"):
        build_suite(smoke(students=[dict(STUDENT, label=nfc), dict(STUDENT, label=nfd, options={**STUDENT["options"], "dropout": 0.2})]))
    suite = build_suite(smoke(students=[dict(STUDENT, label=nfc)], methods=[{"name": "none"}, {"name": "kd", "students": [nfd]}]))
    assert sorted(r.method for r in suite.runs) == ["kd", "kd", "none", "none"]
    with pytest.raises(SuiteError, match="grid_selection"):
        build_suite(smoke(methods=[{"name": "kd", "params": {"temperature": [1.0, 2.0]}, "grid_selection": "validation", "label": nfc},
                                   {"name": "kd", "params": {"temperature": [3.0, 4.0]}, "grid_selection": "validation", "label": nfd}]))


def test_printed_text_never_carries_controls_or_bidi_overrides(capsys):
    """case: a name with terminal escape codes reaches the terminal (here: an unknown method name)."""
    assert printable("a\x1b[2Jb\u202ec\nd") == "a\\x1b[2Jb\\u202ec\nd"
    assert cli.main(["list", "methods", "kd\x1b[2J\u202e"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\u202e" not in err and "\\x1b" in err


class _HostileNames:
    """A plugin whose method descriptions carry terminal escapes and a bidi override, and
    one whose method name carries them (refused: the plugin is named broken)."""

    @staticmethod
    def methods():
        from kdbench.api import Method

        class Loud(Method):
            name = "loud"
            description = "clears\x1b[2J the screen, \u202eright to left\u202c, rings\x07"

        class Hidden(Method):
            name = "hid\u200bden\x1b[31m"
            description = "an invisible character in the name"

        return Loud, Hidden


def _hostile_registry():
    from kdbench.hookspecs import hookimpl
    from kdbench.registry import Registry, make_plugin_manager

    loud, hidden = _HostileNames.methods()

    class Plugin:
        @hookimpl
        def kdbench_methods(self):
            return [loud]

    class BadName:
        @hookimpl
        def kdbench_methods(self):
            return [hidden]

    with pytest.warns(UserWarning, match="must be printable"):
        pm, broken = make_plugin_manager(extra_plugins=[Plugin(), BadName()])
        return Registry(pm, broken)


@pytest.mark.parametrize("argv", [["list"], ["list", "methods"], ["list", "methods", "lo*"], ["list", "methods", "--format", "md"]])
def test_kdbench_list_prints_names_and_descriptions_escaped(monkeypatch, capsys, argv):
    """case: a plugin's description with an escape code and an RTL override reaches the
    terminal through kdbench list (was: printed raw); a name with them is refused."""
    registry = _hostile_registry()
    assert "loud" in registry.names("methods") and not [n for n in registry.names("methods") if n.startswith("hid")]
    (why,) = [w for w in registry.broken.values() if "printable" in w]
    assert "\\u200b" in why and "\x1b" not in why
    monkeypatch.setattr(cli, "_registry", lambda: registry)
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    printed = out.out + out.err
    assert "\x1b" not in printed and "\u202e" not in printed and "\x07" not in printed and "\u200b" not in printed
    assert "clears\\x1b[2J the screen, \\u202eright to left" in out.out
    if argv == ["list"]:
        assert "broken plugin" in out.err and "hid\\u200bden" in out.err


def test_every_cli_output_path_is_escaped_even_argparse_and_warnings(capsys, monkeypatch, tmp_path):
    """case: an invalid choice echoed by argparse, a file name in an error, a plugin's print."""
    with pytest.raises(SystemExit):
        cli.main(["list", "methods\x1b]0;owned\x07"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and "\x1b" not in err and "\\x1b]0;owned\\x07" in err
    monkeypatch.chdir(tmp_path)
    name = tmp_path / "suite\u202egnp.yaml"
    name.write_text("name: [1, 2\n")
    assert cli.main(["validate", str(name)]) == 2
    err = capsys.readouterr().err
    assert "\u202e" not in err and "suite\\u202egnp.yaml" in err

    def chatty(args):  # a plugin printing what it read from a file
        print("plugin says \x1b[2J hello", file=sys.stderr)
        print("and \u202e here")
        return 0

    monkeypatch.setattr(cli, "build_parser", lambda: SimpleNamespace(parse_args=lambda argv: SimpleNamespace(func=chatty)))
    assert cli.main(["list"]) == 0
    out = capsys.readouterr()
    assert "plugin says \\x1b[2J hello" in out.err and "\x1b" not in out.err and out.out == "and \\u202e here\n"
    assert sys.stdout is not None and not type(sys.stdout).__name__ == "PrintableStream"  # restored after the command


# ============================================================ 4. inputs refused or named


@pytest.mark.parametrize("path,change", [
    ("methods[1].params", lambda d: d["methods"].__setitem__(1, {"name": "kd", "params": {"alpha": True}})),
    ("methods[1].params", lambda d: d["methods"].__setitem__(1, {"name": "kd", "params": {"temperature": [2.0, True]}})),
    ("budget", lambda d: d["budget"].__setitem__("steps", True)),
    ("optimizer", lambda d: d.__setitem__("optimizer", {"lr": True})),
    ("optimizer", lambda d: d.__setitem__("optimizer", {"milestones": [1, True], "schedule": "multistep"})),
    ("quiz_fraction", lambda d: d.__setitem__("quiz_fraction", False)),
    ("seeds", lambda d: d.__setitem__("seeds", [True, 2])),
    ("teacher.train", lambda d: d["teacher"]["train"].__setitem__("seed", True)),
    ("tasks[0].options", lambda d: d["tasks"][0].setdefault("options", {}).__setitem__("max_length", True)),
    ("students[0].options", lambda d: d["students"][0]["options"]["tiny"].__setitem__("layers", True)),
    ("references[0]", lambda d: d.__setitem__("references", [{"task": "movie-sentiment", "method": "kd", "value": True,
                                                               "citation": "x"}])),
])
def test_a_boolean_is_never_a_number(path, change):
    """case: ``alpha: true`` (was: coerced to 1.0) and every other number field."""
    data = smoke()
    change(data)
    with pytest.raises(SuiteError) as err:
        build_suite(data)
    assert path in str(err.value) and "must be a number, not true/false" in str(err.value)


def test_source_files_of_every_kind_are_named(tmp_path, monkeypatch):
    """case: a FIFO, a device, a folder, a dangling link, a missing and a too-large source file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 2000)
    cases = {fifo: "is a FIFO", Path("/dev/zero"): "is a character device", tmp_path: "is a folder",
             tmp_path / "dangling": "symbolic link to .*nowhere, which does not exist", tmp_path / "missing": "does not exist"}
    for path, why in cases.items():
        with pytest.raises(DataError, match=f"movie: source_file {path}.* {why}"):
            read_source_file(path, "movie: source_file")
    monkeypatch.setenv("KDBENCH_MAX_SOURCE_BYTES", "1000")
    with pytest.raises(DataError, match="2,000 bytes, over the limit of 1,000.*KDBENCH_MAX_SOURCE_BYTES"):
        check_source_file(big, "movie: source_file")
    monkeypatch.setenv("KDBENCH_MAX_SOURCE_BYTES", "4000")
    assert read_source_file(big, "x") == b"x" * 2000


@pytest.mark.parametrize("task", ["movie-sentiment", "dolly", "shakespeare", "glue-rte"])
def test_every_task_names_a_fifo_source_instead_of_hanging(tmp_path, task):
    """case: options.source_file (or a GLUE folder's train.tsv) is a FIFO (was: 'does not
    exist' for movie-sentiment; dolly and shakespeare blocked reading it for ever)."""
    from kdbench.registry import get_registry

    fifo = tmp_path / "RTE" / "train.tsv" if task.startswith("glue") else tmp_path / "fifo"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    cls = get_registry().task(task)
    options = cls.Options(data_dir=str(tmp_path)) if task.startswith("glue") else cls.Options(source_file=str(fifo))
    with pytest.raises(DataError, match=f"{fifo} is a FIFO"):
        cls(options).load(str(tmp_path))


def test_long_suite_name_is_a_named_error_in_every_command(tmp_path, monkeypatch, capsys):
    """case: a 5000-character suite name in validate, report and show (was: OSError traceback)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(smoke(name="n" * 5000, results=None), width=10**6))
    for argv in (["validate", str(path)], ["report", str(path)], ["show", str(path), "abc"], ["verify", str(path)]):
        assert cli.main(argv) == 2
        assert "at most 200 characters" in capsys.readouterr().err
    long_results = str(tmp_path / ("r" * 300))
    assert cli.main(["report", str(ROOT / "benchmarks" / "smoke.yaml"), "--results", long_results]) == 2
    assert "error:" in capsys.readouterr().err


def _committed_copy(tmp_path: Path) -> Path:
    out = tmp_path / "nlp"
    shutil.copytree(ROOT / "results" / "nlp-cpu", out, ignore=shutil.ignore_patterns("*.sqlite-*", "plots", "*.html", "teachers", "*.md",
                                                                                      "*.csv", "*.json", "*.tex"))
    return out


@pytest.mark.parametrize("args,message", [
    (["--where", "temperature=["], "not a YAML scalar or list"),
    (["--where", "=4"], "KEY=VALUE"),
    (["--where", "nonsense=1"], "no run has such a parameter"),
    (["--student", "nobody"], "no stored run matches the filter"),
    (["--where", "seed=99"], "no stored run matches the filter"),
])
def test_report_filters_that_match_nothing_or_do_not_parse_are_named(tmp_path, capsys, args, message):
    """case: an empty filter and a malformed --where (was: pandas or YAML traceback)."""
    results = _committed_copy(tmp_path)
    assert cli.main(["report", str(ROOT / "benchmarks" / "nlp-cpu.yaml"), "--results", str(results), "--no-plots", *args]) == 2
    assert message in capsys.readouterr().err


def test_validate_piped_into_head_ends_without_a_traceback(tmp_path):
    """case: kdbench validate -v | head (was: BrokenPipeError traceback)."""
    suite = tmp_path / "many.yaml"
    suite.write_text(yaml.safe_dump(smoke(seeds=list(range(600)))))  # 1200 lines (140 KB): far more than a pipe holds
    cmd = f"{sys.executable} -m kdbench.cli validate -v {suite} | head -1; echo \"rc=${{PIPESTATUS[0]}}\""
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr[-2000:]
    assert "valid. 1200 runs" in done.stdout.splitlines()[0]
    assert done.stdout.splitlines()[-1] == "rc=141"


def test_validate_verbose_into_a_closed_pipe_returns_141(monkeypatch):
    """case: the reader of stdout went away while validate -v prints."""
    def closed(*a, **k):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    r, w = os.pipe()
    saved = os.dup(sys.stdout.fileno())
    monkeypatch.setattr(cli, "cmd_validate", closed)
    try:
        assert cli.main(["validate", "-v", str(ROOT / "benchmarks" / "smoke.yaml")]) == cli.EXIT_BROKEN_PIPE
    finally:
        os.dup2(saved, sys.stdout.fileno())
        for fd in (r, w, saved):
            os.close(fd)


def test_results_folder_through_a_symlink_out_of_the_working_directory_is_refused(tmp_path, monkeypatch, capsys):
    """case: the suite's results folder (or results/ itself) is a symlink leaving the working directory."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    monkeypatch.chdir(work)
    (work / "out").symlink_to(outside)
    suite = work / "suite.yaml"
    suite.write_text(yaml.safe_dump(smoke(results="out/x")))
    assert cli.main(["run", str(suite), "--no-report"]) == 2
    assert "outside the working directory" in capsys.readouterr().err and not list(outside.iterdir())
    (work / "results").symlink_to(outside, target_is_directory=True)
    suite.write_text(yaml.safe_dump(smoke(results=None)))
    assert cli.main(["run", str(suite), "--no-report"]) == 2
    assert not list(outside.iterdir())


# ============================================================ 5. files and statuses


def test_a_report_killed_while_writing_leaves_the_previous_good_file(tmp_path, specs, monkeypatch):
    """case: a report killed while writing (was: an empty leaderboard.md)."""
    from kdbench.report import formats

    store = finished_store(tmp_path / "store.sqlite", specs)
    report = build_report(store, [s.hash for s in specs], chance=False)
    good = formats.write_outputs(report, ["md", "html"], tmp_path, plots=False)
    before = {p: p.read_bytes() for p in good}

    def killed(report, out, pngs):
        out.write_text("")  # what a kill between open() and write() leaves
        raise KeyboardInterrupt

    monkeypatch.setitem(formats.BUILTIN, "md", formats.ReportFormat("md", "", "leaderboard.md", killed))
    with pytest.raises(KeyboardInterrupt):
        formats.write_outputs(report, ["md"], tmp_path, plots=False)
    assert {p: p.read_bytes() for p in good} == before and all(before.values())
    assert not list(tmp_path.glob(".kdbench-report*"))


def test_stale_staging_folder_of_a_dead_report_is_removed(tmp_path, specs):
    """case: a report process killed mid-write left its staging folder."""
    from kdbench.report.formats import write_outputs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".kdbench-report.{dead}.tmp"
    stale.mkdir()
    (stale / "leaderboard.md").write_text("half")
    store = finished_store(tmp_path / "store.sqlite", specs[:2])
    write_outputs(build_report(store, [s.hash for s in specs[:2]], chance=False), ["md"], tmp_path, plots=False)
    assert not stale.exists() and (tmp_path / "leaderboard.md").read_text()


def test_library_temp_files_are_cleaned_and_never_made(tmp_path):
    """case: a kill inside safetensors' own rename left a .tmpXXXXXX."""
    folder = tmp_path / "teachers" / "t0"
    folder.mkdir(parents=True)
    old, fresh = folder / ".tmpAbC123", folder / ".tmpXyZ789"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * artefacts.LIBRARY_TEMP_STALE_S,) * 2)
    assert artefacts.remove_stale_temps(folder) == [old]
    assert fresh.exists()  # may belong to a writer at work
    artefacts.write_tensors(folder / "model.safetensors", {"w": torch.ones(3)})
    assert sorted(p.name for p in folder.iterdir()) == [".tmpXyZ789", "model.safetensors", "model.safetensors.sha256"]


def test_claim_of_an_unidentifiable_owner_is_decided_by_heartbeat_age(tmp_path, specs):
    """case: owner with no recorded start time, same host, a live PID, a heartbeat a day old."""
    live_pid = os.getppid()  # alive, and not this process
    owner = f"{socket.gethostname()}:{live_pid}"
    assert not owner_alive(owner, time.time() - 86400)
    assert owner_alive(owner, time.time() - 60)
    path = tmp_path / "store.sqlite"
    store = ResultsStore(path)
    assert store.claim(specs[0])
    sql(path, "UPDATE runs SET owner=?, heartbeat=?", owner, time.time() - 86400)
    assert store.claim(specs[0])  # taken over
    sql(path, "UPDATE runs SET owner=?, heartbeat=?", owner, time.time())
    assert not store.claim(specs[0])  # still beating: held


def test_teacher_claim_beats_its_heart_while_it_trains(tmp_path):
    """case: a teacher fine-tuning longer than the stale limit keeps its claim."""
    store = ResultsStore(tmp_path / "store.sqlite")
    assert store.claim_teacher("t0", "movie-sentiment", {})
    sql(tmp_path / "store.sqlite", "UPDATE teachers SET heartbeat=0")
    with store.keep_claim("t0", teacher=True, every_s=0.01):
        deadline = time.time() + 10
        while store.teacher("t0")["heartbeat"] == 0 and time.time() < deadline:
            time.sleep(0.01)
    assert store.teacher("t0")["heartbeat"] > time.time() - 60


def test_run_exits_4_while_runs_are_held_by_another_process(tmp_path, monkeypatch, capsys):
    """case: kdbench run while another process trains some selected runs (was: exit 0)."""
    from kdbench.executors.phases import SuiteOutcome

    monkeypatch.chdir(tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(smoke(results="res")))
    registry = cli._registry()

    class Busy:
        def run(self, suite, results, **kw):
            return SuiteOutcome(skipped=[suite.runs[0].hash], busy=[r.hash for r in suite.runs[1:]],
                                statuses={suite.runs[0].hash: DONE})

    monkeypatch.setattr(cli, "_registry", lambda: SimpleNamespace(executor=lambda name: Busy, names=registry.names,
                                                                   unknown_message=registry.unknown_message))
    assert cli.main(["run", str(suite), "--no-report"]) == cli.EXIT_RUNS_HELD == 4
    assert "still being trained by another process" in capsys.readouterr().err


def test_full_disk_while_writing_an_artefact_is_named_and_exits_2(tmp_path, monkeypatch, specs, fault_registry):
    """case: the disk fills during the teacher's checkpoint write (was: teacher failed, exit 3)."""
    real = Path.write_bytes

    def full(self, data):
        if self.name.endswith(".tmp"):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    target = tmp_path / "teachers" / "t0" / "model.safetensors"
    with pytest.raises(artefacts.DiskFull, match=f"cannot write {target}.*No space left"):
        artefacts.write_tensors(target, {"w": torch.ones(4)})
    assert not list(target.parent.iterdir())  # no half-written temp file left behind
    monkeypatch.setattr(teachers_mod, "_fine_tune", lambda *a: artefacts.write_tensors(target, {"w": torch.ones(4)}))
    with pytest.raises(artefacts.DiskFull):  # not a failed teacher (whose runs would be blocked: exit 3)
        teachers_mod.fine_tune_teacher(specs[1], fault_registry, torch.device("cpu"), target)
    assert isinstance(artefacts.DiskFull("x"), cli.KDBenchError)  # exit 2 at the command line


def test_full_disk_inside_a_local_run_exits_2_and_gives_the_run_back(tmp_path, monkeypatch, fault_registry, capsys):
    """case: the disk fills while a student run writes an artefact (was: the run recorded
    failed with a traceback, exit 3); then space is freed and the same command trains it."""
    from support.suites import image_data, write_image_task

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "space-freed"
    data = image_data(write_image_task(tmp_path / "data"), methods=[{"name": "none"}, {"name": "disk-full-once", "params": {"marker": str(marker)}}],
                      teacher=None, baseline="none", seeds=[0], results="res",
                      budget={"steps": 4, "batch_size": 16, "eval_every": 2, "log_every": 2})
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    import kdbench.registry as registry_module

    monkeypatch.setattr(registry_module, "_REGISTRY", fault_registry)  # what the suite and the run look names up in
    assert cli.main(["run", str(suite), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write" in err and "artefact.bin" in err and "No space left on device" in err and "Traceback" not in err
    rows = {r["method"]: r for r in ResultsStore(tmp_path / "res" / "store.sqlite").runs()}
    assert rows["disk-full-once"]["status"] == "failed" and rows["disk-full-once"]["error"].startswith(artefacts.DISK_FULL_PREFIX)
    assert "No space left on device" in rows["disk-full-once"]["error"] and rows["disk-full-once"]["metrics"] is None
    assert cli.main(["run", str(suite), "--no-report"]) == 0  # space freed (the marker): the same command finishes it
    rows = {r["method"]: r for r in ResultsStore(tmp_path / "res" / "store.sqlite").runs()}
    assert {m: r["status"] for m, r in rows.items()} == {"none": "done", "disk-full-once": "done"}


def test_a_claim_row_left_running_is_never_reported_as_a_result(tmp_path, specs):
    """case: rows of every status other than done/diverged are not verified results."""
    path = tmp_path / "store.sqlite"
    store = ResultsStore(path)
    assert store.claim(specs[0])
    (row,) = store.runs()
    assert row["status"] == RUNNING and row["integrity"] == UNVERIFIED
    integrity = build_report(store, [specs[0].hash], chance=False).integrity
    assert (integrity.verified, integrity.unverified, integrity.corrupt, integrity.missing) == (0, [], [], 0)
