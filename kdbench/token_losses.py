"""Token-level divergences between a student's and a teacher's next-token distributions,
for language-model distillation. Shared by the language-model methods; public, one
formula each.

Shapes: ``student_logits`` and ``teacher_logits`` are ``(..., V)`` (typically
``(B, L, V)``: one distribution per response position); ``mask`` is ``(...)`` with true
(or 1) at the positions that count, ``None`` meaning every position. With
``reduce=True`` (the default) a function returns the **mean over masked positions** of
its per-position value (0 when no position counts, so a batch whose responses were all
cut away gives a zero loss with a gradient path, not NaN); with ``reduce=False`` the
per-position values ``(...)`` (masked positions included, not zeroed).

``p_s = softmax(s / T)``, ``p_t = softmax(t / T)``; the temperature divides the logits
and the result is *not* multiplied by ``T^2`` (TRL's ``generalized_jsd_loss`` convention;
Hinton's ``T^2`` is the classifier helpers' job, :mod:`kdbench.losses`). Every divergence
is computed in float32 (float64 stays float64) and treats ``0 * log 0`` as 0, so a
teacher truncated to its top-k tokens (``-inf`` logits elsewhere,
:func:`dense_topk_logits`) gives finite values and finite gradients wherever the
divergence itself is finite.

* :func:`forward_kl`: ``KL(p_t || p_s)`` (token-level KD; mode-covering).
* :func:`reverse_kl`: ``KL(p_s || p_t)`` (MiniLLM's objective; mode-seeking).
* :func:`generalized_jsd`: GKD's ``JSD(beta)`` in TRL's convention: ``beta = 0`` is
  forward KL, ``beta = 1`` reverse KL, else
  ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``.
* :func:`skew_kl`, :func:`skew_reverse_kl`: DistiLLM's skewed divergences.
* :func:`taid_target`, :func:`taid_loss`, :class:`TAIDSchedule`: TAID's interpolated
  target and its adaptive schedule.
* :func:`masked_mean`, :func:`response_nll`: the reduction, and the per-token negative
  log-likelihood of target tokens.
* :func:`topk_log_probs`, :func:`dense_topk_logits`: a teacher's distribution truncated
  to its k most likely tokens (what an off-policy method may cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.api import KDBenchError, full_precision


class TokenShapeError(KDBenchError):
    """Student and teacher logits (or a mask) whose shapes do not match: for token-level
    losses this usually means two vocabularies, which no position-wise divergence can
    compare."""


def _check(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise TokenShapeError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
                              "token-level divergences need the same positions and the same vocabulary")
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise TokenShapeError(f"mask {tuple(mask.shape)} does not match the logits' positions {tuple(student_logits.shape[:-1])}")


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (all when ``None``);
    0 (still attached to ``values``' graph) when no position counts."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


def _reduce(values: Tensor, mask: Tensor | None, reduce: bool) -> Tensor:
    return masked_mean(values, mask) if reduce else values


def _log_softmax(logits: Tensor, temperature: float, like: Tensor | None = None) -> Tensor:
    x = full_precision(logits)
    if like is not None:
        x = x.to(like.dtype)
    return F.log_softmax(x / temperature, dim=-1)


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per position, over the last axis,
    from log-probabilities; terms with ``p_v = 0`` count 0 (and carry no NaN gradient)."""
    support = log_p > -math.inf
    safe_log_p = torch.where(support, log_p, torch.zeros_like(log_p))
    terms = torch.where(support, safe_log_p.exp() * (safe_log_p - log_q), torch.zeros_like(log_p))
    return terms.sum(-1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0,
               reduce: bool = True) -> Tensor:
    """``KL(p_t || p_s)`` per position, mean over masked positions: token-level KD (the
    teacher's full distribution as the target; Hinton et al. 2015, Kim and Rush 2016's
    word-level KD)."""
    _check(student_logits, teacher_logits, mask)
    log_s = _log_softmax(student_logits, temperature)
    return _reduce(kl_from_log_probs(_log_softmax(teacher_logits, temperature, log_s), log_s), mask, reduce)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0,
               reduce: bool = True) -> Tensor:
    """``KL(p_s || p_t)`` per position, mean over masked positions (Gu et al., MiniLLM,
    ICLR 2024: the student is pushed to the teacher's modes rather than spread over all of
    its mass). Infinite where the teacher gives 0 to a token the student does not."""
    _check(student_logits, teacher_logits, mask)
    log_s = _log_softmax(student_logits, temperature)
    return _reduce(kl_from_log_probs(log_s, _log_softmax(teacher_logits, temperature, log_s)), mask, reduce)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, beta: float = 0.5,
                    temperature: float = 1.0, reduce: bool = True) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence (Agarwal et al., ICLR 2024, eq. 1), in
    TRL's convention (``GKDTrainer.generalized_jsd_loss``): with ``m = beta p_t +
    (1 - beta) p_s``, ``JSD(beta) = beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` for
    ``0 < beta < 1``; ``beta = 0`` is :func:`forward_kl` and ``beta = 1``
    :func:`reverse_kl` exactly (the formula itself tends to 0 at both ends: the two
    endpoints are TRL's definition, not limits). Mean over masked positions, as TRL's
    ``batchmean`` with a label mask."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature, reduce)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature, reduce)
    _check(student_logits, teacher_logits, mask)
    log_s = _log_softmax(student_logits, temperature)
    log_t = _log_softmax(teacher_logits, temperature, log_s)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    jsd = beta * kl_from_log_probs(log_t, log_m) + (1 - beta) * kl_from_log_probs(log_s, log_m)
    return _reduce(jsd, mask, reduce)


def _skew_log_mix(log_a: Tensor, log_b: Tensor, alpha: float) -> Tensor:
    """``log(alpha a + (1 - alpha) b)`` from log-probabilities."""
    if alpha == 1.0:
        return log_a
    if alpha == 0.0:
        return log_b
    return torch.logsumexp(torch.stack([log_a + math.log(alpha), log_b + math.log1p(-alpha)]), dim=0)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, alpha: float = 0.1,
            temperature: float = 1.0, reduce: bool = True) -> Tensor:
    """DistiLLM's skew KL (Ko et al., ICML 2024): ``KL(p_t || alpha p_t + (1 - alpha) p_s)``
    per position, mean over masked positions; ``alpha = 0`` is :func:`forward_kl`. The
    official code (``distillm/losses.py``) computes the cross-entropy
    ``-sum p_t log(mix)``, which differs from this by the teacher's entropy: a constant in
    the student, so the gradients are the same."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    _check(student_logits, teacher_logits, mask)
    log_s = _log_softmax(student_logits, temperature)
    log_t = _log_softmax(teacher_logits, temperature, log_s)
    return _reduce(kl_from_log_probs(log_t, _skew_log_mix(log_t, log_s, alpha)), mask, reduce)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, alpha: float = 0.1,
                    temperature: float = 1.0, reduce: bool = True) -> Tensor:
    """DistiLLM's skew reverse KL: ``KL(p_s || alpha p_s + (1 - alpha) p_t)`` per position,
    mean over masked positions (as ``distillm/losses.py``'s ``skewed_reverse_kl``);
    ``alpha = 0`` is :func:`reverse_kl`. Finite even where the teacher gives a token 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    _check(student_logits, teacher_logits, mask)
    log_s = _log_softmax(student_logits, temperature)
    log_t = _log_softmax(teacher_logits, temperature, log_s)
    return _reduce(kl_from_log_probs(log_s, _skew_log_mix(log_s, log_t, alpha)), mask, reduce)


def taid_target(student_logits: Tensor, teacher_logits: Tensor, t: float, temperature: float = 1.0) -> Tensor:
    """TAID's intermediate distribution (Shing et al., ICLR 2025, eq. 3) as
    log-probabilities: ``log softmax(((1 - t) sg(s) + t z_t) / T)``, the student's logits
    detached (``sg``), so no gradient flows through the target. ``t = 1`` is the teacher."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    s = full_precision(student_logits).detach()
    z_t = full_precision(teacher_logits).to(s.dtype)
    mixed = z_t if t == 1.0 else (1 - t) * s + t * z_t  # 1.0 exactly: -inf teacher logits stay -inf, not nan
    return F.log_softmax(mixed / temperature, dim=-1)


def taid_loss(student_logits: Tensor, teacher_logits: Tensor, t: float, mask: Tensor | None = None, temperature: float = 1.0,
              reduce: bool = True) -> Tensor:
    """``KL(p_t^(t) || p_s)`` with ``p_t^(t)`` from :func:`taid_target`, mean over masked
    positions. The official code (``src/distil_losses/taid.py``) uses the cross-entropy
    ``-sum p_t^(t) log p_s``; the difference, the target's entropy, has no gradient."""
    _check(student_logits, teacher_logits, mask)
    log_s = _log_softmax(student_logits, temperature)
    return _reduce(kl_from_log_probs(taid_target(student_logits, teacher_logits, t, temperature), log_s), mask, reduce)


@dataclass
class TAIDSchedule:
    """TAID's adaptive interpolation parameter ``t`` (Shing et al., ICLR 2025, Alg. 1):
    it starts at ``t_start``; after each step with loss ``J``, the relative change
    ``delta = (J_prev - J) / J_prev`` feeds a momentum ``m <- beta m + (1 - beta) delta``,
    and ``t <- min(t_end, max(t_linear, t + alpha sigmoid(m) (1 - t)))`` where
    ``t_linear = t_start + (t_end - t_start) step / total_steps``: never below the
    linear schedule, faster while the loss falls fast. The first step only records
    ``J``. Defaults: the paper's (t_start 0.4, alpha 5e-4, beta 0.99)."""

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    adaptive: bool = True
    t: float = float("nan")
    previous_loss: float | None = None
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.t_start < 1.0 and 0.0 < self.t_end <= 1.0 and self.t_start <= self.t_end):
            raise ValueError(f"need 0 <= t_start < 1, 0 < t_end <= 1 and t_start <= t_end; got {self.t_start}, {self.t_end}")
        if math.isnan(self.t):
            self.t = self.t_start

    def update(self, loss: float, step: int, total_steps: int) -> float:
        """Advance ``t`` after step ``step`` (counted from 1) of ``total_steps`` whose
        loss was ``loss``; returns the new ``t``."""
        if self.previous_loss is None:
            self.previous_loss = loss
            return self.t
        change = (self.previous_loss - loss) / (self.previous_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * change
        linear = self.t_start + (self.t_end - self.t_start) * step / max(total_steps, 1)
        if self.adaptive:
            step_up = self.alpha * (1 / (1 + math.exp(-self.momentum))) * (1 - self.t)
            self.t = min(self.t_end, max(linear, self.t + step_up))
        else:
            self.t = min(self.t_end, linear)
        self.previous_loss = loss
        return self.t


def response_nll(logits: Tensor, targets: Tensor, mask: Tensor | None = None, reduce: bool = True) -> Tensor:
    """Negative log-likelihood ``-log p(y_i | y_<i)`` of the target tokens ``targets``
    (``logits.shape[:-1]``) per position, mean over masked positions: the SFT loss, and
    the reference NLL a generation objective reports."""
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise TokenShapeError(f"targets {tuple(targets.shape)} do not match the logits' positions {tuple(logits.shape[:-1])}")
    log_p = F.log_softmax(full_precision(logits), dim=-1)
    safe = targets.clamp_min(0)  # padding ids (e.g. -100) are masked; any valid index will do
    nll = -log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return _reduce(nll, mask, reduce)


def topk_log_probs(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The teacher's ``k`` most likely tokens per position: ``(log_probs, indices)``, each
    ``(..., k)``, the log-probabilities taken under the *full* vocabulary's softmax (so
    ``logsumexp(log_probs) <= 0``: the missing mass is what truncation drops). Ties break
    to the lower token id (a stable order, so the cache is the same on every rerun)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    log_p = _log_softmax(teacher_logits, temperature)
    k = min(k, log_p.shape[-1])
    # sort is stable on ties (lower index first); topk does not promise an order on ties
    values, indices = torch.sort(log_p, dim=-1, descending=True, stable=True)
    return values[..., :k].contiguous(), indices[..., :k].contiguous()


def dense_topk_logits(log_probs: Tensor, indices: Tensor, vocab_size: int) -> Tensor:
    """Teacher logits ``(..., vocab_size)`` rebuilt from a top-k cache
    (:func:`topk_log_probs`): the cached log-probabilities at their tokens, ``-inf``
    elsewhere. Their softmax is the teacher's distribution **renormalised over its top k**:
    ``p~_v = p_v / sum_{u in topk} p_u`` for cached ``v``, 0 otherwise; temperature 1
    reproduces it (the cache already holds ``log p`` at the cache's temperature). Forward
    KL, skew KL, skew reverse KL and TAID stay finite on them; reverse KL and JSD with
    ``beta = 1`` do not (the student's mass outside the top k has no teacher mass)."""
    out = torch.full((*log_probs.shape[:-1], vocab_size), -math.inf, dtype=full_precision(log_probs).dtype, device=log_probs.device)
    return out.scatter(-1, indices.long(), full_precision(log_probs))
