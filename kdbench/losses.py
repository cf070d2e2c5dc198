"""Distillation losses shared by methods (teacher updates: :mod:`kdbench.teacher_updates`;
meta-gradients: :mod:`kdbench.metagrad`).

Every function here is public and has one formula. ``p = softmax(z / T)`` is a softened
distribution; ``s``/``t`` are student/teacher logits (..., C): (B, C) per example, or
(B, L, V) per token with a ``mask`` (B, L) of the positions that count, over which every
loss here reduces (a position is then what an example is for (B, C): "batch mean" is the
mean over kept positions). Losses run in float32 under half-precision autocast (see
:func:`kdbench.api.full_precision`).

* :func:`standardize_logits`: ``(z - mean(z)) / (std(z) + 1e-7)`` per example (logit
  standardisation, Sun et al. CVPR 2024), the option of every method that softens logits.
* :func:`soften`: ``z / T`` after optional standardisation: the one place softened
  logits are made, so an option of one method is the same formula in all of them.
* :func:`softened_kl`: ``T^2 * KL(p_t || p_s)``, batch mean (Hinton et al.) or element mean.
* :func:`probability_mse`: ``T^2 * mean (p_s - p_t)^2`` (MetaDistil's official GLUE soft term).
* :func:`soft_cross_entropy`: ``-sum_c p_t log p_s`` averaged per example, or per element
  (TinyBERT's official prediction-layer loss).
* :func:`soft_loss`: the soft term of KD-style methods, the objective's (a bare Problem:
  :func:`class_soft_loss` for classification, :func:`logit_mse` for regression).
* :func:`relation_logits`, :func:`relation_kl`: self-attention relations and their KL
  (MiniLM's attention and value relations, MiniLMv2's q/k/v relations over relation heads).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.api import IncompatibleModelError, Objective, Problem, added, flat_positions, full_precision

SoftKind = Literal["kl", "mse"]


#: what logit standardisation adds to the standard deviation (the authors' ``1e-7``)
STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor) -> Tensor:
    """``(z - mean_c z) / (std_c z + 1e-7)`` over the class dimension (the last), with the
    unbiased (n - 1) standard deviation: ``normalize`` of logit standardisation's official
    code (sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py`` lines
    7-10, ``logit.std`` being torch's unbiased default). Sun et al., "Logit
    Standardization in Knowledge Distillation", CVPR 2024 (arXiv:2403.01427)."""
    z = full_precision(logits)
    return (z - z.mean(dim=-1, keepdim=True)) / (STANDARDIZE_EPS + z.std(dim=-1, keepdim=True))


def standardization_option() -> Any:
    """The ``logit_standardization`` field of a method's params: off by default and
    declared with :func:`kdbench.api.added`, so adding it to a method keeps the hashes of
    its stored runs; on, the method's softened terms read :func:`standardize_logits`."""
    return added(False, description="z-score each example's logits before softening (logit standardisation, Sun et al. CVPR 2024: KD+LS, DKD+LS)")


def check_standardization(method: str, problem: Problem | Objective, standardize: bool) -> None:
    """Refuse logit standardisation where it carries no information, before training: a
    regression output is one number (its z-score divides zero by zero), and two classes
    z-score to (+-1/sqrt 2) whatever the margin, so the teacher would only say which class
    wins. It needs a classification task with at least three classes. ``problem``: the
    method's (a :class:`Problem`, or the run's objective, whose problem is read)."""
    problem = problem.problem if isinstance(problem, Objective) else problem
    if standardize and (problem.is_regression or problem.num_labels < 3):
        what = "a regression task has one output" if problem.is_regression else f"with {problem.num_labels} classes every example z-scores to the same two values"
        raise IncompatibleModelError(f"method '{method}': logit_standardization z-scores logits over the classes, and {what}; "
                                     "it needs a classification task with at least 3 classes")


def soften(logits: Tensor, temperature: float | Tensor, standardize: bool = False) -> Tensor:
    """``z / T``, with ``z`` first standardised (:func:`standardize_logits`) when
    ``standardize``: the logits whose softmax a method compares. Every method with a
    ``logit_standardization`` option softens through here. ``temperature`` may be a tensor
    (a learned temperature, CTKD), broadcast against ``logits``."""
    z = standardize_logits(logits) if standardize else full_precision(logits)
    return z / temperature


def softened_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor, reduction: Literal["batchmean", "mean", "none"] = "batchmean",
                mask: Tensor | None = None, standardize: bool = False) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``. ``batchmean``: summed over classes,
    averaged over the batch (the KL itself); ``mean``: averaged over batch x classes, as
    ``nn.KLDivLoss(reduction="mean")`` (PKD's official code), C times smaller; ``none``:
    one value per example (per kept position). ``mask``: the positions that count.
    ``standardize``: both sides' logits z-scored first (see :func:`soften`)."""
    s, t = flat_positions(full_precision(student_logits), mask, full_precision(teacher_logits))
    t = t.to(s.dtype)
    log_p_s = F.log_softmax(soften(s, temperature, standardize), dim=-1)
    log_p_t = F.log_softmax(soften(t, temperature, standardize), dim=-1)
    if reduction == "none":
        return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * temperature**2
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
    return kl / s.shape[-1] if reduction == "mean" else kl  # mean = sum / (B * C), without torch's warning


def probability_mse(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None,
                    standardize: bool = False) -> Tensor:
    """``T^2 * mean_{b,c} (softmax(s/T) - softmax(t/T))^2``: MetaDistil's official GLUE soft
    term (``nn.MSELoss()`` on the softened probabilities, times T^2), on standardised logits
    when ``standardize``."""
    s, t = flat_positions(full_precision(student_logits), mask, full_precision(teacher_logits))
    t = t.to(s.dtype)
    return F.mse_loss(F.softmax(soften(s, temperature, standardize), dim=-1), F.softmax(soften(t, temperature, standardize), dim=-1)) * temperature**2


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: Literal["mean", "sum"] = "mean",
                       mask: Tensor | None = None) -> Tensor:
    """``-softmax(t/T) * log_softmax(s/T)``: ``mean`` averages over batch x classes
    (TinyBERT's official ``soft_cross_entropy``); ``sum`` sums over classes and averages
    over the batch (the cross-entropy per example, C times larger)."""
    s, t = flat_positions(full_precision(student_logits), mask, full_precision(teacher_logits))
    terms = -F.softmax(t.to(s.dtype) / temperature, dim=-1) * F.log_softmax(s / temperature, dim=-1)
    return terms.mean() if reduction == "mean" else terms.sum(-1).mean()


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, problem: Problem | Objective,
              kind: SoftKind = "kl", reduction: Literal["batchmean", "mean"] = "batchmean", mask: Tensor | None = None,
              standardize: bool = False, regression: Literal["logits", "probabilities"] = "logits") -> Tensor:
    """The soft (teacher) term of KD-style losses: the run's objective's
    (:meth:`kdbench.api.Objective.soft_loss`) when ``problem`` is one and ``standardize`` is
    off. Otherwise, classification: :func:`softened_kl` (``kind="kl"``, with ``reduction``)
    or :func:`probability_mse` (``kind="mse"``), on standardised logits when
    ``standardize`` (which the methods allow for classification only, see
    :func:`check_standardization`); regression, where a temperature means nothing:
    :func:`logit_mse`. Regression with ``regression="probabilities"``: :func:`probability_mse`
    of the one-output softmax, identically 0 with zero gradient, what MetaDistil's official
    GLUE code computes on STS-B by default (``"logits"`` is its ``--logits_mse``)."""
    if regression == "probabilities" and (problem.problem if isinstance(problem, Objective) else problem).is_regression:
        return probability_mse(student_logits, teacher_logits, temperature)
    if isinstance(problem, Objective):
        if not standardize:
            return problem.soft_loss(student_logits, teacher_logits, temperature, kind, reduction, mask)
        problem = problem.problem
    if problem.is_regression:
        return logit_mse(student_logits, teacher_logits, mask)
    return class_soft_loss(student_logits, teacher_logits, temperature, kind, reduction, mask, standardize)


