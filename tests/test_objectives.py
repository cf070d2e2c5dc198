"""The Objective plugin kind: registration and listing, refusals at validation (an
unknown objective, a task whose label layout does not fit, labels that do not fit), the
masked core losses against per-position hand computations, streaming evaluation against
the whole-split computation, and selection of a lower-is-better metric."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.api import (Batch, DataError, KDModel, ModelFactory, ModelOutput, Problem, Task, class_cross_entropy, task_loss, value_mse)
from kdbench.cli import main
from kdbench.hookspecs import hookimpl
from kdbench.losses import probability_mse, soft_cross_entropy, soft_loss, softened_kl
from kdbench.metrics import accuracy
from kdbench.registry import Registry, UnknownNameError, get_registry, make_plugin_manager
from kdbench.spec import SuiteError, build_suite
from kdbench.train.evaluation import evaluate_split, predict, select_metrics
from kdbench_plugins.methods.kd import KD, KDParams
from support.helpers_models import LinearNet
from support.suites import smoke_data


def test_builtin_objectives_are_plugins_and_listed(capsys) -> None:
    reg = get_registry()
    assert {"classification", "regression"} <= set(reg.names("objectives"))
    assert reg.entries["objectives"]["regression"].plugin == "builtin-objective-regression"
    assert main(["list", "objectives"]) == 0
    out = capsys.readouterr().out
    assert "classification" in out and "regression" in out
    with pytest.raises(UnknownNameError, match="Did you mean 'regression'"):
        reg.objective("regresion")


def _registry_with(task_cls: type[Task]) -> Registry:
    plugin = types.SimpleNamespace(kdbench_tasks=hookimpl(lambda: [task_cls]))
    pm, broken = make_plugin_manager([plugin])
    return Registry(pm, broken)


def _task(objective: str, problem: Problem) -> type[Task]:
    base = get_registry().task("movie-sentiment")

    class Odd(base):  # type: ignore[misc, valid-type]
        name = "odd-task"

        @property
        def objective(self) -> str:
            return objective

        @property
        def problem(self) -> Problem:
            return problem

    return Odd


def test_an_unknown_objective_is_refused_at_validation_with_a_suggestion() -> None:
    reg = _registry_with(_task("clasification", Problem("classification", 2)))
    with pytest.raises(SuiteError) as err:
        build_suite(smoke_data(tasks=[{"name": "odd-task"}]), registry=reg)
    msg = str(err.value)
    assert "tasks[0]: task 'odd-task' names its objective 'clasification'" in msg and "Did you mean 'classification'" in msg


@pytest.mark.parametrize("objective,problem,why", [
    ("classification", Problem("classification", 1), "has 1 class(es); objective 'classification' needs at least 2"),
    ("regression", Problem("regression", 3), "declares 3 outputs; objective 'regression' predicts one value per example"),
])
def test_a_task_whose_layout_does_not_fit_its_objective_is_refused(objective: str, problem: Problem, why: str) -> None:
    reg = _registry_with(_task(objective, problem))
    with pytest.raises(SuiteError, match=f"tasks\\[0\\]: task 'odd-task' {why}".replace("(", "\\(").replace(")", "\\)")):
        build_suite(smoke_data(tasks=[{"name": "odd-task"}]), registry=reg)


def _objective(name: str, problem: Problem):
    return get_registry().objective(name)(problem=problem)


@pytest.mark.parametrize("name,problem,labels,match", [
    ("classification", Problem("classification", 3), np.array([0.0, 1.5, 2.0]), r"labels \[1.5\] that are not class ids"),
    ("classification", Problem("classification", 3), np.array([0, 3, -1]), r"labels \[-1, 3\] outside 0..2"),
    ("classification", Problem("classification", 3), np.array(["a", "b"]), r"not class ids"),
    ("regression", Problem("regression", 1), np.array([0.5, np.nan]), "non-finite regression targets"),
    ("regression", Problem("regression", 1), np.array(["x", "y"]), "not numbers"),
])
def test_labels_that_do_not_fit_the_objective_are_a_data_error(name: str, problem: Problem, labels: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        _objective(name, problem).check_labels("train", labels)


def test_integral_float_class_ids_are_accepted() -> None:
    _objective("classification", Problem("classification", 3)).check_labels("train", np.array([0.0, 2.0]))


# ----------------------------------------------------------------- masked losses

B, L, C = 2, 3, 4
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])  # 3 kept positions of 6


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(B, L, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kept() -> list[tuple[int, int]]:
    return [(b, i) for b in range(B) for i in range(L) if MASK[b, i]]


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_cross_entropy_reduces_over_kept_positions_only() -> None:
    z, y = _logits(0), torch.tensor([[0, 3, 1], [2, 2, 0]])
    by_hand = [-math.log(_softmax(z[b, i].tolist(), 1.0)[int(y[b, i])]) for b, i in _kept()]
    assert class_cross_entropy(z, y, MASK).item() == pytest.approx(sum(by_hand) / 3, rel=1e-12)
    garbage = z.clone()
    garbage[0, 2], garbage[1, 1:] = 1e6, -1e6  # masked positions never reach the loss
    assert class_cross_entropy(garbage, y, MASK).item() == pytest.approx(sum(by_hand) / 3, rel=1e-12)
    assert task_loss(z, y, Problem("classification", C), MASK).item() == pytest.approx(sum(by_hand) / 3, rel=1e-12)
    unmasked = [-math.log(_softmax(z[b, i].tolist(), 1.0)[int(y[b, i])]) for b in range(B) for i in range(L)]
    assert class_cross_entropy(z, y).item() == pytest.approx(sum(unmasked) / 6, rel=1e-12)


def test_soft_terms_reduce_over_kept_positions_only() -> None:
    s, t, temp = _logits(1), _logits(2), 2.0
    kl, mse, ce = [], [], []
    for b, i in _kept():
        ps, pt = _softmax(s[b, i].tolist(), temp), _softmax(t[b, i].tolist(), temp)
        kl.append(sum(q * math.log(q / p) for p, q in zip(ps, pt)))
        mse.append(sum((p - q) ** 2 for p, q in zip(ps, pt)))
        ce.append(-sum(q * math.log(p) for p, q in zip(ps, pt)))
    assert softened_kl(s, t, temp, mask=MASK).item() == pytest.approx(temp**2 * sum(kl) / 3, rel=1e-12)
    assert softened_kl(s, t, temp, "mean", mask=MASK).item() == pytest.approx(temp**2 * sum(kl) / (3 * C), rel=1e-12)
    assert probability_mse(s, t, temp, mask=MASK).item() == pytest.approx(temp**2 * sum(mse) / (3 * C), rel=1e-12)
    assert soft_cross_entropy(s, t, temp, "sum", mask=MASK).item() == pytest.approx(sum(ce) / 3, rel=1e-12)
    assert soft_loss(s, t, temp, Problem("classification", C), mask=MASK).item() == pytest.approx(temp**2 * sum(kl) / 3, rel=1e-12)


def test_value_losses_reduce_over_kept_positions_only() -> None:
    s, t = _logits(3)[..., :1], _logits(4)[..., :1]
    y = _logits(5)[..., 0]
    kept = _kept()
    assert value_mse(s, y, MASK).item() == pytest.approx(sum((s[b, i, 0] - y[b, i]).item() ** 2 for b, i in kept) / 3, rel=1e-12)
    assert soft_loss(s, t, 9.0, Problem("regression", 1), mask=MASK).item() == pytest.approx(
        sum((s[b, i, 0] - t[b, i, 0]).item() ** 2 for b, i in kept) / 3, rel=1e-12)


def test_a_method_built_with_the_objective_computes_what_it_computes_with_a_bare_problem() -> None:
    s, t = ModelOutput(logits=_logits(6)[:, 0]), ModelOutput(logits=_logits(7)[:, 0])
    batch = Batch(inputs={}, labels=torch.tensor([1, 3]), index=torch.arange(2))
    problem = Problem("classification", C)
    by_problem = KD(KDParams(alpha=0.3, temperature=2.0), problem).loss(s, t, batch, None)  # type: ignore[arg-type]
    by_objective = KD(KDParams(alpha=0.3, temperature=2.0), _objective("classification", problem)).loss(s, t, batch, None)  # type: ignore[arg-type]
    assert by_objective[0].item() == by_problem[0].item()
    assert {k: v.item() for k, v in by_objective[1].items()} == {k: v.item() for k, v in by_problem[1].items()}


# ----------------------------------------------------------------- streaming evaluation


class _Factory(ModelFactory):
    name, description, modality = "plain", "x -> logits", "test"

    def build(self, options, problem) -> KDModel:  # pragma: no cover - not used
        raise NotImplementedError


class _Acc(Task):
    name, description, modality = "acc", "", "test"

    @property
    def problem(self) -> Problem:
        return Problem("classification", 3)

    @property
    def main_metric(self) -> str:
        return "accuracy"

    def load(self, cache_dir: str) -> dict:  # pragma: no cover - not used
        return {}

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        assert predictions.shape == labels.shape and predictions.dtype.kind == "i"  # class ids, not logits
        return {"accuracy": accuracy(predictions, labels)}


def test_streaming_evaluation_scores_exactly_like_the_whole_split() -> None:
    torch.manual_seed(0)
    model = LinearNet(5, 3)
    x = torch.randn(23, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (23,), generator=torch.Generator().manual_seed(2))
    objective = get_registry().objective_for(_Acc(_Acc.Options()))
    logits = predict(model, _Factory(), {"x": x}, 23, torch.device("cpu"))
    whole = accuracy(logits.argmax(-1).numpy(), labels.numpy())
    assert 0 < whole < 1
    for batch_size in (1, 4, 23, 50):  # 23 = 5 * 4 + 3: a last partial batch
        got = evaluate_split(model, _Factory(), {"x": x}, labels, objective, batch_size, torch.device("cpu"))
        assert got == {"accuracy": whole}


def test_selection_on_validation_takes_the_lowest_of_a_lower_is_better_metric() -> None:
    info = {"mse": _objective("regression", Problem("regression", 1)).metric_info("mse")}
    assert not info["mse"].higher_is_better and info["mse"].scale == 1.0
    history = [{"step": s, "validation": {"mse": v}, "test": {"mse": v}} for s, v in ((10, 0.5), (20, 0.2), (30, 0.2), (40, 0.9))]
    chosen = select_metrics(history, "validation", "mse", info)
    assert chosen["step"] == 20  # the lowest, earliest on ties
    assert chosen["metric_info"] == {"mse": {"higher_is_better": False, "scale": 1.0, "bounds": [0.0, None]}}
    assert select_metrics(history, "validation", "mse")["step"] == 40  # without info: higher is better, as stores before it


def test_the_built_in_objectives_read_metrics_by_name() -> None:
    objective = get_registry().objective_for(_Acc(_Acc.Options()))
    assert objective.metric_info("accuracy").scale == 100.0 and objective.metric_info("accuracy").bounds == (0.0, 1.0)
    assert objective.metric_info("mcc").bounds == (-1.0, 1.0)
    assert not objective.metric_info("perplexity").higher_is_better


def test_kd_on_token_logits_averages_over_the_students_masked_positions() -> None:
    s, t, temp = _logits(8), _logits(9), 2.0
    y = torch.tensor([[0, 3, 1], [2, 2, 0]])
    problem = Problem("classification", C)
    loss, parts = KD(KDParams(alpha=0.25, temperature=temp), problem).loss(  # type: ignore[arg-type]
        ModelOutput(logits=s, mask=MASK), ModelOutput(logits=t), Batch(inputs={}, labels=y, index=torch.arange(B)), None)
    kl = sum(sum(q * math.log(q / p) for p, q in zip(_softmax(s[b, i].tolist(), temp), _softmax(t[b, i].tolist(), temp))) for b, i in _kept())
    ce = sum(-math.log(_softmax(s[b, i].tolist(), 1.0)[int(y[b, i])]) for b, i in _kept())
    assert parts["soft"].item() == pytest.approx(temp**2 * kl / 3, rel=1e-12)
    assert parts["hard"].item() == pytest.approx(ce / 3, rel=1e-12)
    assert loss.item() == pytest.approx(0.25 * temp**2 * kl / 3 + 0.75 * ce / 3, rel=1e-12)


def test_a_task_may_override_its_objectives_reading_of_a_metric() -> None:
    from kdbench.api import MetricInfo

    class Calibrated(_Acc):
        def metric_info(self, metric: str) -> MetricInfo | None:
            return MetricInfo(False, 10.0, (0.0, 1.0)) if metric == "accuracy" else None  # made up: the task's word wins

    objective = get_registry().objective_for(Calibrated(Calibrated.Options()))
    assert objective.metric_info("accuracy") == MetricInfo(False, 10.0, (0.0, 1.0))
    assert objective.metric_info("f1") == MetricInfo(True, 100.0, (0.0, 1.0))  # the objective's default for the rest
