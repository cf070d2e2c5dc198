"""Language-model methods (sft, token-kd, seqkd, gkd, rkl, skew-kl, skew-rkl, taid) on a
tiny random Llama pair: each loss against the formula written out here from the models'
raw logits, on-policy samples drawn from the run's named streams (reruns identical), the
teacher caches (greedy outputs, top-k log-probs) computed once and checksummed, and the
refusals of pairs no token-level loss can compare."""

from __future__ import annotations

import pytest
import torch

from kdbench.api import Batch, IncompatibleModelError, Problem
from kdbench.generation import decode, with_response
from kdbench.train.artefacts import expected_sha
from kdbench.train.teachers import TeacherCheckpoint, shared_teacher_tensors
from kdbench_plugins.methods.distillm import SkewKL, SkewReverseKL
from kdbench_plugins.methods.gkd import GKD
from kdbench_plugins.methods.rkl import ReverseKLOnPolicy
from kdbench_plugins.methods.seqkd import SeqKD
from kdbench_plugins.methods.sft import SFT
from kdbench_plugins.methods.taid import TAID
from kdbench_plugins.methods.token_kd import TokenKD
from kdbench_plugins.models.causal_lm import CausalLMFactory, CausalLMOptions
from support.helpers_models import make_ctx, tiny_bert

PROBLEM = Problem("classification", 1)
FACTORY = CausalLMFactory()
TRAIN = {"prompt": ["12+34=", "5+6=", "70+8=", "9+99=", "1+1=", "33+4="], "reference": ["46", "11", "78", "108", "2", "37"]}


def lm(layers: int, seed: int, hidden: int = 32):
    torch.manual_seed(seed)
    opts = CausalLMOptions(tiny={"family": "llama", "layers": layers, "hidden": hidden, "heads": 4, "intermediate": 2 * hidden, "context": 64})
    return FACTORY.build(opts, PROBLEM).double(), opts


def setup(method_cls, seed: int = 0, **params):
    student, opts = lm(1, seed=1)
    teacher, _ = lm(2, seed=2)
    encoded = FACTORY.encode(opts, TRAIN, 32)
    batch = Batch(FACTORY.collate(encoded, torch.arange(4)), torch.zeros(4), torch.arange(4))
    method = method_cls(method_cls.Params(**params), PROBLEM)
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.0), problem=PROBLEM)
    ctx.seed = seed

    def train_batches(size):
        for start in range(0, 6, size):
            idx = torch.arange(start, min(start + size, 6))
            yield Batch(FACTORY.collate(encoded, idx), torch.zeros(len(idx)), idx)

    ctx.train_batches = train_batches
    method.check_models(student, teacher)
    method.setup(ctx)
    return method, ctx, batch


def raw(model, inputs):
    """Response-position log-probabilities straight from the HF model, unpadded, per example."""
    with torch.no_grad():
        return torch.log_softmax(model(inputs).logits.double(), -1)


def by_hand(per_position, mask):
    """Mean over masked positions, written out."""
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if mask[b, i]:
                total += float(per_position(b, i))
                count += 1
    return total / count


def kl(log_p, log_q):
    return float((log_p.exp() * (log_p - log_q)).sum())


def test_sft_is_the_reference_nll():
    method, ctx, batch = setup(SFT)
    out = ctx.student(batch.inputs)
    loss, _ = method.loss(out, None, batch, ctx)
    ls = raw(ctx.student, batch.inputs)
    ids, mask = batch.inputs["response_ids"], batch.inputs["response_mask"]
    assert loss.item() == pytest.approx(by_hand(lambda b, i: -ls[b, i, ids[b, i]], mask), rel=1e-10)


@pytest.mark.parametrize("w", [0.0, 0.3])
def test_token_kd_by_hand(w):
    method, ctx, batch = setup(TokenKD, temperature=2.0, label_weight=w)
    loss, parts = method.loss(ctx.student(batch.inputs), ctx.teacher_forward(batch, method.teacher_needs), batch, ctx)
    with torch.no_grad():
        zs, zt = ctx.student(batch.inputs).logits, ctx.teacher(batch.inputs).logits
    ls, lt = torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1)
    ids, mask = batch.inputs["response_ids"], batch.inputs["response_mask"]
    want_kl = by_hand(lambda b, i: kl(lt[b, i], ls[b, i]), mask)
    want_nll = by_hand(lambda b, i: -torch.log_softmax(zs, -1)[b, i, ids[b, i]], mask)
    assert parts["kl"].item() == pytest.approx(want_kl, rel=1e-10)
    assert loss.item() == pytest.approx((1 - w) * want_kl + w * want_nll, rel=1e-10)


