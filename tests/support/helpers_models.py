"""Tiny models and a StepContext builder shared by the method tests."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from kdbench.api import LOGITS, Batch, KDModel, ModelOutput, Problem, StepContext
from kdbench_plugins.models.bert import BertFactory, BertOptions
from kdbench_plugins.models.cnn import CNNFactory, CNNOptions

CLASSIFICATION = Problem("classification", 2)


class LinearNet(KDModel):
    """logits = x W^T + b on inputs["x"]: the smallest KDModel (no hidden states)."""

    capabilities = frozenset({LOGITS})
    family = "generic"

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        return ModelOutput(logits=self.fc(inputs["x"]))


def tiny_bert(layers: int = 1, hidden: int = 8, heads: int = 2, problem: Problem = CLASSIFICATION, seed: int = 0) -> KDModel:
    torch.manual_seed(seed)
    opts = BertOptions(tiny={"layers": layers, "hidden": hidden, "heads": heads, "intermediate": 2 * hidden, "vocab_size": 20},
                       dropout=0.0, pooling="mean")
    return BertFactory().build(opts, problem).double()


def tiny_cnn(channels: tuple[int, ...] = (3,), problem: Problem = CLASSIFICATION, seed: int = 0) -> KDModel:
    torch.manual_seed(seed)
    return CNNFactory().build(CNNOptions(channels=channels, in_channels=1), problem).double()


def text_batch(n: int = 4, length: int = 5, seed: int = 0, num_labels: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 20, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0  # some padding
    ids = ids * mask
    return Batch(inputs={"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)},
                 labels=torch.randint(0, num_labels, (n,), generator=g), index=torch.arange(n))


def image_batch(n: int = 4, size: int = 4, seed: int = 0, num_labels: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(inputs={"pixel_values": torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)},
                 labels=torch.randint(0, num_labels, (n,), generator=g), index=torch.arange(n))


def make_ctx(student: KDModel, teacher: KDModel | None, optimizer: torch.optim.Optimizer, quiz: Batch | Callable[[], Batch] | None = None,
             problem: Problem = CLASSIFICATION, extra: nn.Module | None = None, total_steps: int = 10, step: int = 1,
             device: torch.device = torch.device("cpu")) -> StepContext:
    """A StepContext as the runner builds it: the teacher forward without grad in eval mode."""

    def teacher_forward(batch: Batch, need: frozenset[str]) -> ModelOutput:
        assert teacher is not None
        was = teacher.training
        teacher.eval()
        with torch.no_grad():
            out = teacher(batch.inputs, need=need)
        teacher.train(was)
        return out

    next_quiz = quiz if callable(quiz) else (lambda: quiz)
    return StepContext(student=student, teacher=teacher, extra=extra, student_optimizer=optimizer, scheduler=None,
                       problem=problem, device=device, total_steps=total_steps, train_size=100,
                       teacher_forward=teacher_forward, next_quiz_batch=next_quiz, step=step)  # type: ignore[arg-type]
