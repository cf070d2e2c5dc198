"""How MetaDistil takes its second-order term: ``J g`` (the student's outputs' derivative
along the quiz gradient) by forward-mode AD with the pilot forward's dropout masks
replayed, or by reverse over reverse where forward mode cannot run; both against the
unrolled reference. And the helpers in kdbench.losses that it uses."""

from __future__ import annotations

import warnings

import pytest
import torch

from kdbench.api import FEATURES, LOGITS, ModelOutput
from kdbench.metagrad import output_jvp, output_jvp_reverse, output_tensors, replayed_rng, rng_state, training_mode
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from kdbench_plugins.models.bert import BertFactory, BertOptions
from support.helpers_models import CLASSIFICATION, image_batch, make_ctx, text_batch, tiny_cnn
from test_metadistil import flat, make, ref_meta_gradient, registry  # noqa: F401 (registry: the module fixture)


def dropout_bert(layers: int, seed: int):
    torch.manual_seed(seed)
    opts = BertOptions(tiny={"layers": layers, "hidden": 8, "heads": 2, "intermediate": 16, "vocab_size": 20}, dropout=0.2, pooling="mean")
    return BertFactory().build(opts, CLASSIFICATION).double()


def dropout_setup():
    student, teacher = dropout_bert(1, 1).train(), dropout_bert(2, 2).eval().requires_grad_(True)
    batch, quiz = text_batch(seed=3), text_batch(seed=4)
    params = {"virtual_lr": 0.5, "teacher_lr": 0.1, "teacher_optimizer": "sgd", "teacher_momentum": 0.0, "teacher_grad_clip": None,
              "alpha": 0.5, "temperature": 2.0}
    method = MetaDistil(MetaDistilParams(**params), CLASSIFICATION)
    ctx = make_ctx(student, teacher, torch.optim.AdamW(student.parameters(), lr=1e-2), quiz=quiz)
    method.setup(ctx)
    return method, ctx, batch, quiz


def test_dropout_masks_of_the_pilot_forward_are_replayed_exactly() -> None:
    method, ctx, batch, quiz = dropout_setup()
    torch.manual_seed(123)  # the student's train-mode forward is the first draw in both
    ref = flat(ref_meta_gradient(ctx.student, ctx.teacher, batch, quiz, 0.5))
    torch.manual_seed(124)
    other = flat(ref_meta_gradient(ctx.student, ctx.teacher, batch, quiz, 0.5))
    torch.manual_seed(123)
    grads, _, _ = method.meta_gradient(ctx, batch)
    after = torch.rand(1)
    torch.testing.assert_close(flat(grads), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert not torch.allclose(ref, other, rtol=1e-3)  # other masks give another meta-gradient: the replay matters
    torch.manual_seed(123)
    ctx.student(batch.inputs)
    assert torch.equal(after, torch.rand(1))  # the global stream moved on as after one forward, not two
    assert "jvp_fallback" not in ctx.state


@pytest.mark.parametrize("kind", ["bert", "cnn"])
def test_reverse_over_reverse_fallback_is_exact_and_said_once(kind: str, monkeypatch) -> None:
    method, ctx, batch, quiz = make(kind)
    ref = flat([x if x is not None else torch.zeros(1) for x in ref_meta_gradient(ctx.student, ctx.teacher, batch, quiz, eta=0.5)])

    def no_forward_mode(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with some_op that does not support it")

    monkeypatch.setattr("kdbench.metagrad.output_jvp", no_forward_mode)
    with pytest.warns(UserWarning, match="forward-mode AD failed: Trying to use forward AD with some_op.*reverse over reverse"):
        grads, _, _ = method.meta_gradient(ctx, batch)
    torch.testing.assert_close(flat(grads), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert "some_op" in ctx.state["jvp_fallback"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not said again
        method.meta_gradient(ctx, batch)


def test_output_jvp_matches_reverse_over_reverse_and_leaves_batchnorm_statistics() -> None:
    model = tiny_cnn((3, 4), seed=0).train()
    inputs = image_batch(seed=1).inputs
    need = frozenset({LOGITS, FEATURES})
    tangents = {n: torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, (n, p) in enumerate(model.named_parameters())}
    rng = rng_state(torch.device("cpu"))
    out = model(inputs, need=need)
    outputs, _ = output_tensors(out)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    forward = output_jvp(model, inputs, need, tangents, rng, torch.device("cpu"))
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n
    reverse = output_jvp_reverse(outputs, [p for _, p in model.named_parameters()], list(tangents.values()))
    assert len(forward) == len(reverse) == len(outputs) > 1
    for f, r in zip(forward, reverse):
        torch.testing.assert_close(f, r)
    eps = 1e-6  # and a central difference along the same direction
    moved = [{n: p.detach() + s * eps * tangents[n] for n, p in model.named_parameters()} for s in (1, -1)]
    fd = []
    for m in moved:
        with replayed_rng(torch.device("cpu"), rng):
            fd.append(torch.func.functional_call(model, {**m, **{n: b.clone() for n, b in model.named_buffers()}}, (inputs,), {"need": need}).logits)
    torch.testing.assert_close(forward[0], (fd[0] - fd[1]) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_output_tensors_flattens_and_rebuilds() -> None:
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 2.0)
    out = ModelOutput(logits=a, hidden_states=(b, c), attention_mask=torch.ones(2, dtype=torch.long))
    tensors, rebuild = output_tensors(out)
    assert [t is x for t, x in zip(tensors, (a, b, c))] == [True] * 3 and len(tensors) == 3  # the integer mask is skipped
    new = rebuild([a + 1, b + 1, c + 1])
    assert torch.equal(new.logits, a + 1) and torch.equal(new.hidden_states[1], c + 1) and new.attention_mask is out.attention_mask


def test_training_mode_restores_the_mode() -> None:
    model = tiny_cnn((3,)).train()
    with training_mode(model, False):
        assert not model.training
    assert model.training
