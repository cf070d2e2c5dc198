"""Golden values: every built-in loss-based method's loss and parts, and the core loss
helpers, on fixed seeded tiny inputs (float64 outputs, hand-built ModelOutputs), recorded
before the Objective/mask refactor of issue 26. A refactor that changes what any of them
computes, on classification or regression, fails here. The literals were computed at
1607e8e (the commit before the refactor) with this same file's ``cases()``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdbench import losses as KL
from kdbench.api import Batch, ModelOutput, Problem, task_loss
from kdbench_plugins.methods.at import ATParams, AttentionTransfer
from kdbench_plugins.methods.crd import CRD, ContrastMemory, CRDParams
from kdbench_plugins.methods.dkd import DKD, DKDParams
from kdbench_plugins.methods.fitnet import FitNet, FitNetParams, HintRegressor
from kdbench_plugins.methods.kd import KD, KDParams
from kdbench_plugins.methods.none import NoDistillation
from kdbench_plugins.methods.pkd import PKD, PKDParams
from kdbench_plugins.methods.prokt import student_objective, teacher_objective
from kdbench_plugins.methods.tinybert import TinyBERT, TinyBERTParams
from tests.support.helpers_models import make_ctx

CLS, REG = Problem("classification", 3), Problem("regression", 1)
B, C, L, H, HEADS = 4, 3, 5, 6, 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def outputs(problem: Problem, seed: int, layers: int) -> ModelOutput:
    width = problem.num_labels if problem.kind == "classification" else 1
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, -2:] = 0
    att = tuple(randn(B, HEADS, L, L, seed=seed + 10 + i) * mask[:, None, None, :] for i in range(layers))
    return ModelOutput(logits=randn(B, width, seed=seed) * 2, hidden_states=tuple(randn(B, L, H, seed=seed + 20 + i) for i in range(layers + 1)),
                       attention_scores=att, attention_mask=mask, features=tuple(randn(B, 2 + i, 8 >> i, 8 >> i, seed=seed + 40 + i) for i in range(3)),
                       embedding=randn(B, H, seed=seed + 60))


def batch(problem: Problem) -> Batch:
    labels = torch.tensor([0, 2, 1, 2]) if problem.kind == "classification" else randn(B, seed=7)
    return Batch(inputs={}, labels=labels, index=torch.tensor([0, 3, 5, 7]))


def ctx(extra: nn.Module | None = None, problem: Problem = CLS, step: int = 3):
    return make_ctx(nn.Linear(1, 1), None, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), problem=problem,
                    extra=extra, total_steps=10, step=step)


def run(method, problem: Problem, extra: nn.Module | None = None, step: int = 3) -> dict[str, float]:
    s, t = outputs(problem, 1, 2), outputs(problem, 101, 4)
    loss, parts = method.loss(s, t, batch(problem), ctx(extra, problem, step))
    return {"loss": loss.item(), **{k: float(v) for k, v in parts.items()}}


def linear(d_in: int, d_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).double()


def cases() -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for tag, p in (("cls", CLS), ("reg", REG)):
        out[f"none/{tag}"] = run(NoDistillation(NoDistillation.Params(), p), p)
        out[f"kd/{tag}"] = run(KD(KDParams(alpha=0.6, temperature=3.0), p), p)
        out[f"kd-mse/{tag}"] = run(KD(KDParams(alpha=0.6, temperature=3.0, soft_loss="mse"), p), p)
        out[f"pkd/{tag}"] = run(PKD(PKDParams(), p), p)
        out[f"pkd-batchmean-last/{tag}"] = run(PKD(PKDParams(soft_reduction="batchmean", layer_map="last", layer_reduction="sum"), p), p)
        out[f"tinybert/{tag}"] = run(TinyBERT(TinyBERTParams(temperature=2.0), p), p, linear(H, H, 3))
        out[f"tinybert-labels-sum/{tag}"] = run(TinyBERT(TinyBERTParams(regression_pred="labels", soft_reduction="sum"), p), p, linear(H, H, 3))
        out[f"tinybert-stage1/{tag}"] = run(TinyBERT(TinyBERTParams(two_stage=True), p), p, linear(H, H, 3), step=2)
        out[f"at/{tag}"] = run(AttentionTransfer(ATParams(alpha=0.5), p), p)
        torch.manual_seed(5)
        reg = HintRegressor((B, 3, 4, 4), (B, 3, 4, 4)).double()
        out[f"fitnet/{tag}"] = run(FitNet(FitNetParams(alpha=0.5, hint_layer=1), p), p, reg)
        torch.manual_seed(6)
        mem = ContrastMemory(H, H, 4, 10, 0.07, 0.5).double()
        out[f"crd/{tag}"] = run(CRD(CRDParams(alpha=0.5, nce_k=5, feat_dim=4), p), p, mem)
    out["dkd/cls"] = run(DKD(DKDParams(), CLS), CLS)
    s, t, y = randn(B, C, seed=1) * 2, randn(B, C, seed=101) * 2, torch.tensor([0, 2, 1, 2])
    sr, tr, yr = randn(B, 1, seed=1), randn(B, 1, seed=101), randn(B, seed=7)
    out["losses"] = {
        "softened_kl": KL.softened_kl(s, t, 3.0).item(), "softened_kl_mean": KL.softened_kl(s, t, 3.0, "mean").item(),
        "probability_mse": KL.probability_mse(s, t, 3.0).item(), "soft_ce_mean": KL.soft_cross_entropy(s, t, 2.0).item(),
        "soft_ce_sum": KL.soft_cross_entropy(s, t, 2.0, "sum").item(), "soft_loss_cls": KL.soft_loss(s, t, 3.0, CLS).item(),
        "soft_loss_cls_mse": KL.soft_loss(s, t, 3.0, CLS, kind="mse").item(), "soft_loss_reg": KL.soft_loss(sr, tr, 3.0, REG).item(),
        "task_loss_cls": task_loss(s, y, CLS).item(), "task_loss_reg": task_loss(sr, yr, REG).item()}
    for tag, p, (a, b, lab) in (("cls", CLS, (s, t, y)), ("reg", REG, (sr, tr, yr))):
        out[f"prokt-teacher/{tag}"] = dict(zip(("loss", "task", "pull"), (x.item() for x in teacher_objective(b, a, lab, 0.4, 2.0, p))))
        out[f"prokt-student/{tag}"] = dict(zip(("loss", "soft", "hard"), (x.item() for x in student_objective(a, b, lab, 0.7, 2.0, p))))
    return out


GOLDEN: dict[str, dict[str, float]] = {
    'none/cls': {'loss': 0.7343128512897231},
    'kd/cls': {'loss': 1.1969087207817237, 'soft': 1.5053059671097242, 'hard': 0.7343128512897231},
    'kd-mse/cls': {'loss': 0.4655141824622444, 'soft': 0.28631506991059197, 'hard': 0.7343128512897231},
    'pkd/cls': {'loss': 186.0178458046604, 'soft': 0.7236669169308575, 'hard': 0.7343128512897231, 'patience': 0.3705819845199585},
    'pkd-batchmean-last/cls': {'loss': 172.62764391707452, 'soft': 2.1710007507925724, 'hard': 0.7343128512897231, 'patience': 0.3417752981185913},
    'tinybert/cls': {'loss': 8.36022447685929, 'att': 3.5042710304260254, 'embedding': 1.3422056436538696, 'hidden': 3.106250762939453, 'pred': 0.40749715904923206},
    'tinybert-labels-sum/cls': {'loss': 9.591010883997097, 'att': 3.5042710304260254, 'embedding': 1.3422056436538696, 'hidden': 3.106250762939453, 'pred': 1.6382835661870374},
    'tinybert-stage1/cls': {'loss': 7.952727317810059, 'att': 3.5042710304260254, 'embedding': 1.3422056436538696, 'hidden': 3.106250762939453, 'pred': 0.0},
    'at/cls': {'loss': 202.75948438542218, 'ce': 0.7343128512897231, 'kd': 1.7121472674836524, 'at': 0.20116910338401794},
    'fitnet/cls': {'loss': 150.75396070378156, 'ce': 0.7343128512897231, 'kd': 1.7121472674836524, 'hint': 1.491635799407959},
    'crd/cls': {'loss': 17.88172983596345, 'ce': 0.7343128512897231, 'kd': 1.7121472674836524, 'crd': 20.364179188664878},
    'none/reg': {'loss': 2.1141317398475863},
    'kd/reg': {'loss': 4.170110401328805, 'soft': 5.540762842316285, 'hard': 2.1141317398475863},
    'kd-mse/reg': {'loss': 4.170110401328805, 'soft': 5.540762842316285, 'hard': 2.1141317398475863},
    'pkd/reg': {'loss': 189.80375861899756, 'soft': 5.540762842316285, 'hard': 2.1141317398475863, 'patience': 0.3705819845199585},
    'pkd-batchmean-last/reg': {'loss': 175.4004230477085, 'soft': 5.540762842316285, 'hard': 2.1141317398475863, 'patience': 0.3417752981185913},
    'tinybert/reg': {'loss': 13.493491172790527, 'att': 3.5042710304260254, 'embedding': 1.3422056436538696, 'hidden': 3.106250762939453, 'pred': 5.540763854980469},
    'tinybert-labels-sum/reg': {'loss': 10.066859245300293, 'att': 3.5042710304260254, 'embedding': 1.3422056436538696, 'hidden': 3.106250762939453, 'pred': 2.1141316890716553},
    'tinybert-stage1/reg': {'loss': 7.952727317810059, 'att': 3.5042710304260254, 'embedding': 1.3422056436538696, 'hidden': 3.106250762939453, 'pred': 0.0},
    'at/reg': {'loss': 206.05361106139637, 'ce': 2.1141317398475863, 'kd': 5.540762842316285, 'at': 0.20116910338401794},
    'fitnet/reg': {'loss': 154.04808737975574, 'ce': 2.1141317398475863, 'kd': 5.540762842316285, 'hint': 1.491635799407959},
    'crd/reg': {'loss': 21.17585651193763, 'ce': 2.1141317398475863, 'kd': 5.540762842316285, 'crd': 20.364179188664878},
    'dkd/cls': {'loss': 15.841689903596851, 'ce': 0.7343128512897231, 'tckd': 0.648576021194458, 'nckd': 1.8073501586914062, 'dkd_weight': 1.0},
    'losses': {'softened_kl': 1.5053059671097242, 'softened_kl_mean': 0.5017686557032414, 'probability_mse': 0.28631506991059197, 'soft_ce_mean': 0.40749715904923206, 'soft_ce_sum': 1.2224914771476965, 'soft_loss_cls': 1.5053059671097242, 'soft_loss_cls_mse': 0.28631506991059197, 'soft_loss_reg': 1.3851907105790713, 'task_loss_cls': 0.7343128512897231, 'task_loss_reg': 1.1796723382742953},
    'prokt-teacher/cls': {'loss': 1.4725793953614987, 'task': 1.4116306840499895, 'pull': 1.5640024623287627},
    'prokt-student/cls': {'loss': 1.0682201197674954, 'soft': 1.2113232348293979, 'hard': 0.7343128512897231},
    'prokt-teacher/reg': {'loss': 1.9261846438270604, 'task': 2.2868471170832376, 'pull': 1.3851909637451172},
    'prokt-student/reg': {'loss': 1.3235351988876385, 'soft': 1.3851907105790713, 'hard': 1.1796723382742953},
}


@pytest.fixture(scope="module")
def computed() -> dict[str, dict[str, float]]:
    return cases()


def test_every_case_is_recorded(computed: dict[str, dict[str, float]]) -> None:
    assert sorted(computed) == sorted(GOLDEN)
    for name, parts in GOLDEN.items():
        assert sorted(computed[name]) == sorted(parts), name


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_value(name: str, computed: dict[str, dict[str, float]]) -> None:
    # rel 1e-6: the parts some methods compute in float32 (.float()) vary in the last bits
    # across BLAS builds; a changed formula or reduction moves them far more
    for part, value in GOLDEN[name].items():
        assert computed[name][part] == pytest.approx(value, rel=1e-6, abs=1e-9), f"{name}: {part}"
