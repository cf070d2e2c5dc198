"""GLUE tasks: real TSV files (row and label counts from shared/data/glue/README.md), tiny
generated files in the real layouts of the other tasks, the split protocol, the metrics
against hand computations, and clear errors on bad input."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from kdbench.api import DataError
from kdbench.registry import Registry, make_plugin_manager
from kdbench_plugins.tasks import glue
from kdbench_plugins.tasks.glue import (
    GlueCoLA, GlueMNLI, GlueMRPC, GlueOptions, GlueQNLI, GlueQQP, GlueRTE, GlueSST2, GlueSTSB, GlueWNLI,
    binary_f1, glue_score, matthews_corrcoef, pearson, spearman,
)

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def load(cls, **options):
    task = cls(GlueOptions(**options))
    return task, task.load("/nonexistent-cache")


# --------------------------------------------------------------------------- real files

# task -> (train rows, train label counts, dev rows, dev label counts); counts per class id.
REAL = {
    GlueRTE: (2490, [1249, 1241], 277, [146, 131]),  # 0 = entailment, 1 = not_entailment
    GlueMRPC: (3668, [1194, 2474], 408, [129, 279]),
    GlueSST2: (67349, [29780, 37569], 872, [428, 444]),
    GlueWNLI: (635, [323, 312], 71, [40, 31]),
}


@pytest.fixture(scope="module")
def glue_dir() -> Path:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"{GLUE_DIR} is absent")
    return GLUE_DIR


@pytest.mark.parametrize("cls", list(REAL), ids=lambda c: c.name)
def test_real_files_row_and_label_counts(glue_dir: Path, cls) -> None:
    n_train, train_counts, n_dev, dev_counts = REAL[cls]
    task, splits = load(cls, data_dir=str(glue_dir))
    assert set(splits) == {"train", "validation", "test"}
    # test = the official dev set, whole
    assert len(splits["test"]["text"]) == n_dev
    assert np.bincount(splits["test"]["label"], minlength=2).tolist() == dev_counts
    # train + validation = the official train set, disjoint, 10% held out
    n_val = round(0.1 * n_train)
    assert len(splits["validation"]["label"]) == n_val
    assert len(splits["train"]["label"]) == n_train - n_val
    both = np.concatenate([splits["train"]["label"], splits["validation"]["label"]])
    assert np.bincount(both, minlength=2).tolist() == train_counts
    assert splits["train"]["label"].dtype == np.int64
    pairs = "text_pair" in splits["train"]
    assert pairs == (cls is not GlueSST2)
    for ex in splits.values():
        assert len(ex["text"]) == len(ex["label"])
        assert all(t == t.strip() and t for t in ex["text"][:200])
    assert task.problem.num_labels == 2 and task.max_length == 128


def test_real_files_parse_quirks(glue_dir: Path) -> None:
    # MRPC: a BOM before the header, quotes inside unquoted fields, untokenized text.
    _, mrpc = load(GlueMRPC, data_dir=str(glue_dir / "MRPC"))  # the task folder works too
    assert mrpc["test"]["text"][0] == "He said the foodservice pie business doesn't fit the company's long-term growth strategy."
    assert mrpc["test"]["text_pair"][0].startswith('"The foodservice pie business does not fit our long-term growth strategy.')
    assert mrpc["test"]["label"][:2].tolist() == [1, 0]
    # SST-2: trailing space before the tab is stripped
    _, sst_full = load(GlueSST2, data_dir=str(glue_dir), train_size=10)
    assert sst_full["test"]["text"][0] == "it 's a charming and often affecting journey ."
    # RTE: string labels map to the hub's class order (entailment = 0)
    _, rte = load(GlueRTE, data_dir=str(glue_dir))
    assert rte["test"]["label"][0] == 1  # first dev row is not_entailment
    assert rte["test"]["text_pair"][0] == "Christopher Reeve had an accident."


def test_wrong_task_folder_is_refused(glue_dir: Path) -> None:
    with pytest.raises(DataError, match="WNLI"):
        load(GlueWNLI, data_dir=str(glue_dir / "RTE"))
    with pytest.raises(DataError, match="no folder 'CoLA'"):
        load(GlueCoLA, data_dir=str(glue_dir))


# --------------------------------------------------------------------------- tiny files

def write_tsv(path: Path, rows: list[list[str]], header: list[str] | None = None, bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    text = "".join("\t".join(r) + "\n" for r in lines)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:11] + ["label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
NLI3 = ["entailment", "neutral", "contradiction"]


def mnli_row(i: int, label: str, n_cols: int) -> list[str]:
    row = [str(i), "p", "q", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", f'premise "{i}"', f"hypothesis {i}"]
    return row + [label] * (n_cols - len(row))


def make_glue_tree(root: Path) -> Path:
    """CoLA, STS-B, QQP, MNLI and QNLI in the GLUE layout, with known labels."""
    cola = lambda n, off: [["gj04", str((i + off) % 2), "*" if (i + off) % 2 == 0 else "", f"sentence {i} ."] for i in range(n)]  # noqa: E731
    write_tsv(root / "CoLA" / "train.tsv", cola(20, 0))
    write_tsv(root / "CoLA" / "dev.tsv", cola(6, 1))  # labels 1,0,1,0,1,0
    stsb = lambda n: [[str(i), "main-captions", "MSRvid", "2012test", str(i), "none", "none", f"a {i}", f"b {i}", f"{(i * 0.37) % 5:.3f}"] for i in range(n)]  # noqa: E731
    write_tsv(root / "STS-B" / "train.tsv", stsb(30), STSB_HEADER)
    write_tsv(root / "STS-B" / "dev.tsv", [r[:9] + [s] for r, s in zip(stsb(4), ["0.000", "5.000", "2.5", "3.8"])], STSB_HEADER)
    qqp = lambda n: [[str(i), str(2 * i), str(2 * i + 1), f"how {i}?", f"what {i}?", str(int(i % 3 == 0))] for i in range(n)]  # noqa: E731
    write_tsv(root / "QQP" / "train.tsv", qqp(30), ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"])
    write_tsv(root / "QQP" / "dev.tsv", qqp(6), ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"])
    write_tsv(root / "MNLI" / "train.tsv", [mnli_row(i, NLI3[i % 3], 12) for i in range(30)], MNLI_TRAIN_HEADER)
    write_tsv(root / "MNLI" / "dev_matched.tsv", [mnli_row(i, NLI3[i % 3], 16) for i in range(9)], MNLI_DEV_HEADER)
    write_tsv(root / "MNLI" / "dev_mismatched.tsv", [mnli_row(i, NLI3[(i + 1) % 3], 16) for i in range(7)], MNLI_DEV_HEADER)
    qnli = lambda n: [[str(i), f"who {i}?", f"it was {i}.", "entailment" if i % 2 else "not_entailment"] for i in range(n)]  # noqa: E731
    write_tsv(root / "QNLI" / "train.tsv", qnli(20), ["index", "question", "sentence", "label"])
    write_tsv(root / "QNLI" / "dev.tsv", qnli(5), ["index", "question", "sentence", "label"])
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_glue_tree(tmp_path / "glue")


def test_cola_no_header_and_mcc(tree: Path) -> None:
    task, s = load(GlueCoLA, data_dir=str(tree))
    assert len(s["test"]["text"]) == 6 and s["test"]["label"].tolist() == [1, 0, 1, 0, 1, 0]  # row 1 is data, not a header
    assert len(s["train"]["text"]) + len(s["validation"]["text"]) == 20 and len(s["validation"]["text"]) == 2
    assert "text_pair" not in s["test"] and s["test"]["text"][0] == "sentence 0 ."
    assert task.main_metric == "mcc" and task.problem.kind == "classification"
    m = task.compute_metrics(np.array([1, 0, 0, 0, 1, 1]), s["test"]["label"])
    # TP=2 (rows 0,4), TN=2 (rows 1,3), FP=1 (row 5), FN=1 (row 2): (4-1)/sqrt(3*3*3*3) = 1/3
    assert m == {"mcc": pytest.approx(1 / 3)}
    assert glue_score("glue-cola", m) == pytest.approx(1 / 3)


def test_stsb_regression(tree: Path) -> None:
    task, s = load(GlueSTSB, data_dir=str(tree))
    assert task.problem.kind == "regression" and task.problem.num_labels == 1 and task.main_metric == "score"
    assert s["test"]["label"].dtype == np.float32
    assert s["test"]["label"].tolist() == pytest.approx([0.0, 5.0, 2.5, 3.8])
    assert s["test"]["text"] == ["a 0", "a 1", "a 2", "a 3"] and s["test"]["text_pair"][3] == "b 3"
    train = np.concatenate([s["train"]["label"], s["validation"]["label"]])
    assert sorted(train.tolist()) == pytest.approx(sorted(float(f"{(i * 0.37) % 5:.3f}") for i in range(30)))
    preds = np.array([[1.0], [4.0], [2.0], [5.0]])  # (N, 1) model outputs are accepted
    m = task.compute_metrics(preds, s["test"]["label"])
    y = np.array([0.0, 5.0, 2.5, 3.8])
    x = np.array([1.0, 4.0, 2.0, 5.0])
    r = np.sum((x - x.mean()) * (y - y.mean())) / math.sqrt(np.sum((x - x.mean()) ** 2) * np.sum((y - y.mean()) ** 2))
    # ranks x: 1,3,2,4; y: 1,4,2,3 -> d^2 = 0+1+0+1 = 2 -> rho = 1 - 6*2/(4*15) = 0.8
    assert m["pearson"] == pytest.approx(r) and m["spearman"] == pytest.approx(0.8)
    assert m["score"] == pytest.approx((r + 0.8) / 2) == glue_score("stsb", m)


def test_qqp_f1_and_accuracy(tree: Path) -> None:
    task, s = load(GlueQQP, data_dir=str(tree))
    y = s["test"]["label"]
    assert y.tolist() == [1, 0, 0, 1, 0, 0] and s["test"]["text_pair"][1] == "what 1?"
    m = task.compute_metrics(np.array([1, 1, 0, 0, 0, 0]), y)
    # TP=1, FP=1, FN=1, TN=3: F1 = 2/(2+1+1) = 0.5, accuracy 4/6
    assert m == pytest.approx({"f1": 0.5, "accuracy": 4 / 6, "score": (0.5 + 4 / 6) / 2})
    assert glue_score("QQP", m) == pytest.approx(m["score"])
    logits = np.array([[0, 1], [0, 1], [1, 0], [1, 0], [1, 0], [1, 0]], dtype=float)
    assert task.compute_metrics(logits, y) == m  # logits are reduced to class ids


def test_mnli_matched_and_mismatched(tree: Path) -> None:
    task, s = load(GlueMNLI, data_dir=str(tree))
    assert set(s) == {"train", "validation", "test", "test_mismatched"}
    assert task.problem.num_labels == 3
    assert s["test"]["label"].tolist() == [0, 1, 2] * 3  # entailment, neutral, contradiction
    assert s["test_mismatched"]["label"].tolist() == [1, 2, 0, 1, 2, 0, 1]
    assert s["test"]["text"][2] == 'premise "2"' and s["test"]["text_pair"][2] == "hypothesis 2"
    m = task.compute_metrics(np.zeros(9, dtype=int), s["test"]["label"])
    mm = task.compute_metrics(np.zeros(7, dtype=int), s["test_mismatched"]["label"])
    assert m == {"accuracy": pytest.approx(3 / 9)} and mm == {"accuracy": pytest.approx(2 / 7)}
    assert glue_score("glue-mnli", m, mismatched=mm) == pytest.approx((3 / 9 + 2 / 7) / 2)
    with pytest.raises(ValueError, match="mismatched"):
        glue_score("glue-mnli", m)


def test_qnli_string_labels(tree: Path) -> None:
    task, s = load(GlueQNLI, data_dir=str(tree / "QNLI"))
    assert s["test"]["label"].tolist() == [1, 0, 1, 0, 1]  # not_entailment = 1
    assert s["test"]["text"][1] == "who 1?" and s["test"]["text_pair"][1] == "it was 1."
    assert task.compute_metrics(np.array([1, 0, 0, 0, 1]), s["test"]["label"]) == {"accuracy": pytest.approx(0.8)}


# --------------------------------------------------------------------------- the split protocol

def test_split_protocol_is_seeded_nested_and_disjoint(tree: Path) -> None:
    _, a = load(GlueQQP, data_dir=str(tree))
    _, b = load(GlueQQP, data_dir=str(tree))
    assert a["validation"]["text"] == b["validation"]["text"] and a["train"]["text"] == b["train"]["text"]
    assert len(a["validation"]["text"]) == 3  # round(0.1 * 30)
    assert set(a["train"]["text"]).isdisjoint(a["validation"]["text"])
    assert set(a["train"]["text"]) | set(a["validation"]["text"]) == {f"how {i}?" for i in range(30)}
    _, c = load(GlueQQP, data_dir=str(tree), split_seed=1)
    assert c["validation"]["text"] != a["validation"]["text"]
    # train_size: a prefix of the same order (nested), validation unchanged
    _, small = load(GlueQQP, data_dir=str(tree), train_size=5)
    _, mid = load(GlueQQP, data_dir=str(tree), train_size=10)
    assert len(small["train"]["text"]) == 5 and len(mid["train"]["text"]) == 10
    assert set(small["train"]["text"]) < set(mid["train"]["text"]) < set(a["train"]["text"])
    assert small["validation"]["text"] == a["validation"]["text"]
    assert small["train"]["text"] == sorted(small["train"]["text"], key=lambda t: int(t.split()[1][:-1]))  # file order
    # eval_size: caps validation and test (subset, file order); train untouched
    _, capped = load(GlueQQP, data_dir=str(tree), eval_size=2)
    assert capped["train"]["text"] == a["train"]["text"]
    assert len(capped["validation"]["text"]) == 2 and set(capped["validation"]["text"]) < set(a["validation"]["text"])
    test_idx = [int(t.split()[1][:-1]) for t in capped["test"]["text"]]
    assert len(test_idx) == 2 and test_idx == sorted(test_idx) and set(test_idx) <= set(range(6))
    _, sized = load(GlueQQP, data_dir=str(tree), validation_size=7)
    assert len(sized["validation"]["text"]) == 7 and len(sized["train"]["text"]) == 23
    with pytest.raises(DataError, match="leaves no training examples"):
        load(GlueQQP, data_dir=str(tree), validation_size=30)


def test_options_source_defaults_and_conflicts(tmp_path: Path) -> None:
    assert GlueOptions().source == "hub"
    assert GlueOptions(data_dir=str(tmp_path)).source == "local"
    with pytest.raises(ValidationError, match="needs data_dir"):
        GlueOptions(source="local")
    with pytest.raises(ValidationError, match="only read with source 'local'"):
        GlueOptions(source="hub", data_dir=str(tmp_path))
    with pytest.raises(ValidationError, match="not both"):
        GlueOptions(validation_size=5, validation_fraction=0.2)
    with pytest.raises(ValidationError):
        GlueOptions(bogus=1)
    assert GlueOptions(max_length=64).max_length == 64 and GlueRTE(GlueOptions(max_length=64)).max_length == 64


def test_validation_size_reads_back_from_the_spec_dump_at_run_time(tree: Path) -> None:
    """case: a suite's glue task with validation_size (was: every run failed at load time,
    the dump carrying validation_fraction beside it read as 'not both'); run hash unchanged."""
    import yaml

    from kdbench.data import load_task_data
    from kdbench.registry import get_registry
    from kdbench.spec import SuiteError, build_suite

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.yaml").read_text())
    data["tasks"] = [{"name": "glue-qqp", "options": {"data_dir": str(tree), "validation_size": 7}}]
    run = build_suite(data).runs[0]
    assert run.task.options["validation_fraction"] == 0.1 and run.task.options["validation_size"] == 7  # the dump as before
    assert run.hash == "1e13044d52932a7e"  # the hash this spec had before the fix
    splits = load_task_data(get_registry(), run.task, run.quiz_fraction, run.data_seed).splits
    assert len(splits["validation"]["label"]) == 7 and len(splits["train"]["label"]) + len(splits["quiz"]["label"]) == 23
    with pytest.raises(SuiteError, match="not both"):  # another fraction beside a size is still refused in a suite
        data["tasks"][0]["options"]["validation_fraction"] = 0.2
        build_suite(data)


def test_hub_offline_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"nyu-mll/glue/rte.*data_dir"):
        GlueRTE(GlueOptions()).load(str(tmp_path))
    assert time.monotonic() - start < 20


# --------------------------------------------------------------------------- bad input

def test_bad_column_count_names_file_and_line(tree: Path) -> None:
    path = tree / "QNLI" / "dev.tsv"
    path.write_text("index\tquestion\tsentence\tlabel\n0\tq?\ts.\tentailment\n1\tq?\ts.\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"QNLI/dev\.tsv:3: expected 4 tab-separated columns, got 3"):
        load(GlueQNLI, data_dir=str(tree))


def test_label_outside_label_set(tree: Path) -> None:
    path = tree / "MNLI" / "train.tsv"
    write_tsv(path, [mnli_row(0, "neutral", 12), mnli_row(1, "-", 12)], MNLI_TRAIN_HEADER)
    with pytest.raises(DataError, match=r"MNLI/train\.tsv:3: label '-' is not one of \['entailment', 'neutral', 'contradiction'\]"):
        load(GlueMNLI, data_dir=str(tree))
    write_tsv(tree / "CoLA" / "dev.tsv", [["gj04", "1", "", "ok ."], ["gj04", "2", "", "bad ."]])
    with pytest.raises(DataError, match=r"CoLA/dev\.tsv:2: label '2'"):
        load(GlueCoLA, data_dir=str(tree))


@pytest.mark.parametrize("score, message", [("5.5", "outside"), ("-0.1", "outside"), ("nan", "outside"), ("high", "not a number")])
def test_stsb_score_out_of_range(tree: Path, score: str, message: str) -> None:
    row = ["0", "g", "f", "y", "0", "none", "none", "a", "b", score]
    write_tsv(tree / "STS-B" / "dev.tsv", [row[:9] + ["1.0"], row], STSB_HEADER)
    with pytest.raises(DataError, match=rf"STS-B/dev\.tsv:3: similarity score '{score}' .*{message}"):
        load(GlueSTSB, data_dir=str(tree))


def test_empty_split_and_missing_file(tree: Path) -> None:
    write_tsv(tree / "QQP" / "dev.tsv", [], ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"])
    with pytest.raises(DataError, match=r"QQP/dev\.tsv: no examples"):
        load(GlueQQP, data_dir=str(tree))
    (tree / "MNLI" / "dev_mismatched.tsv").unlink()
    with pytest.raises(DataError, match=r"MNLI/dev_mismatched\.tsv does not exist"):
        load(GlueMNLI, data_dir=str(tree))
    with pytest.raises(DataError, match="not a folder"):
        load(GlueRTE, data_dir=str(tree / "nowhere"))


def test_bom_is_ignored(tmp_path: Path) -> None:
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    rows = [["1", "1", "2", 'He said "yes', "ok ."], ["0", "3", "4", "x", "y"]]
    write_tsv(tmp_path / "MRPC" / "train.tsv", rows * 5, header, bom=True)
    write_tsv(tmp_path / "MRPC" / "dev.tsv", rows, header, bom=True)
    _, s = load(GlueMRPC, data_dir=str(tmp_path))
    assert s["test"]["text"] == ['He said "yes', "x"] and s["test"]["label"].tolist() == [1, 0]


# --------------------------------------------------------------------------- metrics by hand

def test_binary_metrics_against_confusion_matrix() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    p = np.array([1, 0, 1, 0, 1, 0, 1, 1])
    # TP=3 (0,2,6), FN=1 (1), TN=2 (3,5), FP=2 (4,7)
    assert matthews_corrcoef(p, y) == pytest.approx((3 * 2 - 2 * 1) / math.sqrt(5 * 4 * 4 * 3))
    assert binary_f1(p, y) == pytest.approx(6 / 9)
    assert matthews_corrcoef(y, y) == pytest.approx(1.0) and matthews_corrcoef(1 - y, y) == pytest.approx(-1.0)
    assert matthews_corrcoef(np.ones(8, dtype=int), y) == 0.0  # constant prediction: undefined -> 0
    assert binary_f1(np.zeros(4, dtype=int), np.zeros(4, dtype=int)) == 0.0
    assert binary_f1(np.zeros(4, dtype=int), np.array([0, 1, 0, 1])) == 0.0


def test_multiclass_mcc_equals_the_one_hot_correlation() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    p = np.where(rng.random(50) < 0.6, y, rng.integers(0, 3, 50))
    # MCC = cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) over one-hot matrices (Gorodkin 2004)
    X, Y = np.eye(3)[p], np.eye(3)[y]
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    ref = np.sum(Xc * Yc) / math.sqrt(np.sum(Xc * Xc) * np.sum(Yc * Yc))
    assert matthews_corrcoef(p, y) == pytest.approx(ref)


def test_correlations_by_hand() -> None:
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 9.0])
    # deviations (-1.5,-.5,.5,1.5), (-3,-1,0,4): sum products 11, sums of squares 5 and 26
    assert pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    assert spearman(x, y) == pytest.approx(1.0)
    # ties get average ranks: y ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4)
    r = np.array([1.0, 2.5, 2.5, 4.0])
    ref = np.sum((r - r.mean()) * (x - x.mean())) / math.sqrt(np.sum((r - r.mean()) ** 2) * 5)
    assert spearman(x, np.array([0.0, 1.0, 1.0, 3.0])) == pytest.approx(ref)
    assert pearson(np.full(4, 2.0), y) == 0.0 and spearman(np.full(4, 2.0), y) == 0.0


def test_glue_average_reproduces_bert_large_leaderboard() -> None:
    # BERT-Large on the GLUE test server (Devlin et al. 2019): MRPC F1/acc, STS-B
    # Pearson/Spearman, QQP F1/acc, MNLI-m/mm; the leaderboard's GLUE score is 80.5.
    m = {
        "cola": {"mcc": 60.5}, "sst2": {"accuracy": 94.9}, "mrpc": {"f1": 89.3, "accuracy": 85.4},
        "stsb": {"pearson": 87.6, "spearman": 86.5}, "qqp": {"f1": 72.1, "accuracy": 89.3},
        "qnli": {"accuracy": 92.7}, "rte": {"accuracy": 70.1}, "wnli": {"accuracy": 65.1},
    }
    scores = [glue_score(k, v) for k, v in m.items()] + [glue_score("mnli", {"accuracy": 86.7}, mismatched={"accuracy": 85.9})]
    assert glue_score("mrpc", m["mrpc"]) == pytest.approx(87.35)
    assert np.mean(scores) == pytest.approx(80.5, abs=0.05)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_score("glue-squad", {})


def test_registry_lists_all_nine_tasks() -> None:
    pm, broken = make_plugin_manager(extra_plugins=["kdbench_plugins.tasks.glue"])
    reg = Registry(pm, broken)
    names = ["glue-cola", "glue-sst2", "glue-mrpc", "glue-stsb", "glue-qqp", "glue-mnli", "glue-qnli", "glue-rte", "glue-wnli"]
    assert set(names) <= set(reg.names("tasks"))
    assert not any("glue" in p for p in reg.broken)
    mains = {n: reg.task(n)(GlueOptions()).main_metric for n in names}
    assert mains == {"glue-cola": "mcc", "glue-sst2": "accuracy", "glue-mrpc": "score", "glue-stsb": "score",
                     "glue-qqp": "score", "glue-mnli": "accuracy", "glue-qnli": "accuracy", "glue-rte": "accuracy",
                     "glue-wnli": "accuracy"}
    assert {reg.task(n).modality for n in names} == {"text"}
    assert glue.SPECS["stsb"].objective == "regression" and glue.SPECS["mnli"].num_labels == 3
