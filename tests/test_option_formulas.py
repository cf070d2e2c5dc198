"""Every option of the methods added since 2021 reaches the loss as its formula says.

For each method and each field of its ``Params``, the option is set away from its default
(one at a time, beside the parameters the option needs in order to matter) and the loss,
or the gradient the option acts on, is compared with a hand computation written out here
from the formula in the method's docstring with that value. A method that ignores the
option (reads its default, or a constant, where the formula reads the option) computes
the default's value and fails. ``tests/test_option_effects.py`` names, for every field, the
test here (or the hand computation elsewhere) that fails; ``tests/mutants.py`` makes those
one-line bugs and runs these tests against them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.api import Batch, Problem, SetupInfo
from kdbench.generation import decode, with_response
from kdbench_plugins.methods.ctkd import CTKD, CTKDParams, GlobalTemperature
from kdbench_plugins.methods.dist import DIST, DISTParams
from kdbench_plugins.methods.distillm import SkewKL, SkewReverseKL
from kdbench_plugins.methods.minilm import MiniLM, MiniLMParams
from kdbench_plugins.methods.minilmv2 import MiniLMv2, MiniLMv2Params
from kdbench_plugins.methods.mlkd import MLKD, MLKDParams
from kdbench_plugins.methods.reviewkd import ReviewKD, ReviewKDParams, hcl
from kdbench_plugins.methods.rkl import ReverseKLOnPolicy
from kdbench_plugins.methods.taid import TAID
from kdbench_plugins.models.cifar import CifarFactory, CifarOptions
from support.helpers_models import make_ctx, tiny_cnn
from test_lm_methods import by_hand, kl, raw
from test_lm_methods import setup as lm_setup
from test_minilm import batch as text_batch
from test_minilm import np_relation_kl, tiny
from test_new_methods import C3, S, T, Y, ce, out, pearson, softmax, zscore
from test_new_methods import batch as class_batch


def vary(cases: dict[str, tuple[Any, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """(option, params) per case: the default run, then each option at its other value beside
    the parameters it needs to matter; every other option stays at its default."""
    return [pytest.param("default", {}, id="default")] + [pytest.param(o, {**base, o: v}, id=o) for o, (v, base) in cases.items()]


def settings(params_cls: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Every field of ``params_cls`` at its default (``model_dump`` leaves out fields added
    at their default, to keep run hashes), then ``params``."""
    return {**{name: field.default for name, field in params_cls.model_fields.items()}, **params}


def assert_option_matters(value: float, option: str, params: dict[str, Any], fn: Any) -> None:
    """The case differs from the same parameters at the option's default (else the case
    could not catch an option read as its default)."""
    if option == "default":
        return
    default_params = {k: v for k, v in params.items() if k != option}
    assert fn(default_params) != pytest.approx(value, rel=1e-6), f"{option}: the case does not change the loss"


# ------------------------------------------------------------------ DIST


DIST_CASES = {"ce_weight": (0.3, {}), "beta": (0.7, {}), "gamma": (1.9, {}), "temperature": (2.5, {}), "logit_standardization": (True, {})}


def dist_by_hand(params: dict[str, Any]) -> float:
    p = settings(DISTParams, params)
    zs, zt = (zscore(S), zscore(T)) if p["logit_standardization"] else (S, T)
    ys, yt, t2 = softmax(zs / p["temperature"]), softmax(zt / p["temperature"]), p["temperature"] ** 2
    inter, intra = t2 * (1 - pearson(ys, yt).mean()), t2 * (1 - pearson(ys.T, yt.T).mean())
    return p["ce_weight"] * ce(S, Y) + p["beta"] * inter + p["gamma"] * intra


@pytest.mark.parametrize("option, params", vary(DIST_CASES))
def test_dist_options(option: str, params: dict[str, Any]) -> None:
    loss, _ = DIST(DISTParams(**params), C3).loss(out(S), out(T), class_batch(), None)  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(dist_by_hand(params), rel=1e-6)
    assert_option_matters(loss.item(), option, params, dist_by_hand)


# ------------------------------------------------------------------ MLKD


MLKD_CASES = {"ce_weight": (0.4, {}), "kd_weight": (0.3, {}), "temperatures": ([2.0, 7.0], {}), "logit_standardization": (True, {})}


