"""``gkd``: generalised knowledge distillation: the generalised Jensen-Shannon divergence
on a mix of the fixed responses and the student's own samples.

Agarwal, Vieillard, Zhou, Stanczyk, Garea, Geist, Bachem. "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes." ICLR 2024 (arXiv:2306.13649);
TRL's ``GKDTrainer``. Each step, with probability lambda (drawn from the run's stream
``gkd-policy``) the batch's responses are replaced by the student's samples at the
temperature (KV cache, stream ``gkd-samples``; timed as ``generation_s``); then::

    L = (1 / |M|) sum_{(b, i) in M} JSD_beta(p_T(. | y_<i) || p_S(. | y_<i))

with TRL's convention (:func:`kdbench.token_losses.generalized_jsd`: beta 0 forward KL,
beta 1 reverse KL, both distributions at the temperature). Samples are held fixed (no
gradient through the sampling), as in the paper and TRL. Defaults: TRL's (beta 0.5,
lambda 0.5, temperature 0.9, 128 new tokens); TRL's ``seq_kd`` option is ``seqkd``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdbench.api import Batch, Method, ModelOutput, Options, StepContext
from kdbench.generation import TokenMethod, response_targets, sample_batch
from kdbench.hookspecs import hookimpl
from kdbench.token_losses import generalized_jsd


class GKDParams(Options):
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation: 0 forward KL, 1 reverse KL")
    lmbda: float = Field(0.5, ge=0, le=1, description="on-policy fraction: probability that a batch is the student's own samples")
    temperature: float = Field(0.9, gt=0, description="sampling and loss temperature")
    max_new_tokens: int = Field(128, ge=1, description="length cap of the student's samples")


class GKD(TokenMethod):
    name = "gkd"
    description = "Causal LMs: generalised JSD(beta) on fixed data or, with probability lambda, the student's own samples (GKD)."
    citation = "Agarwal et al., On-Policy Distillation of Language Models, ICLR 2024, arXiv:2306.13649"
    Params = GKDParams
    on_policy = True

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        _, mask = response_targets(batch.inputs)
        jsd = generalized_jsd(student.logits, teacher.logits, mask, self.params.beta, self.params.temperature)
        return jsd, {"jsd": jsd.detach()}

    def train_step(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        p = self.params
        on_policy = bool(torch.rand((), generator=ctx.generator("gkd-policy")) < p.lmbda)
        if on_policy:
            batch, _ = sample_batch(ctx, ctx.student, batch, p.max_new_tokens, p.temperature, "gkd-samples")
        values = super().train_step(ctx, batch)
        values["on_policy"] = torch.tensor(float(on_policy))
        return values


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [GKD]
