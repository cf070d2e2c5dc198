"""Classification: one class id per example, logits (B, C) (or (..., C) with a mask).

    loss        CE(s, y), mean over kept positions
    soft term   T^2 * KL(softmax(t/T) || softmax(s/T)) (or T^2 * MSE of the softened
                probabilities, ``kind="mse"``)
    prediction  argmax over classes, scored by the task's metrics
    chance      the majority class of the split scored
    divergence  KL(p_start || p_now) at temperature 1, mean over examples
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.api import Chance, DataError, Evaluator, MetricInfo, Objective, StreamingMetrics, Task, class_cross_entropy
from kdbench.hookspecs import hookimpl
from kdbench.losses import class_soft_loss
from kdbench.metrics import metric_info_by_name


class Classification(Objective):
    """Cross-entropy on class ids; metrics of the argmax; the majority class as chance."""

    name = "classification"
    description = "one class id per example: cross-entropy, argmax predictions, majority-class chance row"
    label_layout = "class"

    def labels(self, labels: np.ndarray) -> Tensor:
        return torch.as_tensor(labels, dtype=torch.long)

    def check_labels(self, split: str, labels: np.ndarray) -> None:
        task, n = self.task.name if self.task else "?", self.problem.num_labels
        values = np.asarray(labels)
        if values.dtype.kind not in "iub" and not (values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values))):
            shown = [v for v in values.reshape(-1).tolist() if not (isinstance(v, (int, float)) and float(v).is_integer())][:5]
            raise DataError(f"task '{task}': split '{split}' has labels {shown} that are not class ids (objective "
                            f"'classification' needs integers 0..{n - 1}; a task with float targets names objective 'regression')")
        bad = values[(values < 0) | (values >= n)]
        if bad.size:
            raise DataError(f"task '{task}': split '{split}' has labels {sorted(set(bad.tolist()))[:5]} outside 0..{n - 1}")

    def check_task(self, task: Task) -> list[str]:
        n = task.problem.num_labels
        return [] if n >= 2 else [f"task '{task.name}' has {n} class(es); objective 'classification' needs at least 2"]

    def loss(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        return class_cross_entropy(logits, labels, mask)

    def soft_loss(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float, kind: str = "kl",
                  reduction: str = "batchmean", mask: Tensor | None = None) -> Tensor:
        return class_soft_loss(student_logits, teacher_logits, temperature, kind, reduction, mask)  # type: ignore[arg-type]

    def start(self) -> Evaluator:
        return StreamingMetrics(self)

    def predictions(self, logits: Tensor) -> np.ndarray:
        return logits.argmax(-1).numpy()

    def default_metric_info(self, metric: str) -> MetricInfo:
        return metric_info_by_name(metric)

    def chance(self, train_labels: np.ndarray, labels: np.ndarray) -> Chance:
        values, counts = np.unique(labels, return_counts=True)
        return Chance(np.full(labels.shape, values[int(np.argmax(counts))]), "majority class of the test split")

    def divergence(self, start: Tensor, now: Tensor) -> tuple[float, str]:
        log_p, log_q = F.log_softmax(start.double(), -1), F.log_softmax(now.double(), -1)
        return float(F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)), "kl"


@hookimpl
def kdbench_objectives() -> list[type[Objective]]:
    return [Classification]
