"""MetaDistil around a token-level loss: the teacher's meta-gradient through a tiny causal
LM pair (float64) against the unrolled second-order reference and central finite
differences, the quiz loss as the generation objective's NLL over the reference tokens
(padding left out), and the refusal of an inner method that reads a cached teacher."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from kdbench.api import Batch, KDBenchError, Problem
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from kdbench_plugins.models.causal_lm import CausalLMFactory, CausalLMOptions
from kdbench_plugins.objectives.generation import Generation
from support.helpers_models import make_ctx

FACTORY = CausalLMFactory()
OBJECTIVE = Generation(problem=Problem("generation", 1))
DATA = {"prompt": ["12+34=", "5+6=", "70+8=", "9+99=", "1+1=", "33+4=", "8+80=", "41+2="],
        "reference": ["46", "11", "78", "108", "2", "37", "88", "43"]}
ETA, TEMP = 0.5, 2.0


def lm(layers: int, seed: int, family: str = "gpt2"):
    """A tiny random causal LM in float64, dropout off (the classifier tests cover replayed
    dropout masks; here the reference below needs none)."""
    torch.manual_seed(seed)
    opts = CausalLMOptions(tiny={"family": family, "layers": layers, "hidden": 16, "heads": 2, "intermediate": 32, "context": 32})
    model = FACTORY.build(opts, Problem("generation", 1)).double()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, opts


def batches(family: str = "gpt2"):
    student, opts = lm(1, seed=1, family=family)
    encoded = FACTORY.encode(opts, DATA, 24)

    def batch(rows):
        idx = torch.tensor(rows)
        return Batch(FACTORY.collate(encoded, idx), idx.double(), idx)

    # the quiz rows have responses of different lengths: padded positions must not count
    return student, batch([0, 1, 2]), batch([3, 4, 5, 6])


def make(family: str = "gpt2", **extra):
    student, batch, quiz = batches(family)
    teacher, _ = lm(2, seed=2, family=family)
    teacher.eval().requires_grad_(True)
    params = {"inner": "token-kd", "virtual_lr": ETA, "teacher_lr": 0.1, "teacher_optimizer": "sgd", "teacher_momentum": 0.0,
              "teacher_grad_clip": None, "temperature": TEMP, "label_weight": 0.25, **extra}
    method = MetaDistil(MetaDistilParams(**params), OBJECTIVE)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.0), quiz=quiz, problem=OBJECTIVE)  # type: ignore[arg-type]
    method.check_models(student, teacher)
    method.setup(ctx)
    return method, ctx, batch, quiz


def token_kd_by_hand(zs, zt, ids, mask, w=0.25, temp=TEMP):
    """(1 - w) KL(p_t^T || p_s^T) + w NLL, each a mean over the masked response positions."""
    ls, lt = torch.log_softmax(zs / temp, -1), torch.log_softmax(zt / temp, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    nll = -torch.log_softmax(zs, -1).gather(-1, ids[..., None]).squeeze(-1)
    m = mask.double()
    return (1 - w) * (kl * m).sum() / m.sum() + w * (nll * m).sum() / m.sum()


def quiz_nll(logits, quiz):
    ids, mask = quiz.inputs["response_ids"], quiz.inputs["response_mask"].double()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    return (nll * mask).sum() / mask.sum()


def unrolled_quiz_loss(student, teacher, t_params, batch, quiz, create_graph=True):
    """S' = S - eta grad_S L(S, T) kept as a function of T, then the quiz NLL of S'."""
    s_params = {n: p.detach().clone().requires_grad_() for n, p in student.named_parameters()}
    zt = functional_call(teacher, t_params, (batch.inputs,)).logits
    zs = functional_call(student, s_params, (batch.inputs,)).logits
    inner = token_kd_by_hand(zs, zt, batch.inputs["response_ids"], batch.inputs["response_mask"])
    grads = torch.autograd.grad(inner, list(s_params.values()), create_graph=create_graph, allow_unused=True)
    fast = {n: p - ETA * g if g is not None else p for (n, p), g in zip(s_params.items(), grads)}
    return quiz_nll(functional_call(student, fast, (quiz.inputs,)).logits, quiz)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


# GPT-2's eager attention stays in float64: finite differences agree to 2e-5 (the classifier
# test asks 1e-4). Llama's takes its softmax in float32 (transformers'
# eager_attention_forward): ~1e-7 rounding in the loss swamps a difference quotient (0.2%
# off at eps 1e-3), so Llama is checked against the unrolled autograd reference alone.
@pytest.mark.parametrize("family, eps, rel", [("gpt2", 1e-5, 2e-5), ("llama", None, None)])
def test_token_meta_gradient_matches_unrolled_reference_and_finite_differences(family, eps, rel):
    method, ctx, batch, quiz = make(family)
    student, teacher = ctx.student, ctx.teacher
    names = [n for n, _ in teacher.named_parameters()]
    t_params = {n: p.detach().clone().requires_grad_() for n, p in teacher.named_parameters()}
    ref = torch.autograd.grad(unrolled_quiz_loss(student, teacher, t_params, batch, quiz), list(t_params.values()), allow_unused=True)
    ref = flat([torch.zeros_like(t_params[n]) if g is None else g for n, g in zip(names, ref)])

    grads, _, quiz_loss = method.meta_gradient(ctx, batch)
    g = flat(grads)
    assert g.abs().max() > 1e-4  # the second-order term reaches the teacher
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-9 * ref.abs().max().item())
    # the quiz loss reported is the NLL of S' on the quiz references, padding left out
    with torch.no_grad():
        base = {n: p.detach() for n, p in teacher.named_parameters()}
    with torch.enable_grad():
        assert quiz_loss.item() == pytest.approx(unrolled_quiz_loss(student, teacher, base, batch, quiz, create_graph=False).item(), rel=1e-10)

    for i in range(3 if eps else 0):
        d = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i), dtype=p.dtype) for n, p in base.items()}
        f = []
        for sign in (1.0, -1.0):
            moved = {n: (base[n] + sign * eps * d[n]).requires_grad_() for n in names}
            with torch.enable_grad():
                f.append(unrolled_quiz_loss(student, teacher, moved, batch, quiz, create_graph=False).item())
        fd = (f[0] - f[1]) / (2 * eps)
        assert float(g @ flat([d[n] for n in names])) == pytest.approx(fd, rel=rel, abs=1e-10)


def test_quiz_loss_ignores_padded_response_positions():
    """Changing what sits at padded response positions of the quiz leaves its loss and the
    meta-gradient unchanged (the objective's mask, not the padding, decides what counts)."""
    method, ctx, batch, quiz = make()
    g1, _, q1 = method.meta_gradient(ctx, batch)
    ids = quiz.inputs["response_ids"].clone()
    pad = quiz.inputs["response_mask"] == 0
    assert pad.any()
    ids[pad] = 7  # a real character id instead of the pad id
    ctx.next_quiz_batch = lambda: Batch({**quiz.inputs, "response_ids": ids}, quiz.labels, quiz.index)
    g2, _, q2 = method.meta_gradient(ctx, batch)
    assert q2.item() == pytest.approx(q1.item(), rel=1e-12)
    torch.testing.assert_close(flat(g2), flat(g1), rtol=1e-9, atol=1e-12)


def test_a_step_moves_the_teacher_by_minus_lr_times_the_meta_gradient():
    method, ctx, batch, _ = make()
    before = {n: p.detach().clone() for n, p in ctx.teacher.named_parameters()}
    grads, _, _ = method.meta_gradient(ctx, batch)
    values = method.train_step(ctx, batch)
    after = dict(ctx.teacher.named_parameters())
    for (n, b), gr in zip(before.items(), grads):
        torch.testing.assert_close(after[n].detach(), b - 0.1 * gr, rtol=1e-9, atol=1e-12)
    assert values["quiz_loss"].item() > 0


def test_inner_reading_a_cached_teacher_is_refused():
    """A top-k cache holds the teacher as it was; MetaDistil's real step must read the teacher it updates."""
    student, batch, quiz = batches()
    teacher, _ = lm(2, seed=2)
    method = MetaDistil(MetaDistilParams(inner="token-kd", teacher_topk=4), OBJECTIVE)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.0), quiz=quiz, problem=OBJECTIVE)  # type: ignore[arg-type]
    encoded = FACTORY.encode(lm(1, 1)[1], DATA, 24)
    ctx.train_batches = lambda size: iter([Batch(FACTORY.collate(encoded, torch.arange(8)), torch.zeros(8), torch.arange(8))])
    with pytest.raises(KDBenchError, match="reads its teacher from outputs computed once"):
        method.setup(ctx)
