"""What a training step leaves alive (issue 33: kdbench's step held more memory than the
same step in torchdistill or TextBrewer). After ``StepContext.student_step`` no parameter
holds a gradient, so one step's gradients are not alive through the next step's forward
passes; in ``Method.train_step`` the teacher's outputs that the loss did not save are freed
before backward. Both are counted, not timed."""

from __future__ import annotations

import weakref

import torch

from kdbench.api import HIDDEN_STATES, LOGITS
from kdbench_plugins.methods.kd import KD, KDParams
from support.helpers_models import CLASSIFICATION, make_ctx, text_batch, tiny_bert


def test_a_step_leaves_no_gradient_on_the_student_nor_the_teacher():
    student, teacher = tiny_bert(layers=1, seed=0), tiny_bert(layers=2, seed=1)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.5))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    values = KD(KDParams(alpha=0.5, temperature=2.0), CLASSIFICATION).train_step(ctx, text_batch())
    moved = [n for n, p in student.named_parameters() if not torch.equal(before[n], p.detach())]
    assert values["loss"].item() > 0 and "head.weight" in moved and len(moved) >= len(before) - 2  # the step happened
    assert [n for n, p in student.named_parameters() if p.grad is not None] == []
    assert [n for n, p in teacher.named_parameters() if p.grad is not None] == []
    # the next step starts from no gradient and gives the same update as a fresh optimizer's first step would
    KD(KDParams(alpha=0.5, temperature=2.0), CLASSIFICATION).train_step(ctx, text_batch(seed=1))
    assert sum(p.grad is not None for p in student.parameters()) == 0


class KDReadingAllHidden(KD):
    """``kd`` asking the teacher for its hidden states too, which its loss never reads (as a
    method reading some layers gets every layer's)."""

    teacher_needs = frozenset({LOGITS, HIDDEN_STATES})


def test_teacher_outputs_the_loss_did_not_save_are_freed_before_backward():
    student, teacher = tiny_bert(layers=1, seed=0), tiny_bert(layers=2, seed=1)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1))
    refs: list[weakref.ref] = []
    grad_fns: list[object] = []
    forward = ctx.teacher_forward

    def watched(batch, need):
        out = forward(batch, need)
        refs.extend(weakref.ref(h) for h in out.hidden_states)
        grad_fns.extend(t.grad_fn for t in (out.logits, *out.hidden_states))
        return out

    ctx.teacher_forward = watched
    alive_in_backward: list[int] = []
    student.head.weight.register_hook(lambda g: alive_in_backward.append(sum(r() is not None for r in refs)))
    KDReadingAllHidden(KDParams(), CLASSIFICATION).train_step(ctx, text_batch())
    assert len(refs) == 3 and grad_fns == [None] * 4  # embeddings + 2 layers; computed without a graph
    assert alive_in_backward == [0]  # 3 before the fix: the step's locals held them through backward