def class_soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, kind: SoftKind = "kl",
                    reduction: Literal["batchmean", "mean"] = "batchmean", mask: Tensor | None = None, standardize: bool = False) -> Tensor:
    """The soft term over class distributions: :func:`softened_kl` (``kind="kl"``) or
    :func:`probability_mse` (``kind="mse"``), on standardised logits when ``standardize``."""
    if kind == "mse":
        return probability_mse(student_logits, teacher_logits, temperature, mask, standardize)
    return softened_kl(student_logits, teacher_logits, temperature, reduction, mask, standardize)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean (s - t)^2`` over the logits at the positions ``mask`` keeps (regression's
    soft term)."""
    s, t = flat_positions(full_precision(student_logits), mask, full_precision(teacher_logits))
    return F.mse_loss(s, t.to(s.dtype))


# --------------------------------------------------------------------------- attention relations


def relation_logits(x: Tensor, heads: int | None = None) -> Tensor:
    """``X X^T / sqrt(d)`` per head: ``x`` (B, A, L, d) as a model's q/k/v split into its own
    heads, or, with ``heads`` given, first concatenated over them to (B, L, A*d) and re-split
    into ``heads`` relation heads of width A*d / heads (MiniLMv2's relation heads, which let
    two models of different widths and head counts be compared). Returns (B, heads, L, L)."""
    x = full_precision(x)
    if heads is not None:
        b, a, length, d = x.shape
        if (a * d) % heads:
            raise ValueError(f"{heads} relation heads do not divide the width {a * d}")
        x = x.transpose(1, 2).reshape(b, length, heads, a * d // heads).transpose(1, 2)
    return x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])


def relation_kl(student: Tensor, teacher: Tensor, mask: Tensor | None, probabilities: bool = False) -> Tensor:
    """``KL(R_t || R_s)`` of two (B, A, L, L) relations, row by row over the keys, averaged
    over heads and real query positions (MiniLM's ``1 / (A_h |x|) sum_a sum_t KL``, then the
    batch mean). ``student``/``teacher`` are logits (a softmax over the real keys is taken,
    padded keys masked out) or, with ``probabilities``, already normalised rows such as a
    model's attention probabilities (zero at padded keys). ``mask`` (B, L): real tokens."""
    s, t = full_precision(student), full_precision(teacher).to(full_precision(student).dtype)
    keys = mask[:, None, None, :].bool() if mask is not None else torch.ones(s.shape[0], 1, 1, s.shape[-1], dtype=torch.bool, device=s.device)
    if probabilities:
        log_s, log_t = s.clamp_min(1e-30).log(), t.clamp_min(1e-30).log()
        t_prob = t
    else:
        log_s = F.log_softmax(s.masked_fill(~keys, -torch.inf), dim=-1)
        log_t = F.log_softmax(t.masked_fill(~keys, -torch.inf), dim=-1)
        t_prob = log_t.exp()
    terms = torch.where(keys & (t_prob > 0), t_prob * (log_t - log_s), torch.zeros_like(t_prob)).sum(-1)  # (B, A, L)
    queries = keys.squeeze(2).to(terms.dtype)  # (B, 1, L): real query positions
    per_example = (terms * queries).sum((1, 2)) / (queries.sum((1, 2)) * terms.shape[1])
    return per_example.mean()