@pytest.mark.parametrize("cls", [SkewKL, SkewReverseKL])
def test_skew_divergences_by_hand(cls):
    method, ctx, batch = setup(cls, alpha=0.2)
    loss, _ = method.loss(ctx.student(batch.inputs), ctx.teacher_forward(batch, method.teacher_needs), batch, ctx)
    ps, pt = raw(ctx.student, batch.inputs).exp(), raw(ctx.teacher, batch.inputs).exp()
    if cls is SkewKL:
        f = lambda b, i: kl(pt[b, i].log(), (0.2 * pt[b, i] + 0.8 * ps[b, i]).log())  # noqa: E731
    else:
        f = lambda b, i: kl(ps[b, i].log(), (0.2 * ps[b, i] + 0.8 * pt[b, i]).log())  # noqa: E731
    assert loss.item() == pytest.approx(by_hand(f, batch.inputs["response_mask"]), rel=1e-10)


def test_taid_target_and_schedule_advance_once_per_step():
    method, ctx, batch = setup(TAID, t_start=0.4, alpha=0.5, beta=0.0)
    ts = []
    for step in range(3):
        ctx.step = step
        for _ in range(2):  # a second loss in the same step (a pilot) must not advance t
            loss, parts = method.loss(ctx.student(batch.inputs), ctx.teacher_forward(batch, method.teacher_needs), batch, ctx)
        t = parts["t"].item()
        ts.append(t)
        with torch.no_grad():
            zs, zt = ctx.student(batch.inputs).logits, ctx.teacher(batch.inputs).logits
        target = torch.log_softmax((1 - t) * zs + t * zt, -1)
        want = by_hand(lambda b, i: kl(target[b, i], torch.log_softmax(zs, -1)[b, i]), batch.inputs["response_mask"])
        assert loss.item() == pytest.approx(want, rel=1e-10)
    # step 1 only records step 0's loss; step 2: change 0 (lr 0, same loss), momentum 0, step up
    # 0.5 * sigmoid(0) * (1 - 0.4) = 0.15, above the linear floor 0.4 + 0.6 * 1 / 10
    assert ts == pytest.approx([0.4, 0.4, 0.55], abs=1e-12)


def test_gkd_on_policy_fraction_and_reproducible_samples():
    method, ctx, batch = setup(GKD, lmbda=0.0, beta=0.3, temperature=1.0, max_new_tokens=6)
    values = method.train_step(ctx, batch)
    assert values["on_policy"].item() == 0.0 and "generation" not in ctx.timings
    ls, lt = raw(ctx.student, batch.inputs), raw(ctx.teacher, batch.inputs)

    def jsd(b, i):
        m = 0.3 * lt[b, i].exp() + 0.7 * ls[b, i].exp()
        return 0.3 * kl(lt[b, i], m.log()) + 0.7 * kl(ls[b, i], m.log())

    assert values["jsd"].item() == pytest.approx(by_hand(jsd, batch.inputs["response_mask"]), rel=1e-10)

    runs = []
    for _ in range(2):  # a rerun with the same seed samples the same responses
        method, ctx, batch = setup(GKD, seed=5, lmbda=1.0, temperature=1.0, max_new_tokens=6)
        g = torch.Generator().manual_seed(0)
        g.set_state(ctx.generator("gkd-samples").get_state())
        expected = decode(ctx.student.lm, batch.inputs["prompt_ids"], batch.inputs["prompt_mask"], 6, 2, 0, greedy=False, generator=g)
        values = method.train_step(ctx, batch)
        sampled = with_response(batch.inputs, expected.tokens, expected.mask)
        ls, lt = raw(ctx.student, sampled), raw(ctx.teacher, sampled)
        assert values["on_policy"].item() == 1.0 and ctx.timings["generation"] > 0
        runs.append(values["jsd"].item())
        m = lambda b, i: 0.5 * lt[b, i].exp() + 0.5 * ls[b, i].exp()  # noqa: E731
        want = by_hand(lambda b, i: 0.5 * kl(lt[b, i], m(b, i).log()) + 0.5 * kl(ls[b, i], m(b, i).log()), sampled["response_mask"])
        assert values["jsd"].item() == pytest.approx(want, rel=1e-10)  # the lr is 0: the models did not move
    assert runs[0] == runs[1]


