"""``crd``: contrastive representation distillation.

Tian, Krishnan, Isola. "Contrastive Representation Distillation." ICLR 2020
(arXiv:1910.10699).

Student and teacher embeddings (``ModelOutput.embedding``, the pooled penultimate vector)
go through learnable heads ``g(x) = normalize(W x + b)`` to ``feat_dim``. Two memory banks
hold one unit vector per training example: ``M_s`` of student and ``M_t`` of teacher
embeddings. For example i with anchors v_s = g_s(x_s), v_t = g_t(x_t), its own index as
the positive and K negative indices j_1..j_K drawn uniformly from the other examples::

    h(v, m)   = exp(<v, m> / tau) / Z                (Z fixed on the first batch:
                                                       Z = N * mean of exp(<v, m> / tau))
    NCE(v, M) = -log( h(v, M_i) / (h(v, M_i) + K/N) )
                - sum_k log( (K/N) / (h(v, M_jk) + K/N) )
    L_crd     = mean_i [ NCE(v_s, M_t) + NCE(v_t, M_s) ]   (the paper's Eq. 18, both sides)

    L = gamma * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + beta * L_crd

After each step the positives' rows are updated without gradient:
``M[i] <- normalize(m * M[i] + (1 - m) * v)``. Banks start uniform in
``[-sqrt(3/feat_dim), sqrt(3/feat_dim)]`` (as the paper's code) and live as buffers of the
extra module, so they follow it to the device and are never touched by the optimizer.

Defaults follow the CRD benchmark (RepDistiller ``train_student.py`` and
``scripts/run_cifar_distill.sh``: ``--distill crd -a 0 -b 0.8``, gamma 1, feat_dim 128,
nce_k 16384, nce_t 0.07, nce_m 0.5; ``-a 1`` gives "CRD+KD"). ``nce_k`` is clipped to
``N - 1``. One deviation: RepDistiller's default "exact" sampler draws negatives from
examples of *other classes*; here they are uniform over all other examples (the paper's
noise distribution P_n = 1/N), drawn from the run's seeded stream ``crd-negatives``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import EMBEDDING, LOGITS, STUDENT, TEACHER, Batch, KDBenchError, KDModel, Method, ModelOutput, Options, SetupInfo, StepContext, task_loss
from kdbench.hookspecs import hookimpl
from kdbench.losses import soft_loss

EPS = 1e-7  # as the paper's code, keeps the NCE ratios finite
NEGATIVES = "crd-negatives"  # the run's random stream of negative indices (ctx.generator)


class CRDParams(Options):
    gamma: float = Field(1.0, ge=0, description="weight of the task loss (CE)")
    alpha: float = Field(0.0, ge=0, description="weight of the KD (KL) term (1 gives CRD+KD)")
    beta: float = Field(0.8, ge=0, description="weight of the contrastive term")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of the KD term")
    feat_dim: int = Field(128, gt=0, description="dimension of the contrastive embedding")
    nce_k: int = Field(16384, gt=0, description="negatives per positive (clipped to train_size - 1)")
    nce_t: float = Field(0.07, gt=0, description="temperature tau of the critic exp(<v, m> / tau)")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the memory bank update")


class ContrastMemory(nn.Module):
    """Embedding heads g_s, g_t (trainable) and memory banks M_s, M_t with Z_s, Z_t (buffers)."""

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int, train_size: int, nce_t: float, nce_m: float):
        super().__init__()
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.nce_t, self.nce_m, self.train_size = nce_t, nce_m, train_size
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(train_size, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(train_size, feat_dim) * 2 * bound - bound)
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z for student anchors, Z for teacher anchors); < 0: unset

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor) -> Tensor:
        """L_crd for embeddings (B, D_s), (B, D_t) and indices (B, K+1), positives first; then
        the positives' memory rows move towards the new embeddings."""
        # the banks' dtype (float32) rules: exp(<v, m> / 0.07) amplifies rounding 14-fold,
        # so the critic stays out of autocast's half precision
        v_s = F.normalize(self.embed_s(f_s.flatten(1)).to(self.memory_s.dtype), dim=1)
        v_t = F.normalize(self.embed_t(f_t.flatten(1)).to(self.memory_t.dtype), dim=1)
        with torch.autocast(device_type=v_s.device.type, enabled=False):
            h_s = self._critic(v_s, self.memory_t, idx)  # student anchor against teacher memories
            h_t = self._critic(v_t, self.memory_s, idx)  # teacher anchor against student memories
            with torch.no_grad():  # Z: the first batch's mean score times N, then fixed (no host sync)
                first = torch.stack([h_s.mean(), h_t.mean()]) * self.train_size
                self.z.copy_(torch.where(self.z < 0, first, self.z))
            loss = nce_loss(h_s / self.z[0], self.train_size) + nce_loss(h_t / self.z[1], self.train_size)
        pos = idx[:, 0]
        momentum_update(self.memory_s, pos, v_s, self.nce_m)
        momentum_update(self.memory_t, pos, v_t, self.nce_m)
        return loss

    def _critic(self, v: Tensor, memory: Tensor, idx: Tensor) -> Tensor:
        """exp(<v_b, M[idx[b, k]]> / tau), (B, K+1); memory rows are constants."""
        rows = memory[idx].detach()  # (B, K+1, D), a copy: the in-place update below cannot reach it
        return torch.exp(torch.einsum("bkd,bd->bk", rows, v) / self.nce_t)


