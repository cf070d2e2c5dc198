"""Tiny models and a hand-built StepContext for the vision method tests (not the CIFAR zoo).

``TinyCNN`` mimics the shape of the CIFAR models: a stem conv, then ``len(widths)`` stages,
``features`` = (stem, stage 1, ..., stage n) after ReLU, ``preact_features`` before it,
``embedding`` = global average pool of the last stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdbench.api import (
    EMBEDDING,
    FEATURES,
    LOGITS,
    PREACT_FEATURES,
    Batch,
    KDModel,
    ModelOutput,
    Problem,
    StepContext,
)


class TinyCNN(KDModel):
    capabilities = frozenset({LOGITS, FEATURES, PREACT_FEATURES, EMBEDDING})
    family = "cnn"

    def __init__(self, stem: int = 4, widths: tuple[int, ...] = (4, 8, 8), num_classes: int = 5, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem))
        stages, c_in = [], stem
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2  # spatial 8 -> 8 -> 4 -> 2, like CIFAR's 32 -> 32 -> 16 -> 8
            stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c_in, num_classes)
        self.channels = [stem, *widths]

    def describe(self) -> dict[str, Any]:
        return {"feature_channels": self.channels, "embedding_dim": self.channels[-1]}

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        pre = self.stem(inputs["pixel_values"])
        x = torch.relu(pre)
        feats, preacts = [x], [pre]
        for stage in self.stages:
            pre = stage(x)
            x = torch.relu(pre)
            feats.append(x)
            preacts.append(pre)
        emb = x.mean(dim=(2, 3))
        return ModelOutput(
            logits=self.head(emb),
            features=tuple(feats) if FEATURES in need else None,
            preact_features=tuple(preacts) if PREACT_FEATURES in need else None,
            embedding=emb if EMBEDDING in need else None,
        )


class LogitsOnly(KDModel):
    """A model that exposes nothing but logits (e.g. a plain classifier)."""

    capabilities = frozenset({LOGITS})
    family = "generic"

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, num_classes)

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        return ModelOutput(logits=self.lin(inputs["pixel_values"].flatten(1)))


class FakeTransformer(TinyCNN):
    """Claims feature maps but is not a CNN: vision feature methods must refuse it by family."""

    family = "transformer"


def fixed_batch(n: int = 16, num_classes: int = 5, seed: int = 0, dtype: torch.dtype = torch.float32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    # per-example channel offsets: pooled features of pure noise would be nearly identical
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype) + 2 * torch.randn(n, 3, 1, 1, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return Batch(inputs={"pixel_values": x}, labels=y, index=torch.arange(n))


def make_ctx(
    student: KDModel,
    teacher: KDModel | None,
    extra: nn.Module | None = None,
    *,
    lr: float = 0.05,
    momentum: float = 0.9,
    total_steps: int = 100,
    train_size: int = 16,
    num_classes: int = 5,
    step: int = 0,
) -> StepContext:
    """A StepContext as the runner builds it: SGD over student + extra, teacher without grad."""
    params = list(student.parameters()) + (list(extra.parameters()) if extra is not None else [])
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)

    def teacher_forward(batch: Batch, need: frozenset[str]) -> ModelOutput:
        assert teacher is not None
        with torch.no_grad():
            return teacher(batch.inputs, need=need)

    def no_quiz() -> Batch:
        raise AssertionError("these methods never draw quiz batches")

    return StepContext(
        student=student, teacher=teacher, extra=extra, student_optimizer=optimizer, scheduler=None,
        problem=Problem("classification", num_classes), device=torch.device("cpu"), total_steps=total_steps,
        train_size=train_size, teacher_forward=teacher_forward, next_quiz_batch=no_quiz, step=step,
    )


def hand_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy from explicit softmax probabilities, batch mean."""
    p = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    return -torch.stack([p[i, labels[i]].log() for i in range(len(labels))]).mean()


def hand_kd(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(p_t || p_s) with softened probabilities, batch mean, from explicit sums."""
    ps = (s / temperature).exp() / (s / temperature).exp().sum(dim=1, keepdim=True)
    pt = (t / temperature).exp() / (t / temperature).exp().sum(dim=1, keepdim=True)
    return temperature**2 * (pt * (pt.log() - ps.log())).sum() / s.shape[0]
