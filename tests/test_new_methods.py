"""The methods published since 2021 (DIST, logit standardisation, MLKD, CTKD, ReviewKD)
against hand computations on tiny tensors, written independently of the plugins in numpy
after the authors' code (file and line cited at each reference), plus a few real steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kdbench.api import EMBEDDING, FEATURES, LOGITS, PREACT_FEATURES, Batch, IncompatibleModelError, ModelOutput, Problem, SetupInfo
from kdbench.losses import soften, softened_kl, standardize_logits
from kdbench_plugins.methods.ctkd import CTKD, CTKDParams, GlobalTemperature, curriculum_lambda
from kdbench_plugins.methods.dist import DIST, DISTParams, dist_parts
from kdbench_plugins.methods.dkd import DKD, DKDParams, dkd_parts
from kdbench_plugins.methods.kd import KD, KDParams
from kdbench_plugins.methods.mlkd import MLKD, MLKDParams, low_confidence_fractions
from kdbench_plugins.methods.reviewkd import ReviewKD, ReviewKDParams, hcl
from kdbench_plugins.models.cifar import CifarFactory, CifarOptions
from support.helpers_models import image_batch, make_ctx, tiny_bert, tiny_cnn

C3 = Problem("classification", 3)
S = np.array([[1.0, -0.5, 2.0], [0.3, 0.1, -1.2], [2.5, 0.0, 0.4], [-0.7, 1.1, 0.9]])
T = np.array([[2.0, 0.5, -1.0], [0.0, 1.5, -0.3], [1.0, 1.2, 3.0], [0.2, -0.4, 0.6]])
Y = np.array([2, 0, 2, 1])


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(softmax(z)[np.arange(len(y)), y]).mean())


def kl(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean."""
    ps, pt = softmax(s / temp), softmax(t / temp)
    return float((pt * (np.log(pt) - np.log(ps))).sum(1).mean() * temp**2)


def zscore(z: np.ndarray) -> np.ndarray:
    """sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py lines 7-10: torch's std is unbiased."""
    return (z - z.mean(1, keepdims=True)) / (1e-7 + z.std(1, ddof=1, keepdims=True))


def batch(labels=Y) -> Batch:
    return Batch(inputs={}, labels=torch.tensor(labels), index=torch.arange(len(labels)))


def out(z: np.ndarray) -> ModelOutput:
    return ModelOutput(logits=t64(z).requires_grad_())


# ------------------------------------------------------------------ logit standardisation


def test_standardized_logits_have_zero_mean_and_unit_unbiased_std() -> None:
    z = standardize_logits(t64(S))
    np.testing.assert_allclose(z.numpy(), zscore(S), rtol=1e-12)
    np.testing.assert_allclose(z.mean(1).numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(1).numpy(), 1 / (1 + 1e-7 / S.std(1, ddof=1)), rtol=1e-12)
    assert torch.equal(soften(t64(S), 2.0), t64(S) / 2.0)  # off: exactly z / T


def test_kd_with_logit_standardization_against_the_authors_formula() -> None:
    # KD.py lines 12-19: normalize both sides, then T^2 * KL at T
    method = KD(KDParams(alpha=0.9, temperature=2.0, logit_standardization=True), C3)
    loss, parts = method.loss(out(S), out(T), batch(), None)  # type: ignore[arg-type]
    soft = kl(zscore(S), zscore(T), 2.0)
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-10)
    assert loss.item() == pytest.approx(0.9 * soft + 0.1 * ce(S, Y), rel=1e-10)
    assert soft != pytest.approx(kl(S, T, 2.0), rel=1e-3)  # the option changes the loss
    # and makes it blind to each example's shift and scale of the teacher's logits
    shifted = T * np.array([[3.0], [0.5], [2.0], [7.0]]) + np.array([[4.0], [-1.0], [0.0], [2.0]])
    assert method.loss(out(S), out(shifted), batch(), None)[1]["soft"].item() == pytest.approx(soft, rel=1e-6)  # type: ignore[arg-type]


