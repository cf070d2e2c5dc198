"""``movie-sentiment``: binary sentiment of 10,568 Rotten Tomatoes review snippets,
``movie-rating``: their mean ratings (-4..4) as a regression task (see :class:`MovieRating`),
and ``movie-rating-pairs``: the mean rating of two snippets, a sentence-pair regression task
whose validation split can share sentences with the training pairs, as a validation split
carved from STS-B's training pairs does (see :class:`MovieRatingPairs`).

Source: the ICWSM-2014 ground-truth set of Hutto & Gilbert, "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text" (ICWSM 2014), shipped inside
the source archive of the PyPI package ``vaderSentiment==3.3.2`` (MIT). The snippets come
from the same source as SST. Each line is ``id<TAB>mean rating (-4..4)<TAB>text``; the 37
snippets rated exactly 0 are dropped and the label is the rating's sign (1 = positive).

Fixed split (seed 0, independent of any run): 1,000 test, 1,000 validation, the rest
(8,568) train. ``train_size`` subsamples the training split (seeded, for CPU budgets).
The archive is fetched from the package registry with pip and checked against its sha256.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from kdbench.api import DataError, Examples, Options, Task, added, location
from kdbench.hookspecs import hookimpl
from kdbench.train.artefacts import sha256_file
from kdbench.metrics import accuracy, carve_splits, pearson, spearman
from kdbench.sources import read_source_file

SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
N_TEST, N_VALIDATION, SPLIT_SEED = 1000, 1000, 0


class MovieOptions(Options):
    train_size: int | None = Field(None, gt=0, description="subsample the training split to this many examples")
    max_length: int = Field(64, gt=2, le=512)
    source_file: str | None = location(description="a local movieReviewSnippets_GroundTruth.txt (skips the download)")


def fetch_sdist(cache_dir: Path) -> Path:
    """Download the vaderSentiment source archive through pip (the package registry) once,
    and verify its checksum every time it is used."""
    path = cache_dir / SDIST
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache_dir), "vaderSentiment==3.3.2"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise DataError(f"movie-sentiment: could not fetch {SDIST} with pip ({proc.stderr.strip()[-300:]}); "
                            f"put it in {cache_dir} or pass options.source_file")
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise DataError(f"movie-sentiment: {path} has sha256 {digest}, expected {SDIST_SHA256}; delete it and retry")
    return path


def read_snippets_from_sdist(path: Path) -> bytes:
    """The ground-truth file's bytes, read from the nested archives in memory (nothing is
    extracted to disk, so no archive member can write anywhere)."""
    with tarfile.open(path, "r:gz") as outer:
        inner_bytes = outer.extractfile(INNER_ARCHIVE).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        return inner.extractfile(MEMBER).read()  # type: ignore[union-attr]


def parse_ratings(raw: bytes, source: str) -> tuple[list[str], np.ndarray]:
    """Every snippet with its mean rating (-4..4), in file order."""
    texts, ratings = [], []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{source}:{lineno}: expected 3 tab-separated fields (id, rating, text), got {len(parts)}")
        try:
            rating = float(parts[1])
        except ValueError:
            raise DataError(f"{source}:{lineno}: rating {parts[1]!r} is not a number") from None
        if not math.isfinite(rating):
            raise DataError(f"{source}:{lineno}: rating {parts[1]!r} is not a finite number")
        texts.append(parts[2].strip())
        ratings.append(rating)
    return texts, np.asarray(ratings, dtype=np.float64)


def parse_snippets(raw: bytes, source: str) -> tuple[list[str], np.ndarray]:
    """The snippets not rated exactly 0, labelled by the rating's sign (1 = positive)."""
    texts, ratings = parse_ratings(raw, source)
    keep = np.flatnonzero(ratings != 0)
    if not keep.size:
        raise DataError(f"{source}: no labelled snippets")
    return [texts[i] for i in keep], (ratings[keep] > 0).astype(np.int64)