def mlkd_by_hand(params: dict[str, Any]) -> float:
    p = settings(MLKDParams, params)
    pt = softmax(T)
    conf, mass = pt.max(1), pt.sum(0)
    f, f_c = (conf <= np.percentile(conf, 50)).mean(), (mass <= np.percentile(mass, 50)).mean()
    zs, zt = (zscore(S), zscore(T)) if p["logit_standardization"] else (S, T)  # the KD terms only (MLKD+LS)
    total = 0.0
    for temp in p["temperatures"]:
        a, b = softmax(S / temp), softmax(T / temp)
        ps, pk = softmax(zs / temp), softmax(zt / temp)
        kd = temp**2 * (pk * (np.log(pk) - np.log(ps))).sum(1).mean()
        bc = ((b @ b.T - a @ a.T) ** 2).sum() / len(S)
        cc = ((b.T @ b - a.T @ a) ** 2).sum() / S.shape[1]
        total += f * kd + f * bc + f_c * cc
    return p["ce_weight"] * ce(S, Y) + p["kd_weight"] * total


@pytest.mark.parametrize("option, params", vary(MLKD_CASES))
def test_mlkd_options(option: str, params: dict[str, Any]) -> None:
    loss, _ = MLKD(MLKDParams(**params), C3).loss(out(S), out(T), class_batch(), None)  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(mlkd_by_hand(params), rel=1e-7)
    assert_option_matters(loss.item(), option, params, mlkd_by_hand)


# ------------------------------------------------------------------ CTKD


CTKD_CASES = {"gamma": (0.6, {}), "alpha": (0.3, {}), "t_start": (2.0, {}), "t_range": (5.0, {}), "lambda_max": (0.6, {}),
              "curriculum_fraction": (0.1, {}), "logit_standardization": (True, {})}
CTKD_STEP, CTKD_TOTAL = 4, 240


def ctkd_by_hand(params: dict[str, Any]) -> tuple[float, float]:
    """(loss, d loss / d w): the gradient-reversed derivative of the KD term in the learned w (w = 1)."""
    p = settings(CTKDParams, params)
    zs, zt = (zscore(S), zscore(T)) if p["logit_standardization"] else (S, T)

    def kd(w: float) -> float:
        temp = p["t_start"] + p["t_range"] / (1 + math.exp(-w))
        ps, pt = softmax(zs / temp), softmax(zt / temp)
        return temp**2 * float((pt * (np.log(pt) - np.log(ps))).sum(1).mean())

    width = max(p["curriculum_fraction"] * CTKD_TOTAL, 1.0)
    lam = p["lambda_max"] * (1 - math.cos(math.pi * min((CTKD_STEP + 1) / width, 1.0))) / 2
    slope = (kd(1 + 1e-6) - kd(1 - 1e-6)) / 2e-6
    return p["gamma"] * ce(S, Y) + p["alpha"] * kd(1.0), -lam * p["alpha"] * slope


@pytest.mark.parametrize("option, params", vary(CTKD_CASES))
def test_ctkd_options(option: str, params: dict[str, Any]) -> None:
    temperature = GlobalTemperature().double()
    ctx = make_ctx(tiny_cnn(problem=C3), None, torch.optim.SGD(temperature.parameters(), lr=0.1), extra=temperature,
                   total_steps=CTKD_TOTAL, step=CTKD_STEP)
    loss, _ = CTKD(CTKDParams(**params), C3).loss(out(S), out(T), class_batch(), ctx)
    loss.backward()
    want_loss, want_grad = ctkd_by_hand(params)
    got = (loss.item(), temperature.w.grad.item())
    assert got == (pytest.approx(want_loss, rel=1e-9), pytest.approx(want_grad, rel=1e-5))
    if option != "default":  # the option moves the loss or the temperature's gradient (lambda_max, curriculum_fraction)
        base = ctkd_by_hand({k: v for k, v in params.items() if k != option})
        assert got != (pytest.approx(base[0], rel=1e-6), pytest.approx(base[1], rel=1e-6))


# ------------------------------------------------------------------ ReviewKD


REVIEW_CASES = {"ce_weight": (0.4, {}), "reviewkd_weight": (5.0, {}), "warmup_fraction": (0.1, {}), "student_preact": (True, {})}
REVIEW_STEP, REVIEW_TOTAL = 4, 100


