"""One-line mutations of the methods, their shared helpers and the recipes, each of which the
tests must kill (see tests/README.md). Run from the repository root::

    .venv/bin/python tests/mutants.py            # every mutation
    .venv/bin/python tests/mutants.py -k prokt   # those whose name contains "prokt"
    .venv/bin/python tests/mutants.py --list

Each mutation replaces one exact snippet (found exactly once) in one file, runs the named
test files (``pytest -x -q``) and puts the file back byte for byte, even on Ctrl-C. A
mutation is killed when pytest fails; a survivor is printed and makes the exit status 1.
Never commit a mutated file: the script restores it, and ``git diff`` shows if it did not.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
M = "plugins/kdbench_plugins/methods/"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


def mutants() -> list[Mutant]:
    md, pk = M + "metadistil.py", M + "prokt.py"
    md_tests = ("tests/test_teacher_optimizers.py", "tests/test_metadistil.py", "tests/test_metadistil_options.py", "tests/test_soft_regression.py")
    pk_tests = ("tests/test_teacher_optimizers.py", "tests/test_prokt.py")
    out = [
        # -- the teacher optimisers (kdbench/losses.py, shared by MetaDistil and ProKT)
        Mutant("teacher SGD momentum dropped", "kdbench/teacher_updates.py", "lr=lr, momentum=momentum, weight_decay=weight_decay)",
               "lr=lr, momentum=0.0, weight_decay=weight_decay)", md_tests[:1]),
        Mutant("teacher SGD weight decay dropped", "kdbench/teacher_updates.py", "lr=lr, momentum=momentum, weight_decay=weight_decay)",
               "lr=lr, momentum=momentum, weight_decay=0.0)", md_tests[:1]),
        Mutant("teacher AdamW weight decay dropped", "kdbench/teacher_updates.py", "AdamW(params, lr=lr, weight_decay=weight_decay,",
               "AdamW(params, lr=lr, weight_decay=0.0,", md_tests[:1]),
        Mutant("scheduled teacher lr applied one step late", "kdbench/teacher_updates.py",
               '    for group in optimizer.param_groups:\n        group["lr"] = lr\n    optimizer.step()\n',
               '    optimizer.step()\n    for group in optimizer.param_groups:\n        group["lr"] = lr\n', md_tests[:1]),
        Mutant("teacher clip value ignored", "kdbench/teacher_updates.py", "nn.utils.clip_grad_norm_(params, clip)", "nn.utils.clip_grad_norm_(params, 1.0)", md_tests[:1]),
        Mutant("linear teacher schedule off by one step", "kdbench/teacher_updates.py", "(ctx.total_steps - ctx.step) /", "(ctx.total_steps - ctx.step + 1) /", md_tests),
        Mutant("follow_student teacher lr not renormalised", "kdbench/teacher_updates.py", "return schedule_ratio(ctx) / at_start if at_start else 0.0",
               "return schedule_ratio(ctx)", md_tests),
        # -- MetaDistil, one per option and the step's structure
        Mutant("metadistil virtual_lr ignored", md, "return self.params.virtual_lr * (", "return 5e-5 * (", md_tests),
        Mutant("metadistil teacher_lr ignored (rate)", md, "lr = p.teacher_lr * teacher_lr_factor", "lr = 1e-5 * teacher_lr_factor", md_tests),
        Mutant("metadistil teacher_optimizer ignored", md, "build_teacher_optimizer(ctx.teacher, self.params.teacher_optimizer,",
               'build_teacher_optimizer(ctx.teacher, "adamw",', md_tests),
        Mutant("metadistil teacher_weight_decay ignored", md, "self.params.teacher_weight_decay, self.params.teacher_momentum)",
               "0.0, self.params.teacher_momentum)", md_tests),
        Mutant("metadistil teacher_momentum ignored", md, "self.params.teacher_weight_decay, self.params.teacher_momentum)",
               "self.params.teacher_weight_decay, 0.9)", md_tests),
        Mutant("metadistil teacher_grad_clip ignored", md, "lr, p.teacher_grad_clip)", "lr, 1.0)", md_tests),
        Mutant("metadistil teacher_start ignored", md, "first_teacher_step(self.params.teacher_start, total_steps)",
               "first_teacher_step(0.0, total_steps)", md_tests),
        Mutant("metadistil teacher_warm_steps ignored", md, "- self.params.teacher_warm_steps, 1)", "- 0, 1)", md_tests),
        Mutant("metadistil teacher_schedule ignored", md, "teacher_lr_factor(ctx, p.teacher_schedule, p.teacher_start)",
               'teacher_lr_factor(ctx, "constant", p.teacher_start)', md_tests),
        Mutant("metadistil virtual_schedule ignored", md, 'self.params.virtual_schedule == "follow_student"', "False", md_tests),
        Mutant("metadistil deprecated follow_student_schedule ignored", md, 'data.get("follow_student_schedule") is True',
               'data.get("follow_student_schedule") is None', md_tests),
        Mutant("metadistil quiz_batches ignored", md, "return int(self.params.quiz_batches)", "return 1", md_tests),
        Mutant("metadistil quiz_batches all keeps the partial batch", md, "max(quiz_size // batch_size, 1)",
               "max(-(-quiz_size // batch_size), 1)", md_tests),
        Mutant("metadistil quiz_mode ignored (quiz pass)", md, 'with training_mode(student, self.params.quiz_mode == "train"):',
               "with training_mode(student, False):", md_tests),
        Mutant("metadistil quiz_mode train writes running statistics", md,
               'buffers = {k: b.clone() for k, b in student.named_buffers()} if self.params.quiz_mode == "train" else {}', "buffers = {}", md_tests),
        Mutant("metadistil quiz_augment ignored", md, "self.inner.aligned_positions, params.quiz_augment)", "self.inner.aligned_positions, False)", md_tests),
        Mutant("metadistil pilot teacher in train mode", md, "training_mode(teacher, False)", "training_mode(teacher, True)", md_tests),
        Mutant("metadistil meta-gradient sign flipped", md, "phi = sum(((-eta * d) * g)", "phi = sum(((eta * d) * g)", md_tests),
        # -- ProKT
        Mutant("prokt follow_student_schedule ignored", pk, "if p.follow_student_schedule:", "if False:", pk_tests),
        Mutant("prokt schedule applied without the ratio", pk, 'group["lr"] = p.teacher_lr * schedule_ratio(ctx)', 'group["lr"] = p.teacher_lr', pk_tests),
        Mutant("prokt teacher_train_mode ignored (always train)", pk, "teacher.train(p.teacher_train_mode)", "teacher.train(True)", pk_tests),
        Mutant("prokt teacher_train_mode ignored (always eval)", pk, "teacher.train(p.teacher_train_mode)", "teacher.train(False)", pk_tests),
        Mutant("prokt lam ignored", pk, "batch.labels, p.lam, p.temperature", "batch.labels, 0.4, p.temperature", pk_tests),
        Mutant("prokt temperature ignored (teacher)", pk, "batch.labels, p.lam, p.temperature", "batch.labels, p.lam, 1.0", pk_tests),
        Mutant("prokt alpha ignored", pk, "batch.labels, p.alpha, p.temperature", "batch.labels, 1.0, p.temperature", pk_tests),
        Mutant("prokt temperature ignored (student)", pk, "batch.labels, p.alpha, p.temperature", "batch.labels, p.alpha, 1.0", pk_tests),
        Mutant("prokt teacher_optimizer ignored", pk, "build_teacher_optimizer(ctx.teacher, p.teacher_optimizer,", 'build_teacher_optimizer(ctx.teacher, "adamw",', pk_tests),
        Mutant("prokt teacher_lr ignored", pk, "p.teacher_optimizer, p.teacher_lr,", "p.teacher_optimizer, 3e-5,", pk_tests),
        Mutant("prokt teacher_weight_decay ignored", pk, "p.teacher_lr, p.teacher_weight_decay, p.teacher_momentum)", "p.teacher_lr, 0.0, p.teacher_momentum)", pk_tests),
        Mutant("prokt teacher_momentum ignored", pk, "p.teacher_lr, p.teacher_weight_decay, p.teacher_momentum)", "p.teacher_lr, p.teacher_weight_decay, 0.9)", pk_tests),
        Mutant("prokt teacher_init ignored", pk, 'if p.teacher_init == "pretrained":', "if False:", pk_tests),
        Mutant("prokt student step against the old teacher", pk, "t_new = ctx.teacher_forward(batch, self.teacher_needs)",
               "t_new = ModelOutput(logits=t_logits.detach())", pk_tests),
    ]
    # the test meant to kill each (run first, so a kill costs one test, not four files)
    to, md_, mdo = "tests/test_teacher_optimizers.py::", "tests/test_metadistil.py::", "tests/test_metadistil_options.py::"
    hand = to + "test_metadistil_teacher_update_is_the_hand_update_step_by_step"
    cifar, quiz_all = mdo + "test_cifar_teacher_lr_is_full_when_it_switches_on_then_follows_the_student", mdo + "test_quiz_batches_all_runs_one_pass_over_the_quiz_split"
    unrolled, train_quiz = md_ + "test_meta_gradient_matches_unrolled_reference_and_finite_differences", mdo + "test_quiz_in_train_mode_uses_batch_statistics_and_leaves_running_ones"
    prokt_teacher, prokt_student = to + "test_prokt_teacher_update_in_its_mode_at_its_rate", to + "test_prokt_student_step_uses_alpha_and_the_updated_eval_mode_teacher"
    first = {
        "teacher SGD momentum dropped": hand, "teacher SGD weight decay dropped": hand, "teacher AdamW weight decay dropped": hand,
        "scheduled teacher lr applied one step late": hand, "teacher clip value ignored": to + "test_metadistil_clip_value_is_the_one_given",
        "linear teacher schedule off by one step": hand, "follow_student teacher lr not renormalised": cifar,
        "metadistil virtual_lr ignored": hand, "metadistil teacher_lr ignored (rate)": hand, "metadistil teacher_optimizer ignored": hand,
        "metadistil teacher_weight_decay ignored": hand, "metadistil teacher_momentum ignored": hand, "metadistil teacher_grad_clip ignored": hand,
        "metadistil teacher_start ignored": md_ + "test_teacher_is_fixed_before_teacher_start",
        "metadistil teacher_warm_steps ignored": to + "test_metadistil_warm_steps_fill_the_momentum_buffer_without_moving_the_teacher",
        "metadistil teacher_schedule ignored": hand, "metadistil virtual_schedule ignored": cifar,
        "metadistil deprecated follow_student_schedule ignored": mdo + "test_deprecated_follow_student_schedule_means_both_schedules_renormalised",
        "metadistil quiz_batches ignored": md_ + "test_several_quiz_batches_average_their_losses",
        "metadistil quiz_batches all keeps the partial batch": quiz_all, "metadistil quiz_mode ignored (quiz pass)": train_quiz,
        "metadistil quiz_mode train writes running statistics": train_quiz,
        "metadistil quiz_augment ignored": to + "test_quiz_augment_reaches_the_runners_quiz_stream",
        "metadistil pilot teacher in train mode": unrolled, "metadistil meta-gradient sign flipped": unrolled,
        "prokt teacher_init ignored": "tests/test_prokt.py::test_teacher_starts_from_pretrained_weights_by_default",
        "prokt alpha ignored": prokt_student, "prokt temperature ignored (student)": prokt_student, "prokt student step against the old teacher": prokt_student,
    }
    out = [replace(m, tests=(first.get(m.name, prokt_teacher if m.name.startswith("prokt") else hand),)) for m in out]
    # -- the loss-based methods: each option replaced by its default (or a constant) where the loss reads it
    kd, pkd, tb = M + "kd.py", M + "pkd.py", M + "tinybert.py"
    loss_options = [
        (kd, "kd alpha", "return p.alpha * soft + (1 - p.alpha) * hard", "return 0.5 * soft + (1 - 0.5) * hard", "tests/test_kd.py"),
        (kd, "kd temperature", "soft_loss(student.logits, teacher.logits, p.temperature,", "soft_loss(student.logits, teacher.logits, 4.0,", "tests/test_kd.py"),
        (kd, "kd soft_loss", "kind=p.soft_loss, mask", 'kind="kl", mask', "tests/test_kd.py tests/test_metadistil_options.py tests/test_soft_regression.py"),
        (kd, "kd logit_standardization", "standardize=p.logit_standardization, regression", "standardize=False, regression", "tests/test_kd.py"),
        (kd, "kd regression_soft", "regression=p.regression_soft)", 'regression="logits")', "tests/test_kd.py tests/test_soft_regression.py"),
        (pkd, "pkd alpha", "loss = p.alpha * soft + (1 - p.alpha) * hard", "loss = 0.7 * soft + (1 - 0.7) * hard", "tests/test_pkd.py"),
        (pkd, "pkd temperature", "soft_loss(student.logits, teacher.logits, p.temperature,", "soft_loss(student.logits, teacher.logits, 10.0,", "tests/test_pkd.py"),
        (pkd, "pkd beta", "+ p.beta * pt", "+ 500.0 * pt", "tests/test_pkd.py"),
        (pkd, "pkd layer_map", "teacher.hidden_states, p.layer_map, p.layer_reduction)", 'teacher.hidden_states, "skip", p.layer_reduction)', "tests/test_pkd.py"),
        (pkd, "pkd layer_reduction", "teacher.hidden_states, p.layer_map, p.layer_reduction)", 'teacher.hidden_states, p.layer_map, "mean")', "tests/test_pkd.py"),
        (pkd, "pkd soft_reduction", "reduction=p.soft_reduction,", 'reduction="mean",', "tests/test_pkd.py"),
        (pkd, "pkd soft_loss", "kind=p.soft_loss, reduction", 'kind="kl", reduction', "tests/test_pkd.py tests/test_metadistil_options.py"),
        (pkd, "pkd regression_soft", "regression=p.regression_soft)", 'regression="logits")', "tests/test_pkd.py tests/test_soft_regression.py"),
        (tb, "tinybert temperature", "batch.labels, p.temperature, self.problem", "batch.labels, 1.0, self.problem", "tests/test_tinybert.py"),
        (tb, "tinybert att_weight", "loss = p.att_weight * att", "loss = 1.0 * att", "tests/test_tinybert.py"),
        (tb, "tinybert hidden_weight", "+ p.hidden_weight * (emb + hid)", "+ 1.0 * (emb + hid)", "tests/test_tinybert.py"),
        (tb, "tinybert pred_weight", "+ p.pred_weight * pred", "+ 1.0 * pred", "tests/test_tinybert.py"),
        (tb, "tinybert two_stage", "return self.params.two_stage and", "return False and", "tests/test_tinybert.py"),
        (tb, "tinybert stage1_fraction", "int(self.params.stage1_fraction * ctx.total_steps)", "int(0.5 * ctx.total_steps)", "tests/test_tinybert.py"),
        (tb, "tinybert regression_pred", "self.problem, p.regression_pred, p.soft_reduction)", 'self.problem, "teacher", p.soft_reduction)', "tests/test_tinybert.py"),
        (tb, "tinybert soft_reduction", "self.problem, p.regression_pred, p.soft_reduction)", 'self.problem, p.regression_pred, "mean")', "tests/test_tinybert.py"),
        (M + "dkd.py", "dkd gamma", "total = p.gamma * ce", "total = 1.0 * ce", "tests/test_dkd.py"),
        (M + "dkd.py", "dkd alpha", "w * (p.alpha * tckd", "w * (1.0 * tckd", "tests/test_dkd.py"),
        (M + "dkd.py", "dkd beta", "+ p.beta * nckd)", "+ 8.0 * nckd)", "tests/test_dkd.py"),
        (M + "dkd.py", "dkd temperature", "batch.labels, p.temperature, p.logit_standardization)", "batch.labels, 4.0, p.logit_standardization)", "tests/test_dkd.py"),
        (M + "dkd.py", "dkd logit_standardization", "batch.labels, p.temperature, p.logit_standardization)", "batch.labels, p.temperature, False)", "tests/test_dkd.py"),
        (M + "dkd.py", "dkd warmup_fraction", "warm = self.params.warmup_fraction * total_steps", "warm = 20 / 240 * total_steps", "tests/test_dkd.py"),
        (M + "at.py", "at gamma", "total = hp.gamma * ce", "total = 1.0 * ce", "tests/test_at.py"),
        (M + "at.py", "at alpha", "+ hp.alpha * kd", "+ 0.0 * kd", "tests/test_at.py"),
        (M + "at.py", "at beta", "+ hp.beta * at", "+ 1000.0 * at", "tests/test_at.py"),
        (M + "at.py", "at temperature", "teacher.logits, hp.temperature,", "teacher.logits, 4.0,", "tests/test_at.py"),
        (M + "at.py", "at p", "at_layer_loss(f_s, f_t, hp.p)", "at_layer_loss(f_s, f_t, 2.0)", "tests/test_at.py"),
        (M + "fitnet.py", "fitnet gamma", "total = p.gamma * ce", "total = 1.0 * ce", "tests/test_fitnet.py"),
        (M + "fitnet.py", "fitnet alpha", "+ p.alpha * kd", "+ 0.0 * kd", "tests/test_fitnet.py"),
        (M + "fitnet.py", "fitnet beta", "+ p.beta * hint", "+ 100.0 * hint", "tests/test_fitnet.py"),
        (M + "fitnet.py", "fitnet temperature", "teacher.logits, p.temperature,", "teacher.logits, 4.0,", "tests/test_fitnet.py"),
        (M + "fitnet.py", "fitnet hint_layer (loss)", "        h = p.hint_layer\n", "        h = 2\n", "tests/test_fitnet.py"),
        (M + "crd.py", "crd gamma", "total = p.gamma * ce", "total = 1.0 * ce", "tests/test_crd.py"),
        (M + "crd.py", "crd alpha", "+ p.alpha * kd", "+ 0.0 * kd", "tests/test_crd.py"),
        (M + "crd.py", "crd beta", "+ p.beta * crd", "+ 0.8 * crd", "tests/test_crd.py"),
        (M + "crd.py", "crd temperature", "teacher.logits, p.temperature,", "teacher.logits, 4.0,", "tests/test_crd.py"),
        (M + "crd.py", "crd feat_dim", "dims[1], p.feat_dim,", "dims[1], 128,", "tests/test_crd.py"),
        (M + "crd.py", "crd nce_k", "k = min(p.nce_k,", "k = min(16384,", "tests/test_crd.py"),
        (M + "crd.py", "crd nce_t", "info.train_size, p.nce_t, p.nce_m)", "info.train_size, 0.07, p.nce_m)", "tests/test_crd.py"),
        (M + "crd.py", "crd nce_m", "info.train_size, p.nce_t, p.nce_m)", "info.train_size, p.nce_t, 0.5)", "tests/test_crd.py"),
    ]
    effect = "tests/test_option_effects.py::test_every_option_changes_the_loss[{}-{}]"
    out += [Mutant(f"{name} ignored", path, old, new, (effect.format(*name.split(" ", 1)).split(" (")[0] + ("" if "(" not in name else "]"),
                                                       *tests.split()))
            for path, name, old, new, tests in loss_options]
    # -- the methods added since 2021: each option read as its default where the formula reads it
    #    (tests/test_option_formulas.py and tests/test_lm_methods.py hold the hand computations)
    of, lmt = "tests/test_option_formulas.py::", "tests/test_lm_methods.py::"
    ds, ml, ct, rv, m1, m2 = (M + f for f in ("dist.py", "mlkd.py", "ctkd.py", "reviewkd.py", "minilm.py", "minilmv2.py"))
    ds_total, ml_total = "total = p.ce_weight * ce + p.beta * inter + p.gamma * intra", "total = p.ce_weight * ce + p.kd_weight * (f * kd"
    ds_parts = "dist_parts(student.logits, teacher.logits, p.temperature, p.logit_standardization)"
    ct_lam, ct_temp = "curriculum_lambda(ctx.step, ctx.total_steps, p.curriculum_fraction, p.lambda_max)", "ctx.extra(lam, p.t_start, p.t_range)"
    m1_total, m2_total = "total = p.w_relation * (at + vr) + p.ce_weight * ce + p.kd_weight * kd", "total = p.w_relation * relation + p.ce_weight * ce + p.kd_weight * kd"
    m2_rel = "relation_kl(relation_logits(s_all[i], p.relation_heads), relation_logits(t_all[j], p.relation_heads), mask)"
    gkd_sample = 'sample_batch(ctx, ctx.student, batch, p.max_new_tokens, p.temperature, "gkd-samples")'
    rkl_sample = 'sample_batch(ctx, ctx.student, batch, self.params.max_new_tokens, self.params.temperature, "rkl-samples")'
    taid_new = 'TAIDSchedule(p.t_start, p.t_end, p.alpha, p.beta, p.adaptive)'
    skew_kl, skew_rkl = ("{}(student.logits, teacher.logits, mask, self.params.alpha, self.params.temperature)".format(f) for f in ("skew_kl", "skew_reverse_kl"))
    new_methods = [
        ("dist ce_weight", ds, ds_total, ds_total.replace("p.ce_weight", "1.0"), of + "test_dist_options"),
        ("dist beta", ds, ds_total, ds_total.replace("p.beta", "2.0"), of + "test_dist_options"),
        ("dist gamma", ds, ds_total, ds_total.replace("p.gamma", "2.0"), of + "test_dist_options"),
        ("dist temperature", ds, ds_parts, ds_parts.replace("p.temperature", "4.0"), of + "test_dist_options"),
        ("dist logit_standardization", ds, ds_parts, ds_parts.replace("p.logit_standardization", "False"), of + "test_dist_options"),
        ("mlkd ce_weight", ml, ml_total, ml_total.replace("p.ce_weight", "0.1"), of + "test_mlkd_options"),
        ("mlkd kd_weight", ml, ml_total, ml_total.replace("p.kd_weight", "0.9"), of + "test_mlkd_options"),
        ("mlkd temperatures (KD terms)", ml, "standardize=p.logit_standardization) for temp in p.temperatures)",
         "standardize=p.logit_standardization) for temp in (4.0, 3.0, 5.0, 2.0, 6.0))", of + "test_mlkd_options"),
        ("mlkd temperatures (batch correlation)", ml, "bc = sum(batch_correlation(s, t, temp) for temp in p.temperatures)",
         "bc = sum(batch_correlation(s, t, temp) for temp in (4.0, 3.0, 5.0, 2.0, 6.0))", of + "test_mlkd_options"),
        ("mlkd logit_standardization", ml, "standardize=p.logit_standardization) for temp", "standardize=False) for temp", of + "test_mlkd_options"),
        ("ctkd gamma", ct, "total = p.gamma * ce + p.alpha * kd", "total = 0.1 * ce + p.alpha * kd", of + "test_ctkd_options"),
        ("ctkd alpha", ct, "total = p.gamma * ce + p.alpha * kd", "total = p.gamma * ce + 0.9 * kd", of + "test_ctkd_options"),
        ("ctkd t_start", ct, ct_temp, ct_temp.replace("p.t_start", "1.0"), of + "test_ctkd_options"),
        ("ctkd t_range", ct, ct_temp, ct_temp.replace("p.t_range", "20.0"), of + "test_ctkd_options"),
        ("ctkd lambda_max", ct, ct_lam, ct_lam.replace("p.lambda_max", "1.0"), of + "test_ctkd_options"),
        ("ctkd curriculum_fraction", ct, ct_lam, ct_lam.replace("p.curriculum_fraction", "10 / 240"), of + "test_ctkd_options"),
        ("ctkd logit_standardization", ct, "standardize=p.logit_standardization).reshape(())", "standardize=False).reshape(())", of + "test_ctkd_options"),
        ("ctkd gradient reversal not reversed", ct, "return -ctx.lam * grad, None", "return ctx.lam * grad, None", of + "test_ctkd_options"),
        ("reviewkd ce_weight", rv, "total = p.ce_weight * ce + w", "total = 1.0 * ce + w", of + "test_reviewkd_options"),
        ("reviewkd reviewkd_weight", rv, "w * p.reviewkd_weight * review", "w * 1.0 * review", of + "test_reviewkd_options"),
        ("reviewkd warmup_fraction", rv, "warm = self.params.warmup_fraction * total_steps", "warm = 20 / 240 * total_steps", of + "test_reviewkd_options"),
        ("reviewkd student_preact", rv, "fused = ctx.extra(levels(student, p.student_preact))", "fused = ctx.extra(levels(student, False))", of + "test_reviewkd_options"),
        ("minilm w_relation", m1, m1_total, m1_total.replace("p.w_relation", "1.0"), of + "test_minilm_options"),
        ("minilm ce_weight", m1, m1_total, m1_total.replace("p.ce_weight", "1.0"), of + "test_minilm_options"),
        ("minilm kd_weight", m1, m1_total, m1_total.replace("p.kd_weight", "0.0"), of + "test_minilm_options"),
        ("minilm temperature", m1, "soft_loss(student.logits, teacher.logits, p.temperature, method.problem)",
         "soft_loss(student.logits, teacher.logits, 1.0, method.problem)", of + "test_minilm_options"),
        ("minilm teacher_layer", m1, 'resolve_layer(self.name, "teacher", p.teacher_layer, len(teacher.values))',
         'resolve_layer(self.name, "teacher", -1, len(teacher.values))', of + "test_minilm_options"),
        ("minilm student_layer", m1, 'resolve_layer(self.name, "student", p.student_layer, len(student.values))',
         'resolve_layer(self.name, "student", -1, len(student.values))', of + "test_minilm_options"),
        ("minilmv2 w_relation", m2, m2_total, m2_total.replace("p.w_relation", "1.0"), of + "test_minilmv2_options"),
        ("minilmv2 ce_weight", m2, m2_total, m2_total.replace("p.ce_weight", "1.0"), of + "test_minilmv2_options"),
        ("minilmv2 kd_weight", m2, m2_total, m2_total.replace("p.kd_weight", "0.0"), of + "test_minilmv2_options"),
        ("minilmv2 temperature", m2, "soft_loss(student.logits, teacher.logits, p.temperature, self.problem)",
         "soft_loss(student.logits, teacher.logits, 1.0, self.problem)", of + "test_minilmv2_options"),
        ("minilmv2 relation_heads (teacher side)", m2, m2_rel, m2_rel.replace("relation_logits(t_all[j], p.relation_heads)", "relation_logits(t_all[j], 2)"),
         of + "test_minilmv2_options"),
        ("minilmv2 teacher_layer", m2, 'resolve_layer(self.name, "teacher", p.teacher_layer, len(t_all))',
         'resolve_layer(self.name, "teacher", -1, len(t_all))', of + "test_minilmv2_options"),
        ("minilmv2 student_layer", m2, 'resolve_layer(self.name, "student", p.student_layer, len(s_all))',
         'resolve_layer(self.name, "student", -1, len(s_all))', of + "test_minilmv2_options"),
        ("token-kd temperature", M + "token_kd.py", "forward_kl(student.logits, teacher.logits, mask, p.temperature)",
         "forward_kl(student.logits, teacher.logits, mask, 1.0)", lmt + "test_token_kd_by_hand"),
        ("token-kd label_weight", M + "token_kd.py", "return (1 - p.label_weight) * kl + p.label_weight * nll", "return (1 - 0.0) * kl + 0.0 * nll",
         lmt + "test_token_kd_by_hand"),
        ("token-kd teacher_topk", M + "token_kd.py", "if self.params.teacher_topk is not None:", "if False:", lmt + "test_topk_teacher_cache_renormalises"),
        ("seqkd max_new_tokens", M + "seqkd.py", "teacher, cap = ctx.teacher, self.params.max_new_tokens", "teacher, cap = ctx.teacher, 64",
         lmt + "test_seqkd_trains_on_the_teachers_greedy_outputs_cached_once"),
        ("gkd beta", M + "gkd.py", "mask, self.params.beta, self.params.temperature)", "mask, 0.5, self.params.temperature)",
         lmt + "test_gkd_on_policy_fraction_and_reproducible_samples"),
        ("gkd temperature (loss)", M + "gkd.py", "mask, self.params.beta, self.params.temperature)", "mask, self.params.beta, 0.9)",
         lmt + "test_gkd_on_policy_fraction_and_reproducible_samples"),
        ("gkd lmbda", M + "gkd.py", "< p.lmbda)", "< 0.5)", of + "test_gkd_lmbda_is_the_on_policy_probability"),
        ("gkd temperature (sampling)", M + "gkd.py", gkd_sample, gkd_sample.replace("p.temperature", "0.9"), of + "test_gkd_samples_and_compares_at_its_temperature"),
        ("gkd max_new_tokens", M + "gkd.py", gkd_sample, gkd_sample.replace("p.max_new_tokens", "128"), lmt + "test_gkd_on_policy_fraction_and_reproducible_samples"),
        ("rkl temperature", M + "rkl.py", rkl_sample, rkl_sample.replace("self.params.temperature", "1.0"),
         of + "test_rkl_samples_at_its_temperature_and_compares_untempered_distributions"),
        ("rkl max_new_tokens", M + "rkl.py", rkl_sample, rkl_sample.replace("self.params.max_new_tokens", "128"), lmt + "test_rkl_on_student_samples_by_hand"),
        ("skew-kl alpha", M + "distillm.py", skew_kl, skew_kl.replace("self.params.alpha", "0.1"), lmt + "test_skew_divergences_by_hand"),
        ("skew-kl temperature", M + "distillm.py", skew_kl, skew_kl.replace("self.params.temperature", "1.0"), of + "test_skew_temperature_divides_both_sides"),
        ("skew-rkl alpha", M + "distillm.py", skew_rkl, skew_rkl.replace("self.params.alpha", "0.1"), lmt + "test_skew_divergences_by_hand"),
        ("skew-rkl temperature", M + "distillm.py", skew_rkl, skew_rkl.replace("self.params.temperature", "1.0"), of + "test_skew_temperature_divides_both_sides"),
        ("skew teacher_topk", M + "distillm.py", "if self.params.teacher_topk is not None:", "if False:", of + "test_skew_teacher_topk_renormalises_over_k"),
        ("taid t_start", M + "taid.py", taid_new, taid_new.replace("p.t_start", "0.4"), of + "test_taid_schedule_options"),
        ("taid t_end", M + "taid.py", taid_new, taid_new.replace("p.t_end", "1.0"), of + "test_taid_schedule_options"),
        ("taid alpha", M + "taid.py", taid_new, taid_new.replace("p.alpha", "5e-4"), of + "test_taid_schedule_options"),
        ("taid beta", M + "taid.py", taid_new, taid_new.replace("p.beta", "0.99"), of + "test_taid_schedule_options"),
        ("taid adaptive", M + "taid.py", taid_new, taid_new.replace("p.adaptive", "True"), of + "test_taid_schedule_options"),
        ("taid teacher_topk", M + "taid.py", "if p.teacher_topk is not None:", "if False:", of + "test_taid_teacher_topk_interpolates_towards_the_truncated_teacher"),
        ("taid linear floor dropped", "kdbench/token_losses.py", "self.t = min(self.t_end, max(linear, self.t + step_up))",
         "self.t = min(self.t_end, self.t + step_up)", of + "test_taid_schedule_options"),
        ("taid momentum without beta", "kdbench/token_losses.py", "self.momentum = self.beta * self.momentum + (1 - self.beta) * change",
         "self.momentum = change", of + "test_taid_schedule_options"),
    ]
    out += [Mutant(name if any(w in name for w in ("not ", "dropped", "without")) else f"{name} ignored", path, old, new, (test,))
            for name, path, old, new, test in new_methods]
    # -- recipes: how a recipe's training block reaches the suite, and the recipe values themselves
    rc = "kdbench/recipes.py"
    rt = tuple(f"tests/test_recipes.py::{t}" for t in ("test_recipe_entry_expands_to_the_explicit_suite", "test_recipe_training_expands_to_the_explicit_suite",
                                                       "test_entry_params_override_and_sweep", "test_paper_cifar100_uses_the_recipes",
                                                       "test_recipe_task_options_reach_every_task_under_the_suites_own"))
    official = ("tests/test_recipes.py::test_recipe_matches_the_official_settings",)
    out += [
        Mutant("recipe optimizer ignored", rc, 'out["optimizer"] = {**training.optimizer, **(data.get("optimizer") or {})}',
               'out["optimizer"] = {**(data.get("optimizer") or {})}', rt),
        Mutant("recipe suite optimizer keys do not win", rc, 'out["optimizer"] = {**training.optimizer, **(data.get("optimizer") or {})}',
               'out["optimizer"] = {**(data.get("optimizer") or {}), **training.optimizer}', rt),
        Mutant("recipe budget length ignored", rc, "budget = {**length, **budget}", "budget = budget", rt),
        Mutant("recipe task_options ignored", rc, "if training.task_options and isinstance", "if False and isinstance", rt),
        Mutant("recipe entry params do not override", rc, '"params": {**recipe.method.params, **params}', '"params": {**params, **recipe.method.params}', rt),
        Mutant("metadistil-cifar quiz_augment off", "plugins/kdbench_plugins/recipes/metadistil-cifar.yaml", "    quiz_augment: true ", "    quiz_augment: false ", official),
        Mutant("metadistil-cifar momentum buffer cold", "plugins/kdbench_plugins/recipes/metadistil-cifar.yaml", "    teacher_warm_steps: 66 ", "    teacher_warm_steps: 0 ", official),
        Mutant("metadistil-glue regression soft term not official", "plugins/kdbench_plugins/recipes/metadistil-glue.yaml",
               "    regression_soft: probabilities ", "    regression_soft: logits ", official),
        Mutant("metadistil-glue teacher schedule constant", "plugins/kdbench_plugins/recipes/metadistil-glue.yaml", "teacher_schedule: linear ", "teacher_schedule: constant ", official),
        Mutant("prokt-glue lam", "plugins/kdbench_plugins/recipes/prokt-glue.yaml", "lam: 0.4", "lam: 0.5", official),
    ]
    return out


def run(m: Mutant, verbose: bool, fork: bool = False) -> tuple[bool, float]:
    path = ROOT / m.path
    original = path.read_bytes()
    text = original.decode()
    if text.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the snippet occurs {text.count(m.old)} times in {m.path}; update tests/mutants.py")
    t0 = time.perf_counter()
    args = ["-x", "-q", "-p", "no:warnings", "-p", "no:cacheprovider", "-p", "no:randomly", *m.tests]
    try:
        path.write_text(text.replace(m.old, m.new))
        code = pytest_in_fork(args, verbose) if fork else subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT,
                                                                          capture_output=not verbose, text=True).returncode
    finally:
        path.write_bytes(original)
    return code != 0, time.perf_counter() - t0


#: third-party libraries a forked pytest finds already imported (kdbench's own modules are
#: never imported by the parent, so every child imports the mutated file afresh)
PRELOAD = ("numpy", "torch", "pydantic", "pluggy", "yaml", "pandas", "scipy.stats", "safetensors.torch", "tokenizers", "transformers",
           "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
           "pytest")


def pytest_in_fork(args: list[str], verbose: bool) -> int:
    """pytest's exit status, run in a child forked from this process after the heavy
    third-party imports (``--fork``): the same tests, without paying for importing torch
    and transformers once per mutation."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            os.chdir(ROOT)
            if not verbose:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            import pytest

            code = int(pytest.main(args))
        finally:
            os._exit(code)
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except BaseException:  # interrupted: the child goes too, and run() restores the file
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("-v", action="store_true", help="show pytest's output")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N chosen mutations (resume a run)")
    ap.add_argument("--count", type=int, default=None, help="run at most N mutations after the skipped ones")
    ap.add_argument("--fork", action="store_true", help="import torch and transformers once and fork a pytest per mutation (faster)")
    args = ap.parse_args()
    # restore the mutated file on SIGTERM too, and on Ctrl-C where a background shell ignored SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.fork and not args.list:
        for name in PRELOAD:
            importlib.import_module(name)
        assert not any(n == "kdbench" or n.startswith(("kdbench.", "kdbench_plugins")) for n in sys.modules), "the parent must not import kdbench"
    chosen = [m for m in mutants() if args.k in m.name][args.skip:]
    chosen = chosen[:args.count] if args.count is not None else chosen
    survivors = []
    for m in chosen:
        if args.list:
            count = (ROOT / m.path).read_text().count(m.old)
            print(("" if count == 1 else f"BAD SNIPPET ({count} found) ") + f"{m.name}: {m.path}  ->  {' '.join(m.tests)}")
            continue
        killed, seconds = run(m, args.v, args.fork)
        print(f"{'killed ' if killed else 'SURVIVED'} {seconds:5.0f}s  {m.name}  ({m.path})", flush=True)
        if not killed:
            survivors.append(m.name)
    if not args.list:
        print(f"{len(chosen) - len(survivors)} of {len(chosen)} killed" + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
