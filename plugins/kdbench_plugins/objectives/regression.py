"""Regression: one float target per example, a single output (B, 1).

    loss        MSE(s, y), mean over kept positions
    soft term   MSE(s, t) on the outputs (a temperature means nothing here)
    prediction  the output itself, scored by the task's metrics
    chance      the training split's mean target, predicted for every example
    divergence  mean over examples of the squared difference of the outputs
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kdbench.api import Chance, DataError, Evaluator, MetricInfo, Objective, StreamingMetrics, Task, value_mse
from kdbench.hookspecs import hookimpl
from kdbench.losses import logit_mse
from kdbench.metrics import metric_info_by_name


class Regression(Objective):
    """MSE on float targets; metrics of the single output; the training mean as chance."""

    name = "regression"
    description = "one float target per example: MSE, the output as prediction, training-mean chance row"
    label_layout = "value"

    def labels(self, labels: np.ndarray) -> Tensor:
        return torch.as_tensor(labels, dtype=torch.float32)

    def check_labels(self, split: str, labels: np.ndarray) -> None:
        task = self.task.name if self.task else "?"
        try:
            values = np.asarray(labels, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"task '{task}': split '{split}' has labels that are not numbers (objective 'regression' needs one float per example)") from None
        if values.ndim != 1:
            raise DataError(f"task '{task}': split '{split}' has labels of shape {values.shape}; objective 'regression' needs one float per example")
        if not np.all(np.isfinite(values)):
            raise DataError(f"task '{task}': split '{split}' has non-finite regression targets")

    def check_task(self, task: Task) -> list[str]:
        n = task.problem.num_labels
        return [] if n == 1 else [f"task '{task.name}' declares {n} outputs; objective 'regression' predicts one value per example (num_labels 1)"]

    def loss(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        return value_mse(logits, labels, mask)

    def soft_loss(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float, kind: str = "kl",
                  reduction: str = "batchmean", mask: Tensor | None = None) -> Tensor:
        return logit_mse(student_logits, teacher_logits, mask)

    def start(self) -> Evaluator:
        return StreamingMetrics(self)

    def predictions(self, logits: Tensor) -> np.ndarray:
        return logits.squeeze(-1).numpy()

    def default_metric_info(self, metric: str) -> MetricInfo:
        return metric_info_by_name(metric)

    def chance(self, train_labels: np.ndarray, labels: np.ndarray) -> Chance:
        return Chance(np.full(labels.shape, float(np.mean(train_labels)), dtype=np.float64), "training-mean prediction")

    def divergence(self, start: Tensor, now: Tensor) -> tuple[float, str]:
        return float(((now.double() - start.double()) ** 2).sum(-1).mean()), "mse"


@hookimpl
def kdbench_objectives() -> list[type[Objective]]:
    return [Regression]
