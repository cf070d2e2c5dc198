"""``rkl``: reverse KL on the student's own samples: the objective of MiniLLM **without its
extra tricks**.

Gu, Dong, Wei, Huang. "MiniLLM: Knowledge Distillation of Large Language Models." ICLR
2024 (arXiv:2306.08543). Each step the batch's responses are replaced by the student's
samples (temperature 1 by default; KV cache, stream ``rkl-samples``; timed as
``generation_s``), then::

    L = (1 / |M|) sum_{(b, i) in M} KL(p_S(. | y_<i) || p_T(. | y_<i)),   y ~ p_S

the token-level reverse KL at every sampled position, the samples held fixed. This is
the per-step term of MiniLLM's gradient (its "single-step decomposition") only: there is
no policy-gradient term for the future positions' rewards, no teacher-mixed sampling, no
length normalisation and no pre-training-loss mixture, and the student starts from its
own initialisation rather than an SFT checkpoint. Say "reverse KL on student samples",
not "MiniLLM", when reporting it.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdbench.api import Batch, Method, ModelOutput, Options, StepContext
from kdbench.generation import TokenMethod, response_targets, sample_batch
from kdbench.hookspecs import hookimpl
from kdbench.token_losses import reverse_kl


class RKLParams(Options):
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the loss compares the untempered distributions)")
    max_new_tokens: int = Field(128, ge=1, description="length cap of the student's samples")


class ReverseKLOnPolicy(TokenMethod):
    name = "rkl"
    description = "Causal LMs: token-level reverse KL(student || teacher) on the student's own samples (MiniLLM's objective, without its extras)."
    citation = "Gu et al., MiniLLM, ICLR 2024, arXiv:2306.08543 (objective only)"
    Params = RKLParams
    on_policy = True

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None
        _, mask = response_targets(batch.inputs)
        rkl = reverse_kl(student.logits, teacher.logits, mask)
        return rkl, {"rkl": rkl.detach()}

    def train_step(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        sampled, gen = sample_batch(ctx, ctx.student, batch, self.params.max_new_tokens, self.params.temperature, "rkl-samples")
        values = super().train_step(ctx, sampled)
        values["sample_capped"] = gen.hit_cap.float().mean()
        return values


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [ReverseKLOnPolicy]
