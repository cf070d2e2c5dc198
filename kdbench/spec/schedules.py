"""Learning-rate schedules as pure functions of the optimizer section of a suite
(:class:`~kdbench.spec.schema.OptimizerSpec`), torch-free so that reports can say what the
rate was at any step and the trainer hands the same function to ``LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable

from kdbench.spec.schema import OptimizerSpec


def lr_factor(spec: OptimizerSpec, steps: int, steps_per_epoch: float = 1.0, epochs_budget: bool = False) -> Callable[[int], float]:
    """The schedule of ``spec`` over ``steps`` optimizer steps: ``factor(k)`` is the
    multiple of ``spec.lr`` used by the update that follows ``k`` updates (k = 0 is the
    first), as :func:`kdbench.train.build_optimizer` hands it to ``LambdaLR``. Linear
    warmup over ``int(warmup_ratio * steps)`` updates, then ``linear`` (to 0 at
    ``steps``), ``cosine`` (to 0), ``multistep`` (times ``gamma`` at each milestone:
    optimizer steps, or epochs of ``steps_per_epoch`` updates when ``epochs_budget``) or
    ``constant``. Torch-free, so reports can say what the rate was at any step."""
    warmup = int(spec.warmup_ratio * steps)
    milestones = [int(m * steps_per_epoch) if epochs_budget else int(m) for m in spec.milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec.schedule == "linear":
            return max(0.0, (steps - step) / max(steps - warmup, 1))
        if spec.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
        if spec.schedule == "multistep":
            return spec.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor

