"""``seqkd``: sequence-level knowledge distillation: train the student on the teacher's
greedy outputs instead of the references.

Kim and Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016 (their beam search
approximated by greedy decoding, as TRL's ``GKDConfig(seq_kd=True)``)::

    y_T = greedy_decode(T, x)    (at most max_new_tokens tokens, once per example)
    L   = -(1 / |M|) sum_{(b, i) in M} log p_S(y_T,{b,i} | x_b, y_T,{b,<i})

The teacher's outputs are generated once per training example before the first step and
kept with a checksum beside the teacher's checkpoint (``StepContext.teacher_cache``), so
every seed and every method reading them shares one decoding; its time is recorded as
``teacher_generation_s``. An output that hit the length cap has no end token and is
learnt as it is; the share of such outputs in each batch is logged as ``teacher_capped``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdbench.api import GENERATION, Batch, KDBenchError, Method, Options, StepContext, step_values
from kdbench.generation import TokenMethod, response_targets, split_digest, with_response
from kdbench.hookspecs import hookimpl
from kdbench.token_losses import response_nll

PASS_BATCH = 64  # examples per decoding batch over the training split (part of the cache's name through the digest)


class SeqKDParams(Options):
    max_new_tokens: int = Field(64, ge=1, description="length cap of the teacher's greedy outputs")


class SeqKD(TokenMethod):
    name = "seqkd"
    description = "Causal LMs: cross-entropy on the teacher's greedy outputs, generated once per training example (Kim and Rush)."
    citation = "Kim and Rush, Sequence-Level Knowledge Distillation, EMNLP 2016"
    Params = SeqKDParams
    teacher_needs = frozenset({GENERATION})

    def setup(self, ctx: StepContext) -> None:
        if ctx.train_batches is None or ctx.teacher is None:
            raise KDBenchError("seqkd needs the training split and a teacher (StepContext.train_batches, .teacher)")
        teacher, cap = ctx.teacher, self.params.max_new_tokens

        def compute() -> dict[str, Tensor]:
            parts = [teacher.generate(b.teacher_inputs, cap, greedy=True) for b in ctx.train_batches(PASS_BATCH)]  # type: ignore[misc, operator]
            width = max(g.tokens.shape[1] for g in parts)
            pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
            return {"tokens": torch.cat([pad(g.tokens) for g in parts]).cpu(), "mask": torch.cat([pad(g.mask) for g in parts]).cpu(),
                    "hit_cap": torch.cat([g.hit_cap for g in parts]).cpu()}

        with ctx.timed("teacher_generation"):
            name = f"greedy-n{cap}-{split_digest(ctx.train_batches(PASS_BATCH))}"
            ctx.state["seqkd"] = {k: v.to(ctx.device) for k, v in ctx.teacher_cache(name, compute).items()}

    def planned_passes(self, steps: int, batch_size: int, quiz_size: int) -> dict[str, int]:
        """A student forward and backward per step; the teacher decodes once, in setup (not counted per step)."""
        return {"student_fwd": steps, "student_bwd": steps}

    def train_step(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        cache, rows = ctx.state["seqkd"], batch.index.to(ctx.device)
        mask = cache["mask"][rows]
        width = max(int(mask.sum(1).max()), 1)
        inputs = with_response(batch.inputs, cache["tokens"][rows, :width], mask[:, :width])
        with ctx.autocast():
            targets, m = response_targets(inputs)
            loss = response_nll(ctx.student(inputs, need=self.student_needs).logits, targets, m)
        ctx.student_step(loss)
        return step_values(loss, {}, teacher_capped=cache["hit_cap"][rows].float().mean())


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [SeqKD]