def test_rkl_on_student_samples_by_hand():
    method, ctx, batch = setup(ReverseKLOnPolicy, max_new_tokens=5)
    g = torch.Generator().manual_seed(0)
    g.set_state(ctx.generator("rkl-samples").get_state())
    expected = decode(ctx.student.lm, batch.inputs["prompt_ids"], batch.inputs["prompt_mask"], 5, 2, 0, greedy=False, generator=g)
    values = method.train_step(ctx, batch)
    sampled = with_response(batch.inputs, expected.tokens, expected.mask)
    ls, lt = raw(ctx.student, sampled), raw(ctx.teacher, sampled)
    assert values["rkl"].item() == pytest.approx(by_hand(lambda b, i: kl(ls[b, i], lt[b, i]), sampled["response_mask"]), rel=1e-10)
    assert values["sample_capped"].item() == pytest.approx(float(expected.hit_cap.float().mean()))


def test_seqkd_trains_on_the_teachers_greedy_outputs_cached_once(tmp_path):
    calls = []
    checkpoint = TeacherCheckpoint("t0", tmp_path / "teacher" / "model.safetensors")

    def cache(name, compute):
        calls.append(name)
        return shared_teacher_tensors(checkpoint, name, compute)

    student, opts = lm(1, seed=1)
    method, ctx, batch = setup(SeqKD, max_new_tokens=4)  # default cache: computed in memory
    greedy = ctx.teacher.generate(batch.inputs, 4, greedy=True)
    cached = ctx.state["seqkd"]
    n = greedy.tokens.shape[1]
    assert torch.equal(cached["tokens"][:4, :n], greedy.tokens) and torch.equal(cached["mask"][:4, :n], greedy.mask)
    values = method.train_step(ctx, batch)
    width = max(int(greedy.mask.sum(1).max()), 1)
    taught = with_response(batch.inputs, greedy.tokens[:, :width], greedy.mask[:, :width])
    ls = raw(ctx.student, taught)
    want = by_hand(lambda b, i: -ls[b, i, taught["response_ids"][b, i]], taught["response_mask"])
    assert values["loss"].item() == pytest.approx(want, rel=1e-10)
    assert "teacher_generation" in ctx.timings
    # through the runner's cache: written once with a checksum, read back by the next run
    for _ in range(2):
        method, ctx, _ = setup(SeqKD, max_new_tokens=4)
        ctx.teacher_cache = cache
        method.setup(ctx)
        assert torch.equal(ctx.state["seqkd"]["tokens"], cached["tokens"])
    path = tmp_path / "teacher" / f"teacher-{calls[0]}.safetensors"
    assert len(set(calls)) == 1 and calls[0].startswith("greedy-n4-") and path.exists()
    assert expected_sha(path) is not None  # checksummed: the second run read it back verified


@pytest.mark.parametrize("k, exact", [(3, False), (99, True)])
def test_topk_teacher_cache_renormalises(k, exact):
    method, ctx, batch = setup(TokenKD, teacher_topk=k)
    teacher_out = ctx.teacher_forward(batch, method.teacher_needs)
    loss, _ = method.loss(ctx.student(batch.inputs), teacher_out, batch, ctx)
    ls, lt = raw(ctx.student, batch.inputs), raw(ctx.teacher, batch.inputs)

    def truncated(b, i):
        top, idx = torch.sort(lt[b, i], descending=True, stable=True)
        p = top[:k].exp() / top[:k].exp().sum()
        return float((p * (p.log() - ls[b, i, idx[:k]])).sum())

    want = by_hand(truncated, batch.inputs["response_mask"])
    assert loss.item() == pytest.approx(want, rel=1e-6)  # the cache holds float32 log-probs
    full = by_hand(lambda b, i: kl(lt[b, i], ls[b, i]), batch.inputs["response_mask"])
    assert (loss.item() == pytest.approx(full, rel=1e-6)) == exact


def test_pairs_no_token_loss_can_compare_are_refused():
    student, _ = lm(1, seed=1)
    method = TokenKD(TokenKD.Params(), PROBLEM)
    with pytest.raises(IncompatibleModelError, match="token_logits"):
        method.check_models(student, tiny_bert())
    other = FACTORY.build(CausalLMOptions(tiny={"family": "gpt2", "layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}), PROBLEM)
    other.lm.resize_token_embeddings(120)
    with pytest.raises(IncompatibleModelError, match="vocabulary has 99 tokens and the teacher's 120"):
        method.check_models(student, other)
