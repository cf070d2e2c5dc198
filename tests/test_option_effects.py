"""Every option of every loss-based method changes the loss it computes.

For each method and each field of its ``Params``, the loss on one fixed batch (and a second
call, for options that act through state such as CRD's memory momentum) is computed with
the option at its default and at another value; the two must differ. An option the method
ignores (its default hard-coded where the loss reads it) fails here. Every field of every
``Params`` must have a case, so a new option cannot be added without one. The teacher-
updating methods' options are checked step by step in tests/test_teacher_optimizers.py,
test_metadistil*.py and test_prokt.py (``STEPWISE`` names the test for each); the methods
added since 2021 option by option against a hand computation of their formula, in
tests/test_option_formulas.py and tests/test_lm_methods.py (``BY_HAND`` names the test for
each, and the test must exist).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from kdbench.api import Problem, SetupInfo
from kdbench.registry import get_registry
from support.helpers_models import text_batch, tiny_bert
from support.vision_test_models import TinyCNN, fixed_batch, make_ctx

CLS = Problem("classification", 2)
CLS3 = Problem("classification", 3)  # logit standardisation needs 3 classes or more
CLS5 = Problem("classification", 5)  # the vision test models' head
REG = Problem("regression", 1)

# method -> option -> (other value, params the base run needs so the option can matter, problem)
CASES: dict[str, dict[str, tuple[Any, dict[str, Any], Problem]]] = {
    "kd": {"alpha": (0.2, {}, CLS), "temperature": (2.0, {}, CLS), "soft_loss": ("mse", {}, CLS),
           "regression_soft": ("probabilities", {}, REG), "logit_standardization": (True, {}, CLS3)},
    "pkd": {"alpha": (0.2, {}, CLS), "temperature": (2.0, {}, CLS), "beta": (50.0, {}, CLS), "layer_map": ("last", {}, CLS),
            "layer_reduction": ("sum", {}, CLS), "soft_reduction": ("batchmean", {}, CLS), "soft_loss": ("mse", {}, CLS),
            "regression_soft": ("probabilities", {}, REG)},
    "tinybert": {"temperature": (2.0, {}, CLS), "att_weight": (0.5, {}, CLS), "hidden_weight": (0.5, {}, CLS), "pred_weight": (0.5, {}, CLS),
                 "two_stage": (True, {}, CLS), "stage1_fraction": (0.0, {"two_stage": True}, CLS),
                 "regression_pred": ("labels", {}, REG), "soft_reduction": ("sum", {}, CLS)},
    "dkd": {"gamma": (0.5, {}, CLS), "alpha": (0.5, {}, CLS), "beta": (2.0, {}, CLS), "temperature": (2.0, {}, CLS),
            "warmup_fraction": (0.5, {}, CLS), "logit_standardization": (True, {}, CLS5)},
    "at": {"gamma": (0.5, {}, CLS), "alpha": (0.5, {}, CLS), "beta": (10.0, {}, CLS), "temperature": (2.0, {"alpha": 0.5}, CLS),
           "p": (4.0, {}, CLS)},
    "fitnet": {"gamma": (0.5, {}, CLS), "alpha": (0.5, {}, CLS), "beta": (10.0, {}, CLS), "temperature": (2.0, {"alpha": 0.5}, CLS),
               "hint_layer": (1, {}, CLS)},
    "crd": {"gamma": (0.5, {}, CLS), "alpha": (0.5, {}, CLS), "beta": (0.3, {}, CLS), "temperature": (2.0, {"alpha": 0.5}, CLS),
            "feat_dim": (8, {}, CLS), "nce_k": (2, {}, CLS), "nce_t": (0.2, {}, CLS), "nce_m": (0.9, {}, CLS)},
}
VISION = {"dkd", "at", "fitnet", "crd"}

#: the teacher-updating methods: option -> the test that fails when it is ignored
STEPWISE = {
    "metadistil": {
        "inner": "test_metadistil.py::test_inner_pkd_meta_gradient_matches_finite_differences",
        "virtual_lr": "test_teacher_optimizers.py (S' = S - eta grad, eta 0.5 in the reference)",
        "teacher_lr": "test_teacher_optimizers.py::test_metadistil_teacher_update_is_the_hand_update_step_by_step",
        "teacher_optimizer": "test_teacher_optimizers.py::test_metadistil_teacher_update_is_the_hand_update_step_by_step",
        "teacher_weight_decay": "test_teacher_optimizers.py::test_metadistil_teacher_update_is_the_hand_update_step_by_step",
        "teacher_momentum": "test_teacher_optimizers.py::test_metadistil_teacher_update_is_the_hand_update_step_by_step",
        "teacher_grad_clip": "test_teacher_optimizers.py::test_metadistil_clip_value_is_the_one_given",
        "teacher_start": "test_metadistil.py::test_teacher_is_fixed_before_teacher_start",
        "quiz_batches": "test_metadistil.py::test_several_quiz_batches_average_their_losses",
        "follow_student_schedule": "test_metadistil_options.py::test_deprecated_follow_student_schedule_means_both_schedules_renormalised",
        "teacher_schedule": "test_teacher_optimizers.py::test_metadistil_teacher_update_is_the_hand_update_step_by_step",
        "virtual_schedule": "test_metadistil_options.py::test_cifar_teacher_lr_is_full_when_it_switches_on_then_follows_the_student",
        "quiz_mode": "test_metadistil_options.py::test_quiz_in_train_mode_uses_batch_statistics_and_leaves_running_ones",
        "quiz_augment": "test_teacher_optimizers.py::test_quiz_augment_reaches_the_runners_quiz_stream",
        "teacher_warm_steps": "test_teacher_optimizers.py::test_metadistil_warm_steps_fill_the_momentum_buffer_without_moving_the_teacher",
        "inner_version": "test_metadistil_options.py::test_a_new_inner_version_changes_the_dump_and_so_the_run_hash",
    },
    "prokt": {
        "lam": "test_teacher_optimizers.py::test_prokt_teacher_update_in_its_mode_at_its_rate",
        "temperature": "test_teacher_optimizers.py::test_prokt_teacher_update_in_its_mode_at_its_rate",
        "alpha": "test_teacher_optimizers.py::test_prokt_student_step_uses_alpha_and_the_updated_eval_mode_teacher",
        "teacher_lr": "test_teacher_optimizers.py::test_prokt_teacher_update_in_its_mode_at_its_rate",
        "teacher_optimizer": "test_teacher_optimizers.py::test_prokt_student_step_uses_alpha_and_the_updated_eval_mode_teacher",
        "teacher_weight_decay": "test_teacher_optimizers.py::test_prokt_teacher_update_in_its_mode_at_its_rate",
        "teacher_momentum": "test_teacher_optimizers.py::test_prokt_teacher_update_in_its_mode_at_its_rate",
        "teacher_train_mode": "test_teacher_optimizers.py::test_prokt_teacher_update_in_its_mode_at_its_rate",
        "follow_student_schedule": "test_teacher_optimizers.py::test_prokt_teacher_update_in_its_mode_at_its_rate",
        "teacher_init": "test_prokt.py::test_teacher_starts_from_pretrained_weights_by_default",
    },
}


#: the methods added since 2021: option -> the test that checks the option against a hand
#: computation of the method's formula with the option away from its default
OF, LM = "test_option_formulas.py::", "test_lm_methods.py::"
BY_HAND: dict[str, dict[str, str]] = {
    "dist": {o: OF + "test_dist_options" for o in ("ce_weight", "beta", "gamma", "temperature", "logit_standardization")},
    "mlkd": {o: OF + "test_mlkd_options" for o in ("ce_weight", "kd_weight", "temperatures", "logit_standardization")},
    "ctkd": {o: OF + "test_ctkd_options" for o in ("gamma", "alpha", "t_start", "t_range", "lambda_max", "curriculum_fraction",
                                                    "logit_standardization")},
    "reviewkd": {o: OF + "test_reviewkd_options" for o in ("ce_weight", "reviewkd_weight", "warmup_fraction", "student_preact")},
    "minilm": {o: OF + "test_minilm_options" for o in ("w_relation", "ce_weight", "kd_weight", "temperature", "teacher_layer", "student_layer")},
    "minilmv2": {o: OF + "test_minilmv2_options" for o in ("w_relation", "ce_weight", "kd_weight", "temperature", "relation_heads",
                                                            "teacher_layer", "student_layer")},
    "sft": {},  # no options: the reference NLL (test_lm_methods.py::test_sft_is_the_reference_nll)
    "token-kd": {"temperature": LM + "test_token_kd_by_hand", "label_weight": LM + "test_token_kd_by_hand",
                 "teacher_topk": LM + "test_topk_teacher_cache_renormalises"},
    "seqkd": {"max_new_tokens": LM + "test_seqkd_trains_on_the_teachers_greedy_outputs_cached_once"},
    "gkd": {o: LM + "test_gkd_on_policy_fraction_and_reproducible_samples" for o in ("beta", "lmbda", "temperature", "max_new_tokens")},
    "rkl": {"temperature": OF + "test_rkl_samples_at_its_temperature_and_compares_untempered_distributions",
            "max_new_tokens": LM + "test_rkl_on_student_samples_by_hand"},
    **{name: {"alpha": LM + "test_skew_divergences_by_hand", "temperature": OF + "test_skew_temperature_divides_both_sides",
              "teacher_topk": OF + "test_skew_teacher_topk_renormalises_over_k"} for name in ("skew-kl", "skew-rkl")},
    "taid": {**{o: OF + "test_taid_schedule_options" for o in ("t_start", "t_end", "alpha", "beta", "adaptive")},
             "teacher_topk": OF + "test_taid_teacher_topk_interpolates_towards_the_truncated_teacher"},
}


def losses(name: str, params: dict[str, Any], problem: Problem) -> tuple[float, float]:
    """The method's loss on a fixed batch, twice in a row (step 1 of 10), from seeded models."""
    cls = get_registry().method(name)
    method = cls(cls.Params(**params), problem)
    torch.manual_seed(0)
    if name in VISION:
        student, teacher, batch = TinyCNN(), TinyCNN(6, (8, 12, 16)).eval(), fixed_batch(n=4)
    else:
        student, teacher = tiny_bert(layers=3, seed=1, problem=problem), tiny_bert(layers=6, seed=2, problem=problem).eval()
        batch = text_batch(seed=3)
        if problem.is_regression:
            batch.labels = torch.linspace(-1.0, 2.0, batch.labels.shape[0], dtype=torch.float64)
    torch.manual_seed(1)
    extra = method.extra_modules(student, teacher, SetupInfo(batch, 6, torch.device("cpu")))
    if extra is not None and name not in VISION:
        extra = extra.double()  # the text models are float64
    ctx = make_ctx(student, teacher, extra, train_size=6, total_steps=10, step=1)
    ctx.problem, ctx.seed = problem, 0
    method.setup(ctx)
    out = []
    for _ in range(2):
        s_out = student(batch.inputs, need=method.student_needs)
        with torch.no_grad():
            t_out = teacher(batch.inputs, need=method.teacher_needs)
        out.append(float(method.loss(s_out, t_out, batch, ctx)[0]))
    return out[0], out[1]


