"""``pkd``: Patient Knowledge Distillation.

Sun, Cheng, Gan, Liu. "Patient Knowledge Distillation for BERT Model Compression."
EMNLP 2019 (arXiv:1908.09355).

KD plus a "patient" term on the normalised [CLS] hidden states of intermediate layers::

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
        + beta * PT
    PT = reduce_{i=1..M-1} MSE(u_s^i / ||u_s^i||_2, u_t^{g(i)} / ||u_t^{g(i)}||_2)

``u^j`` is the [CLS] vector (position 0) of the output of layer ``j`` (1-based;
``hidden_states[0]`` is the embedding output). The last student layer is not mapped: it
feeds the classifier and is covered by the KD term. With ``M`` student and ``N`` teacher
layers (``M <= N``), the layer maps are:

* ``skip``: ``g(i) = floor(i * N / M)``: every k-th teacher layer when N = k*M
  (12 -> 6: 2, 4, 6, 8, 10; 12 -> 4: 3, 6, 9; 6 -> 4: 1, 3, 4).
* ``last``: ``g(i) = N - M + i``: the last teacher layers before the top one
  (12 -> 6: 7..11; 12 -> 4: 9, 10, 11).

``layer_reduction``: ``mean`` (default) averages the per-layer MSEs, which is what the
official code computes (one MSE over the stacked (B, M-1, H) tensor) and what the
reference beta = 500 is calibrated for; ``sum`` adds them as the paper's equation writes.
Each MSE averages over batch and width.

``soft_reduction``: ``mean`` (default) divides the KL by batch x classes, as the official
code's ``nn.KLDivLoss(reduction="mean")``, the setting beta = 500 was tuned with;
``batchmean`` (version 1's only behaviour) is the KL itself, C times larger. The
reference setting below is one point of the official per-task grid (T {5, 10, 20}, alpha
{0.2, 0.5, 0.7}, beta {10, 100, 500, 1000}, lr {1e-5, 2e-5, 5e-5}, batch 32, 4 epochs),
selected per task on validation. ``soft_loss: mse`` uses the softened-probability MSE
instead of the KL (MetaDistil's GLUE student loss; the reduction does not apply).

Regression (e.g. STS-B): the soft term is MSE between logits, the hard term MSE to labels,
as in :mod:`kdbench_plugins.methods.kd` (``regression_soft: probabilities``: the official
MetaDistil STS-B soft term, identically 0).

Defaults (the paper's reference setting): alpha 0.7, beta 500, T 10, ``skip``, soft KL mean.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdbench.api import (
    HIDDEN_STATES,
    LOGITS,
    Batch,
    IncompatibleModelError,
    KDModel,
    Method,
    ModelOutput,
    Options,
    StepContext,
    added,
    task_loss,
)
from kdbench.hookspecs import hookimpl
from kdbench.losses import soft_loss


def layer_map(student_layers: int, teacher_layers: int, kind: str) -> list[tuple[int, int]]:
    """Pairs (student layer i, teacher layer g(i)) for i = 1..M-1, both 1-based."""
    m, n = student_layers, teacher_layers
    if m > n:
        raise IncompatibleModelError(f"pkd maps student layers onto teacher layers, but the student has {m} layers and the teacher only {n}")
    if kind == "skip":
        return [(i, i * n // m) for i in range(1, m)]
    if kind == "last":
        return [(i, n - m + i) for i in range(1, m)]
    raise ValueError(f"unknown pkd layer map '{kind}' (allowed: skip, last)")


def patience_loss(student_hidden: tuple[Tensor, ...], teacher_hidden: tuple[Tensor, ...], kind: str, reduction: str = "mean") -> Tensor:
    """The PT term: MSE between L2-normalised [CLS] states of the mapped layers."""
    pairs = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1, kind)
    if not pairs:  # a 1-layer student has no intermediate layer to map
        return student_hidden[0].new_zeros(()).float()
    terms = [
        F.mse_loss(F.normalize(student_hidden[i][:, 0].float(), dim=-1), F.normalize(teacher_hidden[j][:, 0].float(), dim=-1))
        for i, j in pairs
    ]
    total = sum(terms[1:], terms[0])
    return total / len(terms) if reduction == "mean" else total


class PKDParams(Options):
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft (teacher) term")
    temperature: float = Field(10.0, gt=0, description="softmax temperature T")
    beta: float = Field(500.0, ge=0, description="weight of the patient (hidden-state) term")
    layer_map: Literal["skip", "last"] = Field("skip", description="which teacher layers the student layers learn from")
    layer_reduction: Literal["mean", "sum"] = Field("mean", description="average (official code) or sum (paper) over mapped layers")
    soft_reduction: Literal["mean", "batchmean"] = Field(
        "mean", description="KL averaged over batch x classes (official KLDivLoss(reduction='mean')) or summed over classes (batchmean)")
    soft_loss: Literal["kl", "mse"] = added("kl", description="soft term: T^2*KL or T^2*MSE of softened probabilities (MetaDistil's GLUE code)")
    regression_soft: Literal["logits", "probabilities"] = added(
        "logits", description="regression soft term: MSE of the outputs, or of their one-output softmax (identically 0: MetaDistil's official STS-B)")


class PKD(Method):
    """Patient KD: KD + beta * MSE of normalised [CLS] states on mapped layers (see module doc)."""

    name = "pkd"
    version = 2  # 2: the soft KL averages over batch x classes by default (soft_reduction), as the official code
    description = "Patient KD (skip/last layer maps): KD + beta * MSE between normalised [CLS] hidden states."
    formula = 'alpha*T^2*KL + (1-alpha)*CE + beta*mean_i MSE(u_s^i/|u_s^i|, u_t^g(i)/|u_t^g(i)|) ([CLS] of layers i < M)'
    citation = "Sun, Cheng, Gan, Liu 2019, EMNLP, arXiv:1908.09355"
    Params = PKDParams
    student_needs = frozenset({LOGITS, HIDDEN_STATES})
    teacher_needs = frozenset({LOGITS, HIDDEN_STATES})
    aligned_positions = "its patient term compares the teacher's and the student's hidden states at position 0 ([CLS]) layer by layer"

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        assert teacher is not None
        s, t = student.describe(), teacher.describe()
        if "num_layers" in s and "num_layers" in t:
            pairs = layer_map(s["num_layers"], t["num_layers"], self.params.layer_map)  # raises for a student deeper than its teacher
            if not pairs and self.params.beta > 0:
                raise IncompatibleModelError(f"pkd's patient term maps the student's layers 1..M-1, and a {s['num_layers']}-layer student has "
                                             "none: the term would be 0 and the run plain KD under pkd's name; use a student with at least "
                                             "2 layers, or beta: 0 for pkd's soft and hard terms alone")
        if self.params.beta > 0 and False in (s.get("first_token_special"), t.get("first_token_special")):
            raise IncompatibleModelError("pkd's patient term reads the [CLS] vector at position 0, but the "
                                         f"{'student' if s.get('first_token_special') is False else 'teacher'}'s tokenizer puts no "
                                         "special token first; use a tokenizer that starts every sequence with one, or beta: 0")
        if self.params.beta > 0 and s.get("hidden_size") != t.get("hidden_size"):
            raise IncompatibleModelError(f"pkd compares [CLS] states without a projection, but the student is {s.get('hidden_size')} wide "
                                         f"and the teacher {t.get('hidden_size')}; use equal widths (or tinybert, which learns a projection)")

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None and student.hidden_states is not None and teacher.hidden_states is not None
        p = self.params
        soft = soft_loss(student.logits, teacher.logits, p.temperature, self.problem, kind=p.soft_loss, reduction=p.soft_reduction,
                         regression=p.regression_soft)
        hard = task_loss(student.logits, batch.labels, self.problem)
        pt = patience_loss(student.hidden_states, teacher.hidden_states, p.layer_map, p.layer_reduction)
        loss = p.alpha * soft + (1 - p.alpha) * hard + p.beta * pt
        return loss, {"soft": soft.detach(), "hard": hard.detach(), "patience": pt.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [PKD]
