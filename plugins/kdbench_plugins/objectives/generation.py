"""Generation: examples are (prompt, reference response); the model is a causal LM over
the prompt/response layout of :mod:`kdbench.generation`.

    loss        -log p(y_i | x, y_<i), mean over the reference's tokens (end token included)
    evaluation  greedy decoding with a length cap (the task's ``max_new_tokens``), then
                exact_match     decoded text == reference (after stripping), x100
                rougeL          ROUGE-L F1 (``rouge-score``, its default tokenizer), x100
                nll             the reference's per-token negative log-likelihood (lower is better)
                capped          share of outputs that hit the cap without an end token (lower), x100
                gen_tokens      mean generated tokens per example (lower is cheaper; no direction claimed)
                teacher_kl      KL(p_teacher || p_student) per reference token (temperature 1), mean
                                over the reference tokens: how far the student's next-token
                                distributions are from its teacher's on the split's references
                                (lower is better); only in a student's evaluation with a teacher
                                that reads the same tokens and vocabulary (the run's teacher as it
                                is at that evaluation; methods without a teacher have none)
    chance      none (no constant predictor makes sense for text)

A task names this objective (``objective = "generation"``) and gives ``prompt`` and
``reference`` columns; its ``label`` column holds the references too (what the data
layer counts and hashes). Prediction and reference are both compared as the model's
tokenizer decodes them, so a reference cut by the task's ``max_length`` is compared cut.
Teacher outputs are never shared across runs through this objective (a vocabulary per
token does not fit in memory); methods use the top-k cache
(:func:`kdbench.generation.use_topk_teacher`) instead, and a live teacher's drift is
streamed: :meth:`Generation.batch_divergence`, KL(p_start || p_now) per reference token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdbench.api import DataError, Evaluator, MetricInfo, ModelOutput, Batch, Objective, Task
from kdbench.generation import RESPONSE_IDS, RESPONSE_MASK
from kdbench.hookspecs import hookimpl
from kdbench.token_losses import forward_kl, response_nll

INFO = {"exact_match": MetricInfo(True, 100.0, (0.0, 1.0)), "rougeL": MetricInfo(True, 100.0, (0.0, 1.0)),
        "nll": MetricInfo(False, 1.0, (0.0, None)), "capped": MetricInfo(False, 100.0, (0.0, 1.0)),
        "gen_tokens": MetricInfo(False, 1.0, (0.0, None)), "teacher_kl": MetricInfo(False, 1.0, (0.0, None))}


class GenerationEvaluator(Evaluator):
    """Streams a split: per batch the reference NLL from the teacher-forced output, then
    greedy decoding with the model (``self.model``, set by the caller) and the text
    metrics; keeps running sums only."""

    def __init__(self, max_new_tokens: int):
        from rouge_score import rouge_scorer

        self.max_new_tokens = max_new_tokens
        self.scorer = rouge_scorer.RougeScorer(["rougeL"])
        self.nll_sum = self.tokens = 0.0
        self.n = self.exact = self.capped = self.generated = 0
        self.rouge = 0.0
        self.kl_sum: float | None = 0.0  # None once a teacher's vocabulary differs: no teacher_kl

    def update(self, output: ModelOutput, batch: Batch) -> None:
        model: Any = self.model
        if model is None or not hasattr(model, "generate"):
            raise DataError("the generation objective evaluates a model that decodes (a causal LM); this one does not")
        targets, mask = batch.inputs[RESPONSE_IDS], batch.inputs[RESPONSE_MASK].bool()
        per = response_nll(output.logits, targets, mask, reduce=False)
        self.nll_sum += float((per * mask).sum())
        self.tokens += float(mask.sum())
        self.kl_sum = self._teacher_kl(output, batch, mask)
        gen = model.generate(batch.inputs, self.max_new_tokens, greedy=True)
        tok, eos = model.tokenizer, model.tokenizer.eos_token_id
        for b in range(targets.shape[0]):
            ref = tok.decode([t for t, m in zip(targets[b].tolist(), mask[b].tolist()) if m and t != eos]).strip()
            out = tok.decode([t for t, m in zip(gen.tokens[b].tolist(), gen.mask[b].tolist()) if m and t != eos]).strip()
            self.exact += int(out == ref)
            self.rouge += self.scorer.score(ref, out)["rougeL"].fmeasure if ref and out else float(ref == out)
        self.capped += int(gen.hit_cap.sum())
        self.generated += int(gen.mask.sum())
        self.n += targets.shape[0]

    def _teacher_kl(self, output: ModelOutput, batch: Batch, mask: Tensor) -> float | None:
        """The running sum of KL(p_teacher || p_student) over this batch's reference tokens
        added to the last one (None: no teacher, or one whose vocabulary differs)."""
        teacher: Any = self.teacher
        if teacher is None or self.kl_sum is None:
            return None
        t_logits = teacher(batch.inputs).logits
        if t_logits.shape != output.logits.shape:
            return None
        return self.kl_sum + float((forward_kl(output.logits, t_logits, mask, reduce=False) * mask).sum())

    def finish(self) -> dict[str, float]:
        n = max(self.n, 1)
        out = {"exact_match": self.exact / n, "rougeL": self.rouge / n, "nll": self.nll_sum / max(self.tokens, 1.0),
               "capped": self.capped / n, "gen_tokens": self.generated / n}
        if self.teacher is not None and self.kl_sum is not None:
            out["teacher_kl"] = self.kl_sum / max(self.tokens, 1.0)
        return out


class Generation(Objective):
    """Next-token cross-entropy on references; greedy decoding scored by exact match,
    ROUGE-L, reference NLL and the share of capped outputs."""

    name = "generation"
    description = "prompt -> response with a causal LM: token cross-entropy; greedy decoding scored by exact match, ROUGE-L, NLL"
    label_layout = "token"
    shares_teacher_outputs = False

    def labels(self, labels: np.ndarray) -> Tensor:
        """Example positions (the references travel in the inputs, tokenised by the model)."""
        return torch.arange(len(labels))

    def targets(self, batch: Batch) -> Tensor:
        """The response token ids ``(B, R)``: what the next-token loss predicts."""
        return batch.inputs[RESPONSE_IDS]

    def check_labels(self, split: str, labels: np.ndarray) -> None:
        task = self.task.name if self.task else "?"
        empty = [i for i, r in enumerate(labels.tolist()) if not isinstance(r, str) or not r.strip()]
        if empty:
            raise DataError(f"task '{task}': split '{split}' has empty or non-text references at examples {empty[:5]}")

    def check_task(self, task: Task) -> list[str]:
        cap = getattr(task, "max_new_tokens", None)
        return [] if isinstance(cap, int) and cap >= 1 else [f"task '{task.name}' must set max_new_tokens (>= 1) for objective 'generation'"]

    def loss(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        """NLL of token targets ``labels`` ``(B, R)`` (the response ids) over ``mask``."""
        if labels.shape != logits.shape[:-1]:
            raise ValueError("the generation objective's loss takes the response token ids as labels (B, R); "
                             "methods read them from the inputs (kdbench.generation.response_targets)")
        return response_nll(logits, labels, mask)

    def soft_loss(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float, kind: str = "kl",
                  reduction: str = "batchmean", mask: Tensor | None = None) -> Tensor:
        return forward_kl(student_logits, teacher_logits, mask, temperature) * temperature**2

    def start(self) -> Evaluator:
        return GenerationEvaluator(int(getattr(self.task, "max_new_tokens", 32)))

    def predictions(self, logits: Tensor) -> np.ndarray:
        return logits.argmax(-1).numpy()

    def default_metric_info(self, metric: str) -> MetricInfo:
        return INFO.get(metric, MetricInfo())

    def batch_divergence(self, start: ModelOutput, now: ModelOutput) -> tuple[float, float, str]:
        """KL(p_start || p_now) summed over the batch's reference tokens (``now.mask``, in
        float64), and their number: a live teacher's drift per reference token."""
        mask = now.mask if now.mask is not None else torch.ones(now.logits.shape[:-1], dtype=torch.bool, device=now.logits.device)
        kl = forward_kl(now.logits.double(), start.logits.double(), mask, reduce=False)
        return float((kl * mask).sum()), float(mask.sum()), "token_kl"


@hookimpl
def kdbench_objectives() -> list[type[Objective]]:
    return [Generation]
