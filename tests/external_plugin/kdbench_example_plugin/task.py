"""``word-votes``: a synthetic two-class text task written outside kdbench, the template
for adding a task. Each example is a short sentence of words drawn from a fixed
vocabulary; its label is 1 when it holds more words from the "up" list than from the
"down" list. Generated from a seed, so it needs no files and no network.

A task is one class (problem, main metric, ``load`` returning named splits of examples,
``compute_metrics``), one hook and one entry point; the core carves the quiz split from
``train`` and fingerprints what ``load`` returned.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from kdbench.api import Examples, Options, Task
from kdbench.hookspecs import hookimpl
from kdbench.metrics import accuracy, carve_splits

UP = ["good", "great", "fine", "bright", "warm", "happy"]
DOWN = ["bad", "poor", "dull", "cold", "grim", "sad"]
NEUTRAL = ["the", "a", "movie", "plot", "cast", "scene", "was", "and", "very", "quite"]


class WordVotesOptions(Options):
    size: int = Field(600, ge=20, le=100_000, description="examples generated in all (test and validation get 1/6 each)")
    seed: int = Field(0, ge=0, description="generator seed: the data set itself")


class WordVotes(Task):
    name = "word-votes"
    description = "synthetic: more 'up' than 'down' words? (example third-party task, no files)"
    version = 1
    modality = "text"
    Options = WordVotesOptions

    objective = "classification"  # the registered objective: loss, head width, metrics' directions
    num_labels = 2

    @property
    def main_metric(self) -> str:
        return "accuracy"

    def load(self, cache_dir: str) -> dict[str, Examples]:
        rng = np.random.default_rng(self.options.seed)
        texts, labels = [], []
        for _ in range(self.options.size):
            up, down = rng.integers(0, 4, size=2)
            if up == down:
                up += 1
            words = list(rng.choice(UP, up)) + list(rng.choice(DOWN, down)) + list(rng.choice(NEUTRAL, 4))
            rng.shuffle(words)
            texts.append(" ".join(words))
            labels.append(int(up > down))
        labels_arr = np.asarray(labels, dtype=np.int64)
        n_eval = self.options.size // 6
        parts = carve_splits(len(texts), 0, {"test": n_eval, "validation": n_eval})
        return {name: {"text": [texts[i] for i in idx], "label": labels_arr[idx]} for name, idx in parts.items()}

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": accuracy(predictions, labels)}


@hookimpl
def kdbench_tasks() -> list[type[Task]]:
    return [WordVotes]
