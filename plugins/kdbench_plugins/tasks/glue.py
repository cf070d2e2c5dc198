"""The nine GLUE tasks: ``glue-cola``, ``glue-sst2``, ``glue-mrpc``, ``glue-stsb``,
``glue-qqp``, ``glue-mnli``, ``glue-qnli``, ``glue-rte``, ``glue-wnli``.

Wang, Singh, Michael, Hill, Levy, Bowman. "GLUE: A Multi-Task Benchmark and Analysis
Platform for Natural Language Understanding." ICLR 2019 (arXiv:1804.07461). Cite the
source data set of each task too (see ``shared/data/glue/README.md``).

Splits (read this before reporting a number)
--------------------------------------------
GLUE's test labels are hidden, so papers report the official **dev** set. Here:

* ``test`` = the official dev set (``dev.tsv``; MNLI: ``dev_matched.tsv``), and MNLI adds
  ``test_mismatched`` = ``dev_mismatched.tsv``. This is the number papers report.
* ``validation`` = a held-out part of the official **train** set: ``validation_size``
  examples, or ``round(validation_fraction * n_train)`` (default 10%), drawn with a
  fixed seed (``split_seed``, default 0). Model selection uses only this split.
* ``train`` = the rest of the official train set. ``train_size`` keeps a seeded subset of
  it (a prefix of the same permutation, so smaller subsets are nested in larger ones).
* ``eval_size`` caps ``validation`` and every test split at that many examples (a seeded
  subset), for CPU-sized suites. A capped test split is *not* the official dev set:
  report it as such.

Every split keeps the file order of its rows.

The carve-out depends only on the train file and ``split_seed``; ``train_size`` and
``eval_size`` never move an example between train and validation.

Metrics (as fractions in [0, 1]; the GLUE leaderboard multiplies by 100)
-------------------------------------------------------------------------
* CoLA: Matthews correlation ``mcc`` (main).
* MRPC, QQP: ``f1`` (positive class 1) and ``accuracy``; main ``score`` = their mean.
* STS-B: ``pearson`` and ``spearman``; main ``score`` = their mean. Regression, labels are
  float similarity scores in [0, 5].
* SST-2, MNLI, QNLI, RTE, WNLI: ``accuracy`` (MNLI: matched on ``test``, mismatched on
  ``test_mismatched``).

:func:`glue_score` gives the per-task number that the official GLUE average uses (for
MNLI the mean of matched and mismatched accuracy). Degenerate cases (a constant
prediction) give 0 for Matthews and the correlations rather than NaN, as scikit-learn does
for Matthews.

Data sources (option ``source``)
--------------------------------
* ``local``: ``data_dir`` is a folder in the original GLUE TSV layout
  (``<data_dir>/<TASK>/train.tsv, dev.tsv``; ``data_dir`` may also be the task folder
  itself). Files are read with quoting off (many sentences contain ``"``), UTF-8 with an
  optional BOM (MRPC), CoLA without a header; surrounding whitespace is stripped (SST-2
  lines end with a space). Malformed rows raise :class:`DataError` with file and line.
* ``hub`` (default without ``data_dir``): ``datasets.load_dataset("nyu-mll/glue", config)``.
  Its labels follow the same class order as below. Its MRPC text is SentEval's tokenized
  copy, not the original untokenized release, so hub and local MRPC scores differ slightly.

Defaults: ``validation_fraction`` 0.1, ``split_seed`` 0, ``max_length`` 128, all data.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
from pydantic import Field, model_validator

from kdbench.api import DataError, Examples, Options, Task, location
from kdbench.metrics import METRICS, binary_f1, carve_splits, matthews_corrcoef, pearson, spearman  # noqa: F401 (re-exported)
from kdbench.hookspecs import hookimpl
from kdbench.sources import open_source_file

HUB_DATASET = "nyu-mll/glue"
STSB_RANGE = (0.0, 5.0)

# --------------------------------------------------------------------------- task facts


@dataclass(frozen=True)
class GlueSpec:
    """Facts about one GLUE task, for both the TSV files and the hub data set.

    ``labels``: the label strings as written in the TSV files, in class-id order (the
    hub's order); ``None`` for regression. Column indices may be negative (from the end:
    MNLI's dev files have more columns than its train file, the label is always last).
    ``eval_files`` / ``hub_eval``: our evaluation split -> dev file / hub split.
    """

    key: str  # hub config name and our suffix: glue-<key>
    folder: str  # folder name in the GLUE distribution
    title: str
    labels: tuple[str, ...] | None
    text_col: int
    pair_col: int | None
    label_col: int
    header: bool
    n_columns: int | None  # fixed column count for files without a header
    hub_text: str
    hub_pair: str | None
    metrics: tuple[str, ...]
    main_metric: str
    eval_files: dict[str, str] = field(default_factory=lambda: {"test": "dev.tsv"})
    hub_eval: dict[str, str] = field(default_factory=lambda: {"test": "validation"})

    @property
    def objective(self) -> str:
        return "regression" if self.labels is None else "classification"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


SPECS: dict[str, GlueSpec] = {
    s.key: s
    for s in [
        # CoLA: source, label, original label, sentence (no header).
        GlueSpec("cola", "CoLA", "acceptability (CoLA)", ("0", "1"), 3, None, 1, False, 4,
                 "sentence", None, ("mcc",), "mcc"),
        GlueSpec("sst2", "SST-2", "sentiment (SST-2)", ("0", "1"), 0, None, 1, True, None,
                 "sentence", None, ("accuracy",), "accuracy"),
        # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String.
        GlueSpec("mrpc", "MRPC", "paraphrase (MRPC)", ("0", "1"), 3, 4, 0, True, None,
                 "sentence1", "sentence2", ("f1", "accuracy"), "score"),
        # STS-B: index genre filename year old_index source1 source2 sentence1 sentence2 score.
        GlueSpec("stsb", "STS-B", "similarity 0-5 (STS-B), regression", None, 7, 8, -1, True, None,
                 "sentence1", "sentence2", ("pearson", "spearman"), "score"),
        # QQP: id qid1 qid2 question1 question2 is_duplicate.
        GlueSpec("qqp", "QQP", "duplicate questions (QQP)", ("0", "1"), 3, 4, 5, True, None,
                 "question1", "question2", ("f1", "accuracy"), "score"),
        # MNLI: train has 12 columns, dev 16; sentence1 at 8, sentence2 at 9, gold_label last.
        GlueSpec("mnli", "MNLI", "3-way entailment (MultiNLI), matched + mismatched",
                 ("entailment", "neutral", "contradiction"), 8, 9, -1, True, None,
                 "premise", "hypothesis", ("accuracy",), "accuracy",
                 {"test": "dev_matched.tsv", "test_mismatched": "dev_mismatched.tsv"},
                 {"test": "validation_matched", "test_mismatched": "validation_mismatched"}),
        # QNLI: index question sentence label.
        GlueSpec("qnli", "QNLI", "question-answer entailment (QNLI)", ("entailment", "not_entailment"),
                 1, 2, 3, True, None, "question", "sentence", ("accuracy",), "accuracy"),
        # RTE: index sentence1 sentence2 label.
        GlueSpec("rte", "RTE", "entailment (RTE)", ("entailment", "not_entailment"), 1, 2, 3, True, None,
                 "sentence1", "sentence2", ("accuracy",), "accuracy"),
        # WNLI: index sentence1 sentence2 label (1 = entailment).
        GlueSpec("wnli", "WNLI", "Winograd entailment (WNLI)", ("0", "1"), 1, 2, 3, True, None,
                 "sentence1", "sentence2", ("accuracy",), "accuracy"),
    ]
}

def _spec_for(task_name: str) -> GlueSpec:
    key = task_name.lower().removeprefix("glue-").replace("-", "")
    if key not in SPECS:
        raise ValueError(f"unknown GLUE task {task_name!r}; known: {sorted('glue-' + k for k in SPECS)}")
    return SPECS[key]


def glue_score(task_name: str, metrics: Mapping[str, float], mismatched: Mapping[str, float] | None = None) -> float:
    """The per-task number that the official GLUE average uses, from ``compute_metrics``'s
    output: the mean of a task's metrics (MRPC/QQP: F1 and accuracy; STS-B: Pearson and
    Spearman), else its single metric. MNLI's is the mean of matched (``metrics``) and
    mismatched (``mismatched``) accuracy, so ``mismatched`` is required for MNLI.
    ``task_name`` may be ``glue-mrpc``, ``mrpc`` or ``MRPC``."""
    spec = _spec_for(task_name)
    if spec.key == "mnli":
        if mismatched is None:
            raise ValueError("glue_score('mnli') needs the mismatched metrics too (split 'test_mismatched')")
        return (float(metrics["accuracy"]) + float(mismatched["accuracy"])) / 2
    return float(np.mean([float(metrics[m]) for m in spec.metrics]))


# --------------------------------------------------------------------------- options


class GlueOptions(Options):
    source: Literal["hub", "local"] = Field(
        "hub", description="'local': GLUE TSV files under data_dir; 'hub': nyu-mll/glue via datasets. "
        "Default: local when data_dir is given, else hub")
    data_dir: str | None = location(description="GLUE root (<data_dir>/<TASK>/train.tsv) or the task folder itself")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="part of official train held out as validation")
    validation_size: int | None = Field(None, gt=0, description="absolute validation size (instead of the fraction)")
    split_seed: int = Field(0, ge=0, description="seed of the validation carve-out and of all subsampling")
    train_size: int | None = Field(None, gt=0, description="keep this many training examples (seeded subset)")
    eval_size: int | None = Field(None, gt=0, description="cap validation and test splits (seeded subset; not the official dev set)")
    max_length: int = Field(128, gt=2, le=512, description="tokenization length")

    @model_validator(mode="before")
    @classmethod
    def _default_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("source") is None:
            data = {**data, "source": "local" if data.get("data_dir") else "hub"}
        return data

    @model_validator(mode="after")
    def _check(self) -> GlueOptions:
        if self.source == "local" and not self.data_dir:
            raise ValueError("source 'local' needs data_dir (a folder of GLUE TSV files)")
        if self.source == "hub" and self.data_dir:
            raise ValueError("data_dir is only read with source 'local'; drop one of them")
        # A spec's dump carries every field, so validation_fraction at its default beside
        # validation_size is how these options read back at run time; only another value
        # is a real conflict.
        default = type(self).model_fields["validation_fraction"].default
        if self.validation_size is not None and self.validation_fraction != default:
            raise ValueError(f"give validation_size or validation_fraction, not both (validation_size replaces the "
                             f"fraction, which then stays at its default {default})")
        return self


# --------------------------------------------------------------------------- reading


@dataclass
class RawSplit:
    """Rows of one file or hub split, before the train/validation carve-out."""

    text: list[str]
    text_pair: list[str] | None
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.text)

    def take(self, index: np.ndarray) -> Examples:
        out: Examples = {"text": [self.text[i] for i in index]}
        if self.text_pair is not None:
            out["text_pair"] = [self.text_pair[i] for i in index]
        out["label"] = self.label[index]
        return out


def parse_label(spec: GlueSpec, raw: str, where: str) -> int | float:
    if spec.labels is None:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{where}: similarity score {raw!r} is not a number") from None
        if not (STSB_RANGE[0] <= value <= STSB_RANGE[1]):  # also rejects NaN
            raise DataError(f"{where}: similarity score {raw!r} is outside [{STSB_RANGE[0]:g}, {STSB_RANGE[1]:g}]")
        return value
    try:
        return spec.labels.index(raw)
    except ValueError:
        raise DataError(f"{where}: label {raw!r} is not one of {list(spec.labels)}") from None


def read_tsv(spec: GlueSpec, path: Path) -> RawSplit:
    """One GLUE TSV file: quoting off, optional BOM, every row with the header's column count."""
    text, pair, labels = [], [], []
    n_columns = spec.n_columns
    # missing, a folder, a FIFO, a device, too large: named, also when swapped after a check
    with open_source_file(path, f"glue-{spec.key}: file", "r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            for row in reader:
                line = reader.line_num
                if not row or row == [""]:
                    continue  # a blank line
                if n_columns is None:  # the header fixes the column count of the file
                    n_columns = len(row)
                    continue
                if len(row) != n_columns:
                    raise DataError(f"{path}:{line}: expected {n_columns} tab-separated columns, got {len(row)}")
                text.append(row[spec.text_col].strip())
                if spec.pair_col is not None:
                    pair.append(row[spec.pair_col].strip())
                labels.append(parse_label(spec, row[spec.label_col].strip(), f"{path}:{line}"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not text:
        raise DataError(f"{path}: no examples")
    dtype = np.float32 if spec.labels is None else np.int64
    return RawSplit(text, pair if spec.pair_col is not None else None, np.asarray(labels, dtype=dtype))


def task_folder(spec: GlueSpec, data_dir: str) -> Path:
    """``data_dir`` may be the GLUE root or the task's own folder (matched by name, so
    pointing glue-wnli at the RTE folder is an error, not a silent mix-up)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"glue-{spec.key}: data_dir {root} is not a folder")

    def norm(name: str) -> str:
        return name.lower().replace("-", "").replace("_", "")

    for child in (root / spec.folder, *(c for c in root.iterdir() if c.is_dir() and norm(c.name) == norm(spec.folder))):
        if child.is_dir():
            return child
    if norm(root.name) == norm(spec.folder):
        return root
    raise DataError(f"glue-{spec.key}: no folder {spec.folder!r} in data_dir {root} (and data_dir is not "
                    f"itself a {spec.folder} folder); expected {root / spec.folder / 'train.tsv'}")


def read_local(spec: GlueSpec, data_dir: str) -> tuple[RawSplit, dict[str, RawSplit]]:
    folder = task_folder(spec, data_dir)
    return read_tsv(spec, folder / "train.tsv"), {split: read_tsv(spec, folder / name) for split, name in spec.eval_files.items()}


def read_hub(spec: GlueSpec, cache_dir: str) -> tuple[RawSplit, dict[str, RawSplit]]:
    """The task from the Hugging Face hub (needs the internet the first time)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"glue-{spec.key}: source 'hub' needs the package 'datasets' (or pass data_dir)") from None
    try:
        ds = datasets.load_dataset(HUB_DATASET, spec.key, cache_dir=str(Path(cache_dir) / "hf-datasets"))
    except Exception as e:  # offline, hub down, ...: one clear message with the way out
        raise DataError(f"glue-{spec.key}: could not load {HUB_DATASET}/{spec.key} from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e)[:300]}); without the internet, set options.data_dir "
                        f"to a folder of GLUE TSV files ({spec.folder}/train.tsv, ...)") from None

    def convert(split: str) -> RawSplit:
        where = f"{HUB_DATASET}/{spec.key}[{split}]"
        if split not in ds:
            raise DataError(f"{where}: split missing (have {list(ds)})")
        part = ds[split]
        if len(part) == 0:
            raise DataError(f"{where}: no examples")
        dtype = np.float32 if spec.labels is None else np.int64
        label = np.asarray(part["label"], dtype=dtype)
        if spec.labels is None:
            bad = ~((label >= STSB_RANGE[0]) & (label <= STSB_RANGE[1]))
        else:
            bad = (label < 0) | (label >= len(spec.labels))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: row {i} has label {label[i]!r} outside the task's labels")
        pair = [s.strip() for s in part[spec.hub_pair]] if spec.hub_pair else None
        return RawSplit([s.strip() for s in part[spec.hub_text]], pair, label)

    return convert("train"), {split: convert(hub) for split, hub in spec.hub_eval.items()}


# --------------------------------------------------------------------------- splits


def seeded_subset(n: int, size: int | None, seed: int, stream: int) -> np.ndarray:
    """At most ``size`` of ``range(n)``, chosen by (seed, stream), in ascending order."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, stream]).permutation(n)[:size])


def make_splits(train: RawSplit, evals: dict[str, RawSplit], options: GlueOptions, name: str) -> dict[str, Examples]:
    """The protocol in the module docstring: validation carved from train, test = dev."""
    n = len(train)
    n_val = options.validation_size if options.validation_size is not None else int(round(options.validation_fraction * n))
    n_val = max(n_val, 1)
    if n_val >= n:
        raise DataError(f"{name}: a validation split of {n_val} leaves no training examples (train has {n})")
    parts = carve_splits(n, options.split_seed, {"validation": n_val}, limits={"train": options.train_size, "validation": options.eval_size}, sort=True)
    out = {"train": train.take(parts["train"]), "validation": train.take(parts["validation"])}
    for stream, (split, raw) in enumerate(evals.items(), start=1):
        out[split] = raw.take(seeded_subset(len(raw), options.eval_size, options.split_seed, stream))
    return out


# --------------------------------------------------------------------------- tasks


class GlueTask(Task):
    """One GLUE task; subclasses only pick their :class:`GlueSpec` (see the module docstring
    for the data protocol, metrics and defaults)."""

    spec: ClassVar[GlueSpec]
    version = 1
    modality = "text"
    Options = GlueOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:
            cls.name = f"glue-{spec.key}"
            metric = " + ".join(spec.metrics) + (" (score = mean)" if len(spec.metrics) > 1 else "")
            cls.description = f"GLUE {spec.title}; test = official dev set; {metric}."

    def __init__(self, options: GlueOptions):
        super().__init__(options)
        self.max_length = options.max_length

    @property
    def objective(self) -> str:
        return self.spec.objective

    @property
    def num_labels(self) -> int:  # type: ignore[override]
        return self.spec.num_labels

    @property
    def main_metric(self) -> str:
        return self.spec.main_metric

    def load(self, cache_dir: str) -> dict[str, Examples]:
        opts: GlueOptions = self.options  # type: ignore[assignment]
        if opts.source == "local":
            assert opts.data_dir is not None
            train, evals = read_local(self.spec, opts.data_dir)
        else:
            train, evals = read_hub(self.spec, cache_dir)
        return make_splits(train, evals, opts, self.name)

    def local_labels(self) -> dict[str, np.ndarray] | None:
        """The labels of the local TSV files (source 'local'); None for the hub."""
        opts: GlueOptions = self.options  # type: ignore[assignment]
        if opts.source != "local" or opts.data_dir is None:
            return None
        train, evals = read_local(self.spec, opts.data_dir)
        return {"train.tsv": train.label} | {self.spec.eval_files[split]: raw.label for split, raw in evals.items()}

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        preds = np.asarray(predictions)
        if self.spec.labels is None:
            preds = preds.reshape(-1).astype(np.float64)  # (N, 1) regression outputs are fine
        elif preds.ndim == 2:
            preds = preds.argmax(axis=-1)  # logits given instead of class ids
        labels = np.asarray(labels).reshape(-1)
        if preds.shape[0] != labels.shape[0]:
            raise ValueError(f"{self.name}: {preds.shape[0]} predictions for {labels.shape[0]} labels")
        out = {m: float(METRICS[m](preds, labels)) for m in self.spec.metrics}
        if len(self.spec.metrics) > 1:
            out["score"] = float(np.mean([out[m] for m in self.spec.metrics]))
        return out


class GlueCoLA(GlueTask):
    spec = SPECS["cola"]


class GlueSST2(GlueTask):
    spec = SPECS["sst2"]


class GlueMRPC(GlueTask):
    spec = SPECS["mrpc"]


class GlueSTSB(GlueTask):
    spec = SPECS["stsb"]


class GlueQQP(GlueTask):
    spec = SPECS["qqp"]


class GlueMNLI(GlueTask):
    spec = SPECS["mnli"]


class GlueQNLI(GlueTask):
    spec = SPECS["qnli"]


class GlueRTE(GlueTask):
    spec = SPECS["rte"]


class GlueWNLI(GlueTask):
    spec = SPECS["wnli"]


GLUE_TASKS: list[type[Task]] = [GlueCoLA, GlueSST2, GlueMRPC, GlueSTSB, GlueQQP, GlueMNLI, GlueQNLI, GlueRTE, GlueWNLI]


@hookimpl
def kdbench_tasks() -> list[type[Task]]:
    return GLUE_TASKS