@pytest.mark.parametrize("option, params", vary(REVIEW_CASES))
def test_reviewkd_options(option: str, params: dict[str, Any]) -> None:
    problem = Problem("classification", 5)
    torch.manual_seed(0)
    student = CifarFactory().build(CifarOptions(arch="resnet8"), problem)
    torch.manual_seed(0)
    teacher = CifarFactory().build(CifarOptions(arch="resnet14"), problem).eval()
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    b = Batch(inputs={"pixel_values": pixels}, labels=torch.tensor([0, 1, 2, 3]), index=torch.arange(4))
    method = ReviewKD(ReviewKDParams(**params), problem)
    torch.manual_seed(2)
    fusion = method.extra_modules(student, teacher, SetupInfo(sample=b, train_size=4, device=torch.device("cpu")))
    ctx = make_ctx(student, teacher, torch.optim.SGD(student.parameters(), lr=0.0), extra=fusion, problem=problem,
                   total_steps=REVIEW_TOTAL, step=REVIEW_STEP)
    with torch.no_grad():
        t_out = teacher(b.inputs, need=method.teacher_needs)
        s_out = student.eval()(b.inputs, need=method.student_needs)  # eval: BatchNorm reads the same statistics twice
        fusion.eval()
        loss, _ = method.loss(s_out, t_out, b, ctx)
        p = settings(ReviewKDParams, params)
        maps = s_out.preact_features if p["student_preact"] else s_out.features
        fused = fusion([*maps[1:], s_out.embedding[:, :, None, None]])
        review = hcl(fused, [*t_out.preact_features[1:], t_out.embedding[:, :, None, None]]).item()
    warm = p["warmup_fraction"] * REVIEW_TOTAL
    w = 1.0 if warm <= 0 else min((REVIEW_STEP + 1) / warm, 1.0)
    want = p["ce_weight"] * F.cross_entropy(s_out.logits, b.labels).item() + w * p["reviewkd_weight"] * review
    assert loss.item() == pytest.approx(want, rel=1e-6)
    if option == "student_preact":  # ReLU'd and raw stage maps differ, so the fused maps do
        assert not torch.equal(s_out.preact_features[1], s_out.features[1])


# ------------------------------------------------------------------ MiniLM, MiniLMv2


def np_ce_kd(s: np.ndarray, t: np.ndarray, labels: np.ndarray, temp: float) -> tuple[float, float]:
    ps, pt = softmax(s / temp), softmax(t / temp)
    return ce(s, labels), temp**2 * float((pt * (np.log(pt) - np.log(ps))).sum(1).mean())


MINILM_CASES = {"w_relation": (0.5, {}), "ce_weight": (0.3, {}), "kd_weight": (0.7, {}), "temperature": (2.0, {"kd_weight": 0.5}),
                "teacher_layer": (1, {}), "student_layer": (0, {})}


@pytest.mark.parametrize("option, params", vary(MINILM_CASES))
def test_minilm_options(option: str, params: dict[str, Any]) -> None:
    student, teacher = tiny(2, 8, 2, seed=1), tiny(3, 16, 2, seed=2)
    method = MiniLM(MiniLMParams(**params), Problem("classification", 3))
    b = text_batch()
    s_out, t_out = student(b.inputs, need=method.student_needs), teacher(b.inputs, need=method.teacher_needs)
    loss, _ = method.loss(s_out, t_out, b, None)  # type: ignore[arg-type]
    p = settings(MiniLMParams, params)
    i, j, mask = p["student_layer"], p["teacher_layer"], b.inputs["attention_mask"].numpy()
    log = lambda a: np.log(np.clip(a.detach().numpy(), 1e-300, None))  # noqa: E731
    at = np_relation_kl(log(s_out.attention_probs[i]), log(t_out.attention_probs[j]), mask)
    v_s, v_t = s_out.values[i].detach().numpy(), t_out.values[j].detach().numpy()  # heads of 4 and 8
    vr = np_relation_kl(v_s @ v_s.transpose(0, 1, 3, 2) / 2.0, v_t @ v_t.transpose(0, 1, 3, 2) / math.sqrt(8), mask)
    c, k = np_ce_kd(s_out.logits.detach().numpy(), t_out.logits.detach().numpy(), b.labels.numpy(), p["temperature"])
    assert loss.item() == pytest.approx(p["w_relation"] * (at + vr) + p["ce_weight"] * c + p["kd_weight"] * k, rel=1e-9)