def nce_loss(h: Tensor, train_size: int) -> Tensor:
    """Eq. 18 with P_n = 1/N: -[log D(pos) + sum log(1 - D(neg))] averaged over the batch,
    D(x) = x / (x + K/N), for normalised scores h (B, K+1), positive in column 0."""
    k_pn = (h.shape[1] - 1) / train_size
    log_d_pos = torch.log(h[:, 0] / (h[:, 0] + k_pn + EPS))
    log_d_neg = torch.log(k_pn / (h[:, 1:] + k_pn + EPS))
    return -(log_d_pos.sum() + log_d_neg.sum()) / h.shape[0]


@torch.no_grad()
def momentum_update(memory: Tensor, pos: Tensor, v: Tensor, momentum: float) -> None:
    """M[i] <- normalize(m * M[i] + (1 - m) * v_i) for the batch's positives, in place."""
    mixed = memory[pos] * momentum + v.detach().to(memory.dtype) * (1 - momentum)
    memory.index_copy_(0, pos, F.normalize(mixed, dim=1))


def sample_contrast_index(pos: Tensor, k: int, train_size: int, generator: torch.Generator) -> Tensor:
    """(B, K+1) indices: the positive, then K uniform draws from the other N-1 examples."""
    draws = torch.randint(0, train_size - 1, (pos.shape[0], k), generator=generator, device=generator.device)
    pos = pos.to(draws.device)[:, None]
    negatives = draws + (draws >= pos).long()  # skip the positive: uniform over the rest
    return torch.cat([pos, negatives], dim=1)


class CRD(Method):
    """``gamma*CE + alpha*KD + beta*L_crd`` with memory banks and NCE (Tian et al. ICLR 2020)."""

    name = "crd"
    description = "Contrastive representation distillation: NCE between student/teacher embeddings with memory banks (+CE, +optional KD)."
    formula = 'gamma*CE + alpha*T^2*KL + beta*(NCE(v_s, M_t) + NCE(v_t, M_s))'
    citation = "Tian, Krishnan, Isola 2020, Contrastive Representation Distillation, ICLR (arXiv:1910.10699)"
    Params = CRDParams
    student_needs = frozenset({LOGITS, EMBEDDING})
    teacher_needs = frozenset({LOGITS, EMBEDDING})

    def extra_modules(self, student: KDModel, teacher: KDModel | None, info: SetupInfo) -> nn.Module:
        assert teacher is not None
        if info.train_size < 2:
            raise KDBenchError("method 'crd' needs at least 2 training examples to draw negatives from")
        p = self.params
        dims = []
        for model, role in ((student, STUDENT), (teacher, TEACHER)):
            was_training = model.training
            model.eval()  # a probe: leave BatchNorm statistics alone
            with torch.no_grad():
                emb = model(info.sample.inputs_for(role), need=frozenset({EMBEDDING})).embedding
            model.train(was_training)
            assert emb is not None
            dims.append(emb.flatten(1).shape[1])
        return ContrastMemory(dims[0], dims[1], p.feat_dim, info.train_size, p.nce_t, p.nce_m)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert teacher is not None and student.embedding is not None and teacher.embedding is not None
        assert isinstance(ctx.extra, ContrastMemory), "crd's memory comes from extra_modules()"
        p = self.params
        memory: ContrastMemory = ctx.extra
        k = min(p.nce_k, memory.train_size - 1)
        generator = ctx.generator(NEGATIVES, ctx.device if ctx.device.type == "cuda" else None)
        idx = sample_contrast_index(batch.index, k, memory.train_size, generator).to(memory.memory_s.device)
        crd = memory(student.embedding, teacher.embedding, idx)
        ce = task_loss(student.logits, batch.labels, self.problem)
        kd = soft_loss(student.logits, teacher.logits, p.temperature, self.problem)
        total = p.gamma * ce + p.alpha * kd + p.beta * crd
        return total, {"ce": ce.detach(), "kd": kd.detach(), "crd": crd.detach()}


@hookimpl
def kdbench_methods() -> list[type[Method]]:
    return [CRD]