def test_dkd_with_logit_standardization_is_dkd_on_zscored_logits() -> None:
    # logit-standardization-KD mdistiller/distillers/DKD.py lines 12-14: normalize, then DKD as before
    tckd, nckd = dkd_parts(t64(S), t64(T), torch.tensor(Y), 2.0, standardize=True)
    ref = dkd_parts(t64(zscore(S)), t64(zscore(T)), torch.tensor(Y), 2.0)
    torch.testing.assert_close((tckd, nckd), ref, rtol=1e-6, atol=0)
    method = DKD(DKDParams(temperature=2.0, logit_standardization=True, warmup_fraction=0.0), C3)
    from support.helpers_models import LinearNet
    ctx = make_ctx(LinearNet(1, 1), None, torch.optim.SGD(LinearNet(1, 1).parameters(), lr=0.1))
    _, parts = method.loss(out(S), out(T), batch(), ctx)
    assert parts["nckd"].item() == pytest.approx(ref[1].item(), rel=1e-6)


def test_the_option_keeps_stored_hashes_and_refuses_regression() -> None:
    assert "logit_standardization" not in KDParams().model_dump(mode="json")  # added(): old runs keep their hash
    assert "logit_standardization" not in DKDParams().model_dump(mode="json")
    assert KDParams(logit_standardization=True).model_dump(mode="json")["logit_standardization"] is True
    with pytest.raises(IncompatibleModelError, match="logit_standardization.*regression"):
        KD(KDParams(logit_standardization=True), Problem("regression", 1)).check_models(tiny_bert(problem=Problem("regression", 1)), None)
    # two classes z-score to +-1/sqrt(2) whatever the margin: the teacher's soft targets say nothing more than the label
    two = standardize_logits(t64(np.array([[0.1, 0.2], [5.0, -3.0]])))
    np.testing.assert_allclose(two.abs().numpy(), 2**-0.5, rtol=1e-5)
    for cls, params in ((KD, KDParams), (DKD, DKDParams), (DIST, DISTParams), (MLKD, MLKDParams), (CTKD, CTKDParams)):
        with pytest.raises(IncompatibleModelError, match="at least 3 classes"):
            cls(params(logit_standardization=True), Problem("classification", 2)).check_models(tiny_cnn(), tiny_cnn())
        cls(params(logit_standardization=True), C3).check_models(tiny_cnn(problem=C3), tiny_cnn(problem=C3))


# ------------------------------------------------------------------ DIST


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])


def test_dist_against_pearson_correlations_of_softened_probabilities() -> None:
    # hunto/image_classification_sota lib/models/losses/dist_kd.py lines 28-34:
    # tau^2 * (1 - mean row correlation), the same over columns; kd_loss.py lines 69-71, dist_cifar.yaml weight 2
    ys, yt = softmax(S / 4.0), softmax(T / 4.0)
    inter = 16 * (1 - pearson(ys, yt).mean())
    intra = 16 * (1 - pearson(ys.T, yt.T).mean())
    got = dist_parts(t64(S), t64(T), 4.0)
    assert (got[0].item(), got[1].item()) == (pytest.approx(inter, rel=1e-7), pytest.approx(intra, rel=1e-7))
    loss, parts = DIST(DISTParams(), C3).loss(out(S), out(T), batch(), None)  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(ce(S, Y) + 2 * inter + 2 * intra, rel=1e-7)
    # identical predictions: no relation loss, up to the 1e-8 in the cosine's denominator
    # (the centred probabilities at T 4 have norms near 0.05, so it weighs about 1e-6 here)
    same = dist_parts(t64(T), t64(T), 4.0)
    assert 0 <= same[0].item() < 1e-4 and 0 <= same[1].item() < 1e-4


def test_dist_with_standardization_and_its_gradient_by_finite_differences() -> None:
    s = t64(S).requires_grad_()
    inter, intra = dist_parts(s, t64(T), 2.0, standardize=True)
    ys, yt = softmax(zscore(S) / 2.0), softmax(zscore(T) / 2.0)
    assert inter.item() == pytest.approx(4 * (1 - pearson(ys, yt).mean()), rel=1e-6)
    assert torch.autograd.gradcheck(lambda x: sum(dist_parts(x, t64(T), 2.0)), (s,))


# ------------------------------------------------------------------ MLKD


