"""CRD: NCE loss on a hand-set memory bank, the momentum update, Z, sampling, a training step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from support.vision_test_models import LogitsOnly, TinyCNN, fixed_batch, hand_ce, hand_kd, make_ctx

from kdbench.api import IncompatibleModelError, Method, stream_seed, ModelOutput, Problem, SetupInfo
from kdbench.registry import Registry, make_plugin_manager
from kdbench_plugins.methods.crd import NEGATIVES, CRD, EPS, ContrastMemory, CRDParams, sample_contrast_index

PROBLEM = Problem("classification", 5)


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def hand_embed(w: list[list[float]], b: list[float], x: list[float]) -> list[float]:
    return unit([sum(w[o][i] * x[i] for i in range(len(x))) + b[o] for o in range(len(w))])


def hand_nce(anchors: list[list[float]], memory: list[list[float]], idx: list[list[int]], tau: float, n: int, z: float | None):
    """(loss, Z) of one side: h = exp(<m, v>/tau) / Z, Z = n * mean(h) when not given."""
    raw = [[math.exp(sum(m * a for m, a in zip(memory[j], anchors[b])) / tau) for j in row] for b, row in enumerate(idx)]
    if z is None:
        z = n * sum(sum(r) for r in raw) / sum(len(r) for r in raw)
    k = len(idx[0]) - 1
    total = 0.0
    for row in raw:
        h = [x / z for x in row]
        total += math.log(h[0] / (h[0] + k / n + EPS))
        total += sum(math.log((k / n) / (x + k / n + EPS)) for x in h[1:])
    return -total / len(idx), z


def make_memory() -> tuple[ContrastMemory, dict]:
    mem = ContrastMemory(s_dim=3, t_dim=2, feat_dim=3, train_size=6, nce_t=0.5, nce_m=0.5).double()
    hand = {
        "ws": [[1.0, 0.0, 0.5], [0.0, -1.0, 0.2], [0.3, 0.4, 1.0]], "bs": [0.1, 0.0, -0.1],
        "wt": [[0.5, -0.2], [1.0, 0.3], [-0.4, 0.8]], "bt": [0.0, 0.2, 0.1],
        "ms": [unit([1, 0, 0]), unit([0, 1, 0]), unit([0, 0, 1]), unit([1, 1, 0]), unit([1, -1, 1]), unit([-1, 2, 0.5])],
        "mt": [unit([0, 1, 1]), unit([1, 0, -1]), unit([2, 1, 0]), unit([0, -1, 0]), unit([1, 1, 1]), unit([0.5, 0, 1])],
    }
    with torch.no_grad():
        mem.embed_s.weight.copy_(torch.tensor(hand["ws"]))
        mem.embed_s.bias.copy_(torch.tensor(hand["bs"]))
        mem.embed_t.weight.copy_(torch.tensor(hand["wt"]))
        mem.embed_t.bias.copy_(torch.tensor(hand["bt"]))
        mem.memory_s.copy_(torch.tensor(hand["ms"]))
        mem.memory_t.copy_(torch.tensor(hand["mt"]))
    return mem, hand


def test_nce_loss_z_and_momentum_update_on_a_hand_set_memory_bank():
    mem, hand = make_memory()
    f_s = [[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]]
    f_t = [[1.0, 2.0], [-0.5, 0.7]]
    idx = [[1, 0, 4], [3, 5, 1]]  # positives 1 and 3, K = 2 given negatives
    loss = mem(torch.tensor(f_s, dtype=torch.float64), torch.tensor(f_t, dtype=torch.float64), torch.tensor(idx))

    v_s = [hand_embed(hand["ws"], hand["bs"], x) for x in f_s]
    v_t = [hand_embed(hand["wt"], hand["bt"], x) for x in f_t]
    loss_s, z_s = hand_nce(v_s, hand["mt"], idx, 0.5, 6, None)  # student anchors, teacher memory
    loss_t, z_t = hand_nce(v_t, hand["ms"], idx, 0.5, 6, None)  # teacher anchors, student memory
    assert loss.item() == pytest.approx(loss_s + loss_t, rel=1e-5)
    assert mem.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)

    # momentum 0.5: the positives' rows move half-way to the new embeddings, renormalised
    ms, mt = [list(r) for r in hand["ms"]], [list(r) for r in hand["mt"]]
    for b, i in enumerate([1, 3]):
        ms[i] = unit([0.5 * m + 0.5 * v for m, v in zip(hand["ms"][i], v_s[b])])
        mt[i] = unit([0.5 * m + 0.5 * v for m, v in zip(hand["mt"][i], v_t[b])])
    assert mem.memory_s.tolist() == [pytest.approx(r, rel=1e-6, abs=1e-7) for r in ms]
    assert mem.memory_t.tolist() == [pytest.approx(r, rel=1e-6, abs=1e-7) for r in mt]

    # a second batch reads the updated banks and keeps the first batch's Z
    idx2 = [[0, 3, 2], [5, 1, 1]]
    f_s2 = [[0.0, 1.0, -1.0], [2.0, 0.5, 0.5]]
    loss2 = mem(torch.tensor(f_s2, dtype=torch.float64), torch.tensor(f_t, dtype=torch.float64), torch.tensor(idx2))
    v_s2 = [hand_embed(hand["ws"], hand["bs"], x) for x in f_s2]
    expect = hand_nce(v_s2, mt, idx2, 0.5, 6, z_s)[0] + hand_nce(v_t, ms, idx2, 0.5, 6, z_t)[0]
    assert loss2.item() == pytest.approx(expect, rel=1e-5)
    assert mem.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)


def test_memory_banks_are_buffers_outside_autograd():
    mem, _ = make_memory()
    assert {n for n, _ in mem.named_parameters()} == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    assert {n for n, _ in mem.named_buffers()} == {"memory_s", "memory_t", "z"}
    loss = mem(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64), torch.tensor([[0, 1], [2, 3]]))
    loss.backward()
    assert not mem.memory_s.requires_grad and mem.memory_s.grad is None
    assert mem.embed_t.weight.grad.abs().sum() > 0  # the teacher-side head learns from the teacher-anchor term


def test_negatives_are_uniform_over_the_other_examples_and_seeded():
    gen = torch.Generator().manual_seed(0)
    idx = sample_contrast_index(torch.tensor([2, 0]), 4000, 5, gen)
    assert idx.shape == (2, 4001) and idx[:, 0].tolist() == [2, 0]
    for row, pos in zip(idx, (2, 0)):
        counts = torch.bincount(row[1:], minlength=5)
        assert counts[pos] == 0
        others = [c for j, c in enumerate(counts.tolist()) if j != pos]
        assert all(abs(c - 1000) < 120 for c in others)  # ~4 sigma for Binomial(4000, 1/4)
    again = sample_contrast_index(torch.tensor([2, 0]), 4000, 5, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


def test_method_loss_clips_k_and_draws_from_the_run_seeded_generator():
    torch.manual_seed(11)
    student, teacher = TinyCNN(), TinyCNN(6, (8, 12, 16)).eval()
    batch = fixed_batch(n=4)
    method = CRD(CRDParams(gamma=0.3, alpha=0.6, beta=0.8, nce_t=0.2, feat_dim=8), PROBLEM)
    extra = method.extra_modules(student, teacher, SetupInfo(batch, 6, torch.device("cpu")))
    assert isinstance(extra, ContrastMemory) and extra.memory_s.shape == (6, 8)
    assert extra.embed_s.in_features == 8 and extra.embed_t.in_features == 16
    ctx = make_ctx(student, teacher, extra, train_size=6)
    ctx.seed = 11
    method.setup(ctx)
    reference = copy.deepcopy(extra)
    s_out = student(batch.inputs, need=method.student_needs)
    t_out = teacher(batch.inputs, need=method.teacher_needs)
    total, parts = method.loss(s_out, t_out, batch, ctx)  # reads batch.index: no train_step of its own

    # nce_k 16384 is clipped to N - 1 = 5; the negatives come from the run's stream
    # "crd-negatives", seeded where CRD seeded itself before (torch.initial_seed() + 1_000_003)
    assert stream_seed(11, NEGATIVES) == 11 + 1_000_003
    idx = sample_contrast_index(batch.index, 5, 6, torch.Generator().manual_seed(11 + 1_000_003))
    crd = reference(s_out.embedding, t_out.embedding, idx)
    ce, kd = hand_ce(s_out.logits, batch.labels), hand_kd(s_out.logits, t_out.logits, 4.0)
    assert parts["crd"].item() == pytest.approx(crd.item(), rel=1e-6)
    assert total.item() == pytest.approx((0.3 * ce + 0.6 * kd + 0.8 * crd).item(), rel=1e-5)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    student, teacher = TinyCNN(4, (4, 8, 8)), TinyCNN(6, (8, 12, 16)).eval()
    batch = fixed_batch()
    method = CRD(CRDParams(alpha=0.5), PROBLEM)
    method.check_models(student, teacher)
    extra = method.extra_modules(student, teacher, SetupInfo(batch, 16, torch.device("cpu")))
    # plain SGD: with 16 examples every other example is a negative, and momentum makes
    # the exp(<v, m> / 0.07) critic oscillate at this scale
    ctx = make_ctx(student, teacher, extra, lr=0.05, momentum=0.0, train_size=16)
    method.setup(ctx)
    before = extra.memory_s.clone()
    parts = [method.train_step(ctx, batch) for _ in range(10)]
    assert parts[-1]["loss"].item() < 0.93 * parts[0]["loss"].item()
    assert parts[-1]["crd"].item() < parts[0]["crd"].item()
    assert not torch.equal(extra.memory_s, before)  # the banks moved by momentum, not by the optimizer


def test_crd_is_loss_based_so_metadistil_can_wrap_it():
    assert CRD.is_loss_based() and CRD.train_step is Method.train_step


def test_refuses_models_without_embedding():
    method = CRD(CRDParams(), PROBLEM)
    with pytest.raises(IncompatibleModelError, match=r"student to expose \['embedding'\]"):
        method.check_models(LogitsOnly(), TinyCNN())
    with pytest.raises(IncompatibleModelError, match=r"teacher to expose \['embedding'\]"):
        method.check_models(TinyCNN(), LogitsOnly())


def test_registered_through_the_hook():
    pm, broken = make_plugin_manager(extra_plugins=["kdbench_plugins.methods.crd"])
    assert Registry(pm, broken).method("crd") is CRD
    assert CRDParams() == CRDParams(gamma=1.0, alpha=0.0, beta=0.8, temperature=4.0, feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5)