class MovieSentiment(Task):
    name = "movie-sentiment"
    description = "Rotten Tomatoes snippets (Hutto & Gilbert 2014), binary sentiment, offline via PyPI; accuracy."
    version = 1
    modality = "text"
    Options = MovieOptions

    def __init__(self, options: MovieOptions):
        super().__init__(options)
        self.max_length = options.max_length

    objective = "classification"
    num_labels = 2

    @property
    def main_metric(self) -> str:
        return "accuracy"

    def read(self, cache_dir: str) -> tuple[bytes, str]:
        """The ground-truth file's bytes and a name for messages."""
        if self.options.source_file:
            src = Path(self.options.source_file)
            return read_source_file(src, f"{self.name}: source_file"), str(src)
        sdist = fetch_sdist(Path(cache_dir) / "movie-sentiment")
        return read_snippets_from_sdist(sdist), f"{SDIST}:{MEMBER}"

    def examples(self, raw: bytes, source: str) -> tuple[list[str], np.ndarray]:
        return parse_snippets(raw, source)

    def local_labels(self) -> dict[str, np.ndarray] | None:
        """The labels of a local ``source_file`` (read and parsed, no download); None when
        the data comes from the package registry."""
        if not self.options.source_file:
            return None
        src = Path(self.options.source_file)
        return {"source_file": self.examples(read_source_file(src, f"{self.name}: source_file"), str(src))[1]}

    def load(self, cache_dir: str) -> dict[str, Examples]:
        texts, labels = self.examples(*self.read(cache_dir))
        n = len(texts)
        if n < N_TEST + N_VALIDATION + 2:
            # small local files (tests): keep the proportions of the real split
            n_test = n_val = max(1, n // 10)
        else:
            n_test, n_val = N_TEST, N_VALIDATION
        parts = carve_splits(n, SPLIT_SEED, {"test": n_test, "validation": n_val}, limits={"train": self.options.train_size})
        return {name: {"text": [texts[i] for i in idx], "label": labels[idx]} for name, idx in parts.items()}

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": accuracy(predictions, labels)}


class RatingOptions(MovieOptions):
    main_metric: Literal["score", "mse"] = added(
        "score", "what the leaderboard ranks by: 'score' ((Pearson + Spearman) / 2, higher is better) or 'mse' (mean "
                 "squared error of the rating, lower is better); both are recorded either way")


class MovieRating(MovieSentiment):
    """The same snippets as a regression task: predict the mean rating (-4..4). All 10,605
    snippets (those rated 0 included), split as movie-sentiment's (seed 0: 1,000 test,
    1,000 validation, the rest train), so the two tasks' splits differ. Metrics: Pearson
    and Spearman correlation, main ``score`` their mean (as GLUE's STS-B), and the mean
    squared error ``mse`` (option ``main_metric: mse`` ranks by it, lower is better)."""

    name = "movie-rating"
    description = "Rotten Tomatoes snippets (Hutto & Gilbert 2014), mean rating -4..4 as regression, offline via PyPI; Pearson/Spearman."
    version = 1

    Options = RatingOptions
    objective = "regression"
    num_labels = 1

    @property
    def main_metric(self) -> str:
        # options built by hand as the parent task's (MovieOptions) have no choice: the score
        return getattr(self.options, "main_metric", "score")

    def examples(self, raw: bytes, source: str) -> tuple[list[str], np.ndarray]:
        texts, ratings = parse_ratings(raw, source)
        if not texts:
            raise DataError(f"{source}: no rated snippets")
        return texts, ratings.astype(np.float32)

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        preds, labels = np.asarray(predictions, dtype=np.float64).reshape(-1), np.asarray(labels, dtype=np.float64).reshape(-1)
        out = {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels)}
        return {**out, "score": (out["pearson"] + out["spearman"]) / 2, "mse": float(np.mean((preds - labels) ** 2))}


# movie-rating-pairs: sentence pools (seed 1, fixed) and pair counts
PAIR_SEED = 1
POOLS = {"test": 2000, "validation": 1000, "train": 2000}  # sentences in each disjoint pool
PAIRS = {"test": 1000, "validation": 500, "train": 3500}  # pairs drawn within each pool


class PairOptions(RatingOptions):
    max_length: int = Field(64, gt=2, le=512, description="tokens of the two snippets together")
    validation: Literal["held_out", "shared"] = Field(
        "held_out", description="held_out: validation pairs from their own sentences (i.i.d. with test); shared: "
                                "the last 500 of the training pool's pairs, whose sentences recur in the training pairs")


def draw_pairs(rng: np.random.Generator, pool: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pairs of two different sentences of ``pool``, each drawn uniformly."""
    a, b = rng.choice(pool, count), rng.choice(pool, count)
    while (same := a == b).any():
        b[same] = rng.choice(pool, int(same.sum()))
    return a, b


class MovieRatingPairs(MovieRating):
    """Two snippets in, the mean of their ratings (-4..4) out; (Pearson + Spearman) / 2.

    The snippets are split once (seed 1) into three disjoint pools: test (2,000 sentences),
    validation (1,000) and train (2,000). Pairs are drawn within a pool: 1,000 test pairs,
    500 validation pairs, 3,500 training-pool pairs, so each training sentence is in about
    3.5 pairs. Train is the first 3,000 training-pool pairs (``train_size`` subsamples them).
    ``validation: held_out`` (default) scores the validation pool's pairs: new sentences,
    i.i.d. with test. ``validation: shared`` scores the last 500 training-pool pairs
    instead: pairs never trained on, made of sentences that almost all recur in the
    training pairs, like a validation split carved from STS-B's training pairs. Train and
    test are the same under both, so the two differ only in what validation measures.
    Small local files (tests) keep the proportions."""

    name = "movie-rating-pairs"
    description = "pairs of Rotten Tomatoes snippets, their mean rating as regression; validation held out or sharing training sentences."
    version = 1
    Options = PairOptions

    def load(self, cache_dir: str) -> dict[str, Examples]:
        texts, ratings = self.examples(*self.read(cache_dir))
        n, full = len(texts), sum(POOLS.values())
        scale = min(1.0, n / full)
        sizes = {k: max(2, int(v * scale)) for k, v in POOLS.items()}
        if sum(sizes.values()) > n:
            raise DataError(f"{self.name}: {n} snippets are too few to make its three sentence pools")
        rng = np.random.default_rng(PAIR_SEED)
        order = rng.permutation(n)
        pools, start = {}, 0
        for name, size in sizes.items():
            pools[name], start = order[start:start + size], start + size
        pairs = {name: draw_pairs(rng, pools[name], max(2, int(PAIRS[name] * scale))) for name in PAIRS}
        n_train = int(PAIRS["train"] * scale) - int(PAIRS["validation"] * scale)
        a, b = pairs["train"]
        train, spare = (a[:n_train], b[:n_train]), (a[n_train:], b[n_train:])
        if self.options.train_size is not None and self.options.train_size < n_train:
            keep = np.sort(np.random.default_rng(SPLIT_SEED).choice(n_train, self.options.train_size, replace=False))
            train = (train[0][keep], train[1][keep])
        chosen = {"train": train, "validation": spare if self.options.validation == "shared" else pairs["validation"],
                  "test": pairs["test"]}
        return {name: {"text": [texts[i] for i in a], "text_pair": [texts[j] for j in b],
                       "label": ((ratings[a] + ratings[b]) / 2).astype(np.float32)} for name, (a, b) in chosen.items()}


@hookimpl
def kdbench_tasks() -> list[type[Task]]:
    return [MovieSentiment, MovieRating, MovieRatingPairs]