def test_mlkd_against_the_authors_weak_view_terms() -> None:
    # Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py: kd/cc/bc lines 13-47,
    # masks lines 98-111 (np.percentile 50, le), each reduced term times the mask, then .mean()
    temps = [4.0, 3.0, 5.0, 2.0, 6.0]
    pt = softmax(T)
    conf, mass = pt.max(1), pt.sum(0)
    mask, cmask = conf <= np.percentile(conf, 50), mass <= np.percentile(mass, 50)

    def bc(temp):
        a, b = softmax(S / temp), softmax(T / temp)
        return ((b @ b.T - a @ a.T) ** 2).sum() / len(S)

    def cc(temp):
        a, b = softmax(S / temp), softmax(T / temp)
        return ((b.T @ b - a.T @ a) ** 2).sum() / S.shape[1]

    ref = 0.1 * ce(S, Y) + 0.9 * sum((kl(S, T, t) * mask).mean() + (cc(t) * cmask).mean() + (bc(t) * mask).mean() for t in temps)
    loss, parts = MLKD(MLKDParams(), C3).loss(out(S), out(T), batch(), None)  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(ref, rel=1e-7)
    assert parts["low_conf_fraction"].item() == 0.5  # 4 distinct confidences: the two at or below the median


def test_mlkd_fractions_by_hand_and_empty_temperatures_refused() -> None:
    f, f_c = low_confidence_fractions(t64(T[:3]))  # 3 examples: the median is the middle one, 2 of 3 at or below
    assert f.item() == pytest.approx(2 / 3) and f_c.item() == pytest.approx(2 / 3)
    with pytest.raises(ValidationError, match="temperatures"):
        MLKDParams(temperatures=[])
    with pytest.raises(ValidationError, match="temperatures"):
        MLKDParams(temperatures=[2.0, 0.0])


# ------------------------------------------------------------------ CTKD


def test_ctkd_curriculum_is_the_authors_cosine_decay_read_per_step() -> None:
    # zhengli97/CTKD train_student.py lines 195-202, decay_max 0, decay_min -1, decay_loops 10 (epochs from 1)
    def official(epoch: int) -> float:
        i = min(max(epoch, 0), 10)
        return (math.cos(i * math.pi / 10) + 1.0) * 0.5 * (0 - (-1)) + (-1)

    for epoch in (1, 3, 5, 10, 11, 200):  # one step per epoch: W = 10 steps of 240
        assert -curriculum_lambda(epoch - 1, 240, 10 / 240, 1.0) == pytest.approx(official(epoch), abs=1e-12)
    assert curriculum_lambda(0, 10, 1e-6, 1.0) == pytest.approx(1.0)  # a curriculum shorter than a step is over at once
    with pytest.raises(ValidationError, match="curriculum_fraction"):
        CTKDParams(curriculum_fraction=0)


def test_ctkd_loss_and_the_reversed_temperature_gradient() -> None:
    temp_module = GlobalTemperature().double()
    method = CTKD(CTKDParams(), C3)
    ctx = make_ctx(tiny_cnn(), None, torch.optim.SGD(temp_module.parameters(), lr=0.1), extra=temp_module, total_steps=240, step=4)
    s = out(S)
    loss, parts = method.loss(s, out(T), batch(), ctx)
    t0 = 1 + 20 / (1 + math.exp(-1.0))  # models/temp_global.py line 13 (w = 1), helper/loops.py line 134
    assert parts["temperature"].item() == pytest.approx(t0, rel=1e-12)
    assert loss.item() == pytest.approx(0.1 * ce(S, Y) + 0.9 * kl(S, T, t0), rel=1e-9)
    loss.backward()
    lam = curriculum_lambda(4, 240, 10 / 240, 1.0)
    assert 0 < lam < 1 and parts["reversal"].item() == pytest.approx(lam)

    def plain(w: float) -> float:  # the same loss as a function of w, without the reversal
        return 0.9 * kl(S, T, 1 + 20 / (1 + math.exp(-w)))

    fd = (plain(1 + 1e-6) - plain(1 - 1e-6)) / 2e-6
    assert temp_module.w.grad.item() == pytest.approx(-lam * fd, rel=1e-5)  # ascends the KD loss, scaled by lambda
    assert s.logits.grad is not None  # the student still descends it


