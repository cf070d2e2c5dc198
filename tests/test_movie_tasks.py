"""movie-sentiment and its regression variant movie-rating: parsing, fixed splits, metrics,
on the real snippets where the archive is in the local cache, and a tiny run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kdbench.api import DataError
from kdbench.data import cache_dir
from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.spec import build_suite
from kdbench_plugins.tasks.movie_sentiment import (
    SDIST, MovieOptions, MovieRating, MovieRatingPairs, MovieSentiment, PairOptions, parse_ratings, parse_snippets,
    read_snippets_from_sdist,
)

DATA = cache_dir() / "data"  # where the runner lets tasks download (kdbench.data)
ARCHIVE = DATA / "movie-sentiment" / SDIST


def snippets(tmp_path: Path, n: int = 60) -> Path:
    rows = [f"{i}\t{((i * 7) % 17 - 8) / 2}\tsnippet {i} is {'good' if i % 2 else 'bad'}" for i in range(n)]
    path = tmp_path / "snippets.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_ratings_are_parsed_as_floats_and_non_finite_ones_refused(tmp_path) -> None:
    texts, ratings = parse_ratings(snippets(tmp_path).read_bytes(), "x")
    assert len(texts) == 60 and ratings.dtype == np.float64 and ratings[3] == (21 % 17 - 8) / 2
    with pytest.raises(DataError, match="x:1: rating 'nan' is not a finite number"):
        parse_ratings(b"1\tnan\ttext\n", "x")


def test_movie_rating_keeps_every_snippet_and_scores_pearson_spearman(tmp_path) -> None:
    path = snippets(tmp_path)
    task = MovieRating(MovieOptions(source_file=str(path)))
    splits = task.load("/nonexistent")
    assert task.problem.is_regression and task.main_metric == "score"
    assert {k: len(v["label"]) for k, v in splits.items()} == {"test": 6, "validation": 6, "train": 48}  # zeros kept
    assert splits["train"]["label"].dtype == np.float32
    y = np.array([-3.0, -1.0, 0.5, 2.0, 4.0])
    pred = np.array([[-2.0], [0.0], [0.0], [1.0], [3.5]])  # (N, 1) model outputs are fine
    m = task.compute_metrics(pred, y)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred[:, 0], y)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred[:, 0], y)[0])
    assert m["score"] == pytest.approx((m["pearson"] + m["spearman"]) / 2)
    assert task.compute_metrics(np.zeros(5), y)["score"] == 0.0  # a constant prediction has no skill
    sentiment = MovieSentiment(MovieOptions(source_file=str(path))).load("/nonexistent")
    assert sum(len(v["label"]) for v in sentiment.values()) == 60 - 4  # the four snippets rated 0 dropped


@pytest.mark.skipif(not ARCHIVE.is_file(), reason="the vaderSentiment archive is not in the local cache")
def test_real_snippets_splits() -> None:
    rating = MovieRating(MovieOptions()).load(str(DATA))
    assert {k: len(v["label"]) for k, v in rating.items()} == {"test": 1000, "validation": 1000, "train": 8605}
    all_labels = np.concatenate([v["label"] for v in rating.values()])
    assert all_labels.min() >= -4 and all_labels.max() <= 4 and (all_labels == 0).sum() == 37
    sentiment = MovieSentiment(MovieOptions(train_size=500)).load(str(DATA))
    assert {k: len(v["label"]) for k, v in sentiment.items()} == {"test": 1000, "validation": 1000, "train": 500}
    # the split is the one movie-sentiment always had (written out as before kdbench.metrics)
    texts, _ = parse_snippets(read_snippets_from_sdist(ARCHIVE), "x")
    perm = np.random.default_rng(0).permutation(len(texts))
    full = MovieSentiment(MovieOptions()).load(str(DATA))
    assert full["test"]["text"] == [texts[i] for i in perm[:1000]]
    assert full["validation"]["text"] == [texts[i] for i in perm[1000:2000]]
    assert full["train"]["text"] == [texts[i] for i in perm[2000:]]

def test_kd_and_metadistil_run_on_movie_rating(tmp_path) -> None:
    tiny = {"layers": 2, "hidden": 16, "heads": 2, "intermediate": 32}
    suite = build_suite({
        "name": "tiny-rating",
        "tasks": [{"name": "movie-rating", "options": {"source_file": str(snippets(tmp_path)), "max_length": 16}}],
        "teacher": {"model": "bert", "options": {"tiny": tiny, "dropout": 0.0},
                    "train": {"budget": {"steps": 3, "batch_size": 8}, "optimizer": {"lr": 1e-3}}},
        "students": [{"model": "bert", "options": {"tiny": {**tiny, "layers": 1}}, "label": "tiny-1L"}],
        "methods": [{"name": "kd"}, {"name": "metadistil", "params": {"quiz_batches": "all", "teacher_schedule": "linear"}}],
        "seeds": [0], "budget": {"steps": 3, "batch_size": 8}, "optimizer": {"lr": 1e-3}, "quiz_fraction": 0.2,
    })
    run_local(suite, tmp_path / "results", progress=False)
    rows = open_store(tmp_path / "results").runs([r.hash for r in suite.runs])
    assert {r["status"] for r in rows} == {"done"}, [r["error"] for r in rows]
    assert all({"pearson", "spearman", "score"} <= set(r["metrics"]["test"]) for r in rows)


def sentences(split: dict) -> set[str]:
    return set(split["text"]) | set(split["text_pair"])


def check_pairs(task_options: dict, n_train: int, n_val: int, n_test: int) -> None:
    """Shared by the local-file and real-archive tests: sizes, labels, and which sentences
    each split's pairs are made of under both validation choices."""
    held = MovieRatingPairs(PairOptions(validation="held_out", **task_options)).load(str(DATA))
    shared = MovieRatingPairs(PairOptions(validation="shared", **task_options)).load(str(DATA))
    for splits in (held, shared):
        assert {k: len(v["label"]) for k, v in splits.items()} == {"train": n_train, "validation": n_val, "test": n_test}
        for split in splits.values():
            assert all(a != b for a, b in zip(split["text"], split["text_pair"]))
    # the same training pairs and test pairs: only validation differs
    for name in ("train", "test"):
        assert held[name]["text"] == shared[name]["text"] and held[name]["text_pair"] == shared[name]["text_pair"]
        np.testing.assert_array_equal(held[name]["label"], shared[name]["label"])
    train = sentences(held["train"])
    assert not sentences(held["test"]) & train and not sentences(held["validation"]) & train
    assert not sentences(held["validation"]) & sentences(held["test"])
    # shared validation: pairs not trained on, whose sentences mostly recur in training pairs
    pairs = set(zip(held["train"]["text"], held["train"]["text_pair"]))
    assert not pairs & set(zip(shared["validation"]["text"], shared["validation"]["text_pair"]))
    assert len(sentences(shared["validation"]) & train) / len(sentences(shared["validation"])) > 0.85