def resplit(x: np.ndarray, heads: int) -> np.ndarray:
    """(B, A, L, d) -> relation logits over ``heads`` relation heads of the concatenated width, in numpy."""
    b, a, length, d = x.shape
    parts = x.transpose(0, 2, 1, 3).reshape(b, length, heads, a * d // heads).transpose(0, 2, 1, 3)
    return parts @ parts.transpose(0, 1, 3, 2) / math.sqrt(a * d / heads)


MINILMV2_BASE = {"relation_heads": 2}  # the default 12 divides neither tiny width
MINILMV2_CASES = {"w_relation": (0.5, MINILMV2_BASE), "ce_weight": (0.3, MINILMV2_BASE), "kd_weight": (0.7, MINILMV2_BASE),
                  "temperature": (2.0, {**MINILMV2_BASE, "kd_weight": 0.5}), "relation_heads": (4, {}),
                  "teacher_layer": (1, MINILMV2_BASE), "student_layer": (0, MINILMV2_BASE)}


@pytest.mark.parametrize("option, params", vary(MINILMV2_CASES)[1:])
def test_minilmv2_options(option: str, params: dict[str, Any]) -> None:
    student, teacher = tiny(2, 8, 4, seed=3), tiny(3, 16, 2, seed=4)
    method = MiniLMv2(MiniLMv2Params(**params), Problem("classification", 3))
    b = text_batch()
    s_out, t_out = student(b.inputs, need=method.student_needs), teacher(b.inputs, need=method.teacher_needs)
    loss, _ = method.loss(s_out, t_out, b, None)  # type: ignore[arg-type]
    p = settings(MiniLMv2Params, params)
    i, j, r, mask = p["student_layer"], p["teacher_layer"], p["relation_heads"], b.inputs["attention_mask"].numpy()
    relation = sum(np_relation_kl(resplit(getattr(s_out, n)[i].detach().numpy(), r), resplit(getattr(t_out, n)[j].detach().numpy(), r), mask)
                   for n in ("queries", "keys", "values"))
    c, k = np_ce_kd(s_out.logits.detach().numpy(), t_out.logits.detach().numpy(), b.labels.numpy(), p["temperature"])
    assert loss.item() == pytest.approx(p["w_relation"] * relation + p["ce_weight"] * c + p["kd_weight"] * k, rel=1e-9)


# ------------------------------------------------------------------ the language-model methods


def softmax_t(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(logits.double() / temperature, -1)


@pytest.mark.parametrize("cls", [SkewKL, SkewReverseKL])
def test_skew_temperature_divides_both_sides(cls: Any) -> None:
    method, ctx, batch = lm_setup(cls, alpha=0.3, temperature=2.0)
    loss, _ = method.loss(ctx.student(batch.inputs), ctx.teacher_forward(batch, method.teacher_needs), batch, ctx)
    ls = softmax_t(ctx.student(batch.inputs).logits, 2.0).exp()
    lt = softmax_t(ctx.teacher(batch.inputs).logits, 2.0).exp()
    a, b = (lt, ls) if cls is SkewKL else (ls, lt)  # KL(a || 0.3 a + 0.7 b)
    want = by_hand(lambda x, i: kl(a[x, i].log(), (0.3 * a[x, i] + 0.7 * b[x, i]).log()), batch.inputs["response_mask"])
    assert loss.item() == pytest.approx(want, rel=1e-10)


def topk_probs(teacher_log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher's distribution renormalised over its k most likely tokens (0 elsewhere), written out."""
    top, idx = torch.sort(teacher_log_probs, dim=-1, descending=True, stable=True)
    p = torch.zeros_like(teacher_log_probs)
    return p.scatter(-1, idx[..., :k], top[..., :k].exp() / top[..., :k].exp().sum(-1, keepdim=True))


@pytest.mark.parametrize("cls", [SkewKL, SkewReverseKL])
def test_skew_teacher_topk_renormalises_over_k(cls: Any) -> None:
    method, ctx, batch = lm_setup(cls, alpha=0.3, teacher_topk=3)
    loss, _ = method.loss(ctx.student(batch.inputs), ctx.teacher_forward(batch, method.teacher_needs), batch, ctx)
    ps, pt = raw(ctx.student, batch.inputs).exp(), topk_probs(raw(ctx.teacher, batch.inputs), 3)

    def term(x: int, i: int) -> float:
        a, b = (pt[x, i], ps[x, i]) if cls is SkewKL else (ps[x, i], pt[x, i])
        m = 0.3 * a + 0.7 * b
        keep = a > 0  # 0 log 0 = 0 outside the teacher's top k
        return float((a[keep] * (a[keep].log() - m[keep].log())).sum())

    assert loss.item() == pytest.approx(by_hand(term, batch.inputs["response_mask"]), rel=1e-6)  # the cache is float32


def test_rkl_samples_at_its_temperature_and_compares_untempered_distributions() -> None:
    method, ctx, batch = lm_setup(ReverseKLOnPolicy, temperature=0.6, max_new_tokens=5)
    g = torch.Generator().manual_seed(0)
    g.set_state(ctx.generator("rkl-samples").get_state())
    expected = decode(ctx.student.lm, batch.inputs["prompt_ids"], batch.inputs["prompt_mask"], 5, 2, 0, greedy=False, temperature=0.6, generator=g)
    g1 = torch.Generator().manual_seed(0)
    g1.set_state(ctx.generator("rkl-samples").get_state())
    at_one = decode(ctx.student.lm, batch.inputs["prompt_ids"], batch.inputs["prompt_mask"], 5, 2, 0, greedy=False, temperature=1.0, generator=g1)
    assert not torch.equal(expected.tokens, at_one.tokens)  # the temperature changes what is sampled here
    values = method.train_step(ctx, batch)
    sampled = with_response(batch.inputs, expected.tokens, expected.mask)
    ls, lt = raw(ctx.student, sampled), raw(ctx.teacher, sampled)
    assert values["rkl"].item() == pytest.approx(by_hand(lambda b, i: kl(ls[b, i], lt[b, i]), sampled["response_mask"]), rel=1e-10)


def taid_by_hand(params: dict[str, Any], losses: list[float], total: int) -> list[float]:
    """t at each step from the losses of the steps before it (Shing et al. 2025, Alg. 1), written out."""
    p = {"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99, "adaptive": True, **params}
    t, m, ts = p["t_start"], 0.0, [p["t_start"]]
    for k in range(1, len(losses)):
        if k >= 2:  # the first step only records its loss
            change = (losses[k - 2] - losses[k - 1]) / losses[k - 2]
            m = p["beta"] * m + (1 - p["beta"]) * change
            linear = p["t_start"] + (p["t_end"] - p["t_start"]) * (k - 1) / total
            up = t + p["alpha"] / (1 + math.exp(-m)) * (1 - t)
            t = min(p["t_end"], max(linear, up) if p["adaptive"] else linear)
        ts.append(t)
    return ts


TAID_BASE = {"alpha": 0.3, "beta": 0.5}  # a visible step up: the defaults move t by about 1e-4 a step
TAID_CASES = {"t_start": (0.2, TAID_BASE), "t_end": (0.5, TAID_BASE), "alpha": (0.6, {"beta": 0.5}), "beta": (0.0, {"alpha": 0.3}),
              "adaptive": (False, TAID_BASE)}


@pytest.mark.parametrize("option, params", [pytest.param("base", TAID_BASE, id="base")] +
                         [pytest.param(o, {**base, o: v}, id=o) for o, (v, base) in TAID_CASES.items()])
def test_taid_schedule_options(option: str, params: dict[str, Any]) -> None:
    method, ctx, _ = lm_setup(TAID, **params)
    batches = list(ctx.train_batches(3))  # two batches of 3: their losses differ, so the momentum moves
    order = [batches[0], batches[1], batches[0], batches[1], batches[0]]
    losses, ts, targets = [], [], []
    for step, b in enumerate(order):
        ctx.step = step
        loss, parts = method.loss(ctx.student(b.inputs), ctx.teacher_forward(b, method.teacher_needs), b, ctx)
        t = parts["t"].item()
        zs, zt = ctx.student(b.inputs).logits.detach(), ctx.teacher(b.inputs).logits.detach()
        target = torch.log_softmax((1 - t) * zs + t * zt, -1)
        targets.append(by_hand(lambda x, i: kl(target[x, i], torch.log_softmax(zs, -1)[x, i]), b.inputs["response_mask"]))
        losses.append(loss.item())
        ts.append(t)
    assert losses == pytest.approx(targets, rel=1e-10)
    want = taid_by_hand(params, losses, ctx.total_steps)
    assert ts == pytest.approx(want, abs=1e-12)
    if option != "base":
        assert want != pytest.approx(taid_by_hand({k: v for k, v in params.items() if k != option}, losses, ctx.total_steps), abs=1e-9)


def test_taid_teacher_topk_interpolates_towards_the_truncated_teacher() -> None:
    method, ctx, batch = lm_setup(TAID, teacher_topk=3, t_start=0.5)
    loss, parts = method.loss(ctx.student(batch.inputs), ctx.teacher_forward(batch, method.teacher_needs), batch, ctx)
    zs = ctx.student(batch.inputs).logits.detach().double()
    log_pt = topk_probs(raw(ctx.teacher, batch.inputs), 3).log()  # -inf outside the top 3: so is the target
    target = torch.log_softmax(0.5 * zs + 0.5 * log_pt, -1)
    want = by_hand(lambda x, i: float((target[x, i].exp() * (target[x, i] - torch.log_softmax(zs, -1)[x, i])).nan_to_num().sum()),
                   batch.inputs["response_mask"])
    assert parts["t"].item() == 0.5 and loss.item() == pytest.approx(want, rel=1e-6)  # the cache is float32