# ------------------------------------------------------------------ ReviewKD


def test_hcl_by_hand() -> None:
    # mdistiller/distillers/ReviewKD.py lines 11-28: on a 4x4 map level 4 is skipped (4 >= h), 2 and 1 weigh 1/2, 1/4
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    a, b = fs.numpy(), ft.numpy()
    pool2 = lambda x: x.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # noqa: E731
    level = (((a - b) ** 2).mean() + 0.5 * ((pool2(a) - pool2(b)) ** 2).mean()
             + 0.25 * ((a.mean((2, 3)) - b.mean((2, 3))) ** 2).mean()) / 1.75
    one = ((a.mean((2, 3)) - b.mean((2, 3))) ** 2).mean()  # a 1x1 level: plain MSE
    got = hcl([fs, fs.mean((2, 3), keepdim=True)], [ft, ft.mean((2, 3), keepdim=True)])
    assert got.item() == pytest.approx(level + one, rel=1e-12)


def cifar(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return CifarFactory().build(CifarOptions(arch=arch), Problem("classification", 5))


def test_reviewkd_fuses_student_stages_to_the_teachers_shapes_and_trains() -> None:
    student, teacher = cifar("resnet8"), cifar("resnet14")
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    b = Batch(inputs={"pixel_values": pixels}, labels=torch.tensor([0, 1, 2, 3]), index=torch.arange(4))
    method = ReviewKD(ReviewKDParams(warmup_fraction=0.0), Problem("classification", 5))
    method.check_models(student, teacher)
    fusion = method.extra_modules(student, teacher, SetupInfo(sample=b, train_size=4, device=torch.device("cpu")))
    with torch.no_grad():
        t_out = teacher.eval()(b.inputs, need=method.teacher_needs)
    s_out = student(b.inputs, need=method.student_needs)
    fused = fusion([*s_out.features[1:], s_out.embedding[:, :, None, None]])
    targets = [*t_out.preact_features[1:], t_out.embedding[:, :, None, None]]
    assert [f.shape for f in fused] == [t.shape for t in targets]
    opt = torch.optim.SGD([*student.parameters(), *fusion.parameters()], lr=0.05)
    ctx = make_ctx(student, teacher, opt, extra=fusion, problem=Problem("classification", 5))
    loss, parts = method.loss(s_out, t_out, b, ctx)
    assert loss.item() == pytest.approx(parts["ce"].item() + hcl(fused, targets).item(), rel=1e-5)
    values = [method.train_step(ctx, b)["review"].item() for _ in range(3)]
    assert values[-1] < values[0]  # the fusion modules learn to match the teacher on this batch


def test_reviewkd_refuses_models_without_stages() -> None:
    method = ReviewKD(ReviewKDParams(), Problem("classification", 2))
    with pytest.raises(IncompatibleModelError, match="family 'transformer'|needs the student to expose"):
        method.check_models(tiny_bert(), tiny_bert())
    with pytest.raises(IncompatibleModelError, match="at least one stage after the stem"):
        method.extra_modules(tiny_cnn((3,)), tiny_cnn((3, 4)), SetupInfo(sample=image_batch(), train_size=4, device=torch.device("cpu")))
    with pytest.raises(IncompatibleModelError, match="student has 1 stages and the teacher 2"):
        method.extra_modules(tiny_cnn((3, 4)), tiny_cnn((3, 4, 5)), SetupInfo(sample=image_batch(size=8), train_size=4, device=torch.device("cpu")))


def test_softened_kl_takes_a_tensor_temperature() -> None:
    temp = torch.tensor([3.0], dtype=torch.float64)
    assert softened_kl(t64(S), t64(T), temp).reshape(()).item() == pytest.approx(kl(S, T, 3.0), rel=1e-12)


def test_every_new_method_declares_what_it_reads() -> None:
    assert ReviewKD.teacher_needs == frozenset({LOGITS, PREACT_FEATURES, EMBEDDING}) and FEATURES in ReviewKD.student_needs
    assert all(m.is_loss_based() for m in (DIST, MLKD, CTKD, ReviewKD))