def test_movie_rating_pairs_label_is_the_mean_rating_and_its_splits_share_what_they_claim(tmp_path) -> None:
    path = snippets(tmp_path, n=400)  # a small local file: the real proportions, scaled
    check_pairs({"source_file": str(path)}, n_train=240, n_val=40, n_test=80)
    texts, ratings = parse_ratings(path.read_bytes(), "x")
    rating = dict(zip(texts, ratings))
    split = MovieRatingPairs(PairOptions(source_file=str(path))).load("/nonexistent")["train"]
    expected = [(rating[a] + rating[b]) / 2 for a, b in zip(split["text"], split["text_pair"])]
    np.testing.assert_allclose(split["label"], expected, rtol=0, atol=1e-6)
    assert split["label"].dtype == np.float32
    few = tmp_path / "few.tsv"
    few.write_text("\n".join(f"{i}\t1.0\tsnippet {i}" for i in range(5)) + "\n")
    with pytest.raises(DataError, match="movie-rating-pairs: 5 snippets are too few"):
        MovieRatingPairs(PairOptions(source_file=str(few))).load("/nonexistent")


@pytest.mark.skipif(not ARCHIVE.is_file(), reason="the vaderSentiment archive is not in the local cache")
def test_real_movie_rating_pairs_splits() -> None:
    check_pairs({}, n_train=3000, n_val=500, n_test=1000)
    assert len(MovieRatingPairs(PairOptions(train_size=1000)).load(str(DATA))["train"]["label"]) == 1000
