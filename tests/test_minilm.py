"""MiniLM and MiniLMv2 against hand computations: the masked relation KL in numpy, MiniLM's
attention and value-relation terms from a tiny encoder's own outputs, MiniLMv2's relation
heads across different widths and head counts (re-split of the concatenated projections,
checked against the projections' raw outputs), zero loss for a student that is the
teacher, gradients by finite differences, and the named refusals (layer beyond the model,
head counts, relation heads that do not divide a width)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.api import Batch, IncompatibleModelError, Problem
from kdbench.encoders import resolve_path
from kdbench.losses import relation_kl, relation_logits
from kdbench_plugins.methods.minilm import MiniLM, MiniLMParams
from kdbench_plugins.methods.minilmv2 import MiniLMv2, MiniLMv2Params
from kdbench_plugins.models.hf import HFFactory, HFOptions

PROBLEM = Problem("classification", 3)


def tiny(layers: int, hidden: int, heads: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    opts = HFOptions(family="bert", tiny={"layers": layers, "hidden": hidden, "heads": heads, "intermediate": 2 * hidden, "vocab_size": 40},
                     dropout=0.0)
    return HFFactory().build(opts, PROBLEM).double().eval()


def batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, -2:] = 0
    return Batch({"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, torch.tensor([0, 2, 1]), torch.arange(3))


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_relation_kl(s_logits: np.ndarray, t_logits: np.ndarray, mask: np.ndarray) -> float:
    """Per example: mean over heads and real queries of KL over real keys; then batch mean."""
    out = []
    for b in range(s_logits.shape[0]):
        real = np.flatnonzero(mask[b])
        vals = []
        for a in range(s_logits.shape[1]):
            for q in real:
                ps, pt = np_softmax(s_logits[b, a, q, real]), np_softmax(t_logits[b, a, q, real])
                vals.append((pt * (np.log(pt) - np.log(ps))).sum())
        out.append(np.mean(vals))
    return float(np.mean(out))


def test_relation_kl_by_hand_with_padding() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert relation_kl(s, t, mask).item() == pytest.approx(np_relation_kl(s.numpy(), t.numpy(), mask.numpy()), rel=1e-12)
    probs_s, probs_t = (torch.softmax(x.masked_fill(mask[:, None, None, :] == 0, -torch.inf), -1) for x in (s, t))
    assert relation_kl(probs_s, probs_t, mask, probabilities=True).item() == pytest.approx(relation_kl(s, t, mask).item(), rel=1e-10)


def test_relation_heads_resplit_the_concatenated_projection() -> None:
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)  # 4 heads of 3: width 12
    concat = x.transpose(1, 2).reshape(2, 5, 12)
    for heads in (1, 2, 6):
        parts = concat.reshape(2, 5, heads, 12 // heads).transpose(1, 2)
        torch.testing.assert_close(relation_logits(x, heads), parts @ parts.transpose(-1, -2) / math.sqrt(12 / heads))
    torch.testing.assert_close(relation_logits(x), x @ x.transpose(-1, -2) / math.sqrt(3))
    with pytest.raises(ValueError, match="5 relation heads do not divide the width 12"):
        relation_logits(x, 5)


def test_minilm_terms_from_the_models_own_outputs() -> None:
    student, teacher = tiny(2, 8, 2, seed=1), tiny(3, 16, 2, seed=2)
    method = MiniLM(MiniLMParams(kd_weight=0.5, temperature=2.0), PROBLEM)
    method.check_models(student, teacher)
    b = batch()
    s_out, t_out = student(b.inputs, need=method.student_needs), teacher(b.inputs, need=method.teacher_needs)
    loss, parts = method.loss(s_out, t_out, b, None)  # type: ignore[arg-type]
    mask = b.inputs["attention_mask"].numpy()
    at = np_relation_kl(np.log(np.clip(s_out.attention_probs[-1].detach().numpy(), 1e-300, None)),
                        np.log(np.clip(t_out.attention_probs[-1].detach().numpy(), 1e-300, None)), mask)
    v_s, v_t = s_out.values[-1].detach().numpy(), t_out.values[-1].detach().numpy()
    vr = np_relation_kl(v_s @ v_s.transpose(0, 1, 3, 2) / math.sqrt(4), v_t @ v_t.transpose(0, 1, 3, 2) / math.sqrt(8), mask)
    assert parts["attention"].item() == pytest.approx(at, rel=1e-8) and parts["value_relation"].item() == pytest.approx(vr, rel=1e-8)
    assert loss.item() == pytest.approx(at + vr + parts["ce"].item() + 0.5 * parts["kd"].item(), rel=1e-10)
    # a student that is the teacher has nothing to learn from either relation
    same = tiny(3, 16, 2, seed=2)  # rebuilt, not deep-copied: a copy's capture hooks still write to the original (see the report)
    _, zero = method.loss(same(b.inputs, need=method.student_needs), t_out, b, None)  # type: ignore[arg-type]
    assert abs(zero["attention"].item()) < 1e-12 and abs(zero["value_relation"].item()) < 1e-12


def test_minilmv2_across_widths_and_head_counts() -> None:
    student, teacher = tiny(2, 8, 4, seed=3), tiny(3, 16, 2, seed=4)  # 4 heads of 2 vs 2 heads of 8
    method = MiniLMv2(MiniLMv2Params(relation_heads=2, teacher_layer=1), PROBLEM)
    method.check_models(student, teacher)
    b = batch()
    s_out, t_out = student(b.inputs, need=method.student_needs), teacher(b.inputs, need=method.teacher_needs)
    loss, parts = method.loss(s_out, t_out, b, None)  # type: ignore[arg-type]
    mask = b.inputs["attention_mask"].numpy()
    # the projections' raw outputs (B, L, H), taken from the layers' own modules: independent of the head split
    raw = {}
    for role, model, layer in (("s", student, -1), ("t", teacher, 1)):
        hidden = (s_out if role == "s" else t_out)
        layer_module = model.layer_list()[layer]
        h_in = model(b.inputs, need=frozenset({"hidden_states"})).hidden_states[layer % len(model.layer_list())]
        for name in ("query", "key", "value"):
            proj = resolve_path(layer_module, getattr(model.encoder_family, name))
            raw[role, name] = proj(h_in).detach().numpy()
        assert hidden is not None
    total = 0.0
    for name, key in (("query", "qq"), ("key", "kk"), ("value", "vv")):
        rel = {}
        for role, width in (("s", 8), ("t", 16)):
            x = raw[role, name].reshape(3, 6, 2, width // 2).transpose(0, 2, 1, 3)
            rel[role] = x @ x.transpose(0, 1, 3, 2) / math.sqrt(width // 2)
        expected = np_relation_kl(rel["s"], rel["t"], mask)
        assert parts[key].item() == pytest.approx(expected, rel=1e-8), key
        total += expected
    assert loss.item() == pytest.approx(total + parts["ce"].item(), rel=1e-10)


def test_minilmv2_gradient_by_finite_differences() -> None:
    student, teacher = tiny(1, 8, 2, seed=5), tiny(2, 8, 2, seed=6)
    method = MiniLMv2(MiniLMv2Params(relation_heads=4, ce_weight=0.0), PROBLEM)
    b = batch()
    t_out = teacher(b.inputs, need=method.teacher_needs)
    w = resolve_path(student.layer_list()[0], student.encoder_family.query).weight

    def f() -> torch.Tensor:
        return method.loss(student(b.inputs, need=method.student_needs), t_out, b, None)[0]  # type: ignore[arg-type]

    grad = torch.autograd.grad(f(), w)[0]
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(7), dtype=w.dtype)
    with torch.no_grad():
        w += 1e-6 * d
        up = f().item()
        w -= 2e-6 * d
        down = f().item()
        w += 1e-6 * d
    assert float((grad * d).sum()) == pytest.approx((up - down) / 2e-6, rel=1e-5)


def test_refusals_name_the_problem() -> None:
    student, teacher = tiny(2, 8, 4, seed=1), tiny(3, 16, 2, seed=2)
    with pytest.raises(IncompatibleModelError, match="student has 4 heads and the teacher 2; use 'minilmv2'"):
        MiniLM(MiniLMParams(), PROBLEM).check_models(student, teacher)
    with pytest.raises(IncompatibleModelError, match=r"teacher layer 3, but the teacher model has 3 layers \(valid: 0..2"):
        MiniLMv2(MiniLMv2Params(relation_heads=2, teacher_layer=3), PROBLEM).check_models(student, teacher)
    with pytest.raises(IncompatibleModelError, match="student layer -3, but the student model has 2 layers"):
        MiniLMv2(MiniLMv2Params(relation_heads=2, student_layer=-3), PROBLEM).check_models(student, teacher)
    with pytest.raises(IncompatibleModelError, match="relation_heads 3, which does not divide the student's width 8"):
        MiniLMv2(MiniLMv2Params(relation_heads=3), PROBLEM).check_models(student, teacher)