@pytest.mark.parametrize("name, option", [(m, o) for m, opts in CASES.items() for o in opts])
def test_every_option_changes_the_loss(name: str, option: str) -> None:
    other, base, problem = CASES[name][option]
    assert get_registry().method(name).Params.model_fields[option].default != other
    default, changed = losses(name, base, problem), losses(name, {**base, option: other}, problem)
    # an ignored option computes the same floats, bit for bit (seeded models, CPU): any difference counts
    assert default != changed, f"{name}: {option}={other!r} computes the same loss as its default"


@pytest.mark.parametrize("name", sorted({*CASES, *STEPWISE, *BY_HAND}))
def test_every_option_of_every_method_has_a_check(name: str) -> None:
    fields = set(get_registry().method(name).Params.model_fields)
    checks = CASES.get(name) or STEPWISE.get(name) or BY_HAND[name]
    assert fields == set(checks), "add a case for the new option (or drop the old one)"


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_the_named_hand_computations_exist(name: str) -> None:
    here = Path(__file__).parent
    for option, node in BY_HAND[name].items():
        path, test = node.split("::")
        assert re.search(rf"^def {test}\(", (here / path).read_text(), re.M), f"{name}.{option}: {node} is not a test"


def test_every_builtin_method_is_covered() -> None:
    registry = get_registry()
    builtin = {n for n in registry.names("methods") if registry.method(n).__module__.startswith("kdbench_plugins.")}
    assert builtin - {"none"} == {*CASES, *STEPWISE, *BY_HAND}
    assert not set(CASES) & set(STEPWISE) and not {*CASES, *STEPWISE} & set(BY_HAND)
