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
        Mutant("teacher SGD momentum dropped", "kdbench/losses.py", "lr=lr, momentum=momentum, weight_decay=weight_decay)",
               "lr=lr, momentum=0.0, weight_decay=weight_decay)", md_tests[:1]),
        Mutant("teacher SGD weight decay dropped", "kdbench/losses.py", "lr=lr, momentum=momentum, weight_decay=weight_decay)",
               "lr=lr, momentum=momentum, weight_decay=0.0)", md_tests[:1]),
        Mutant("teacher AdamW weight decay dropped", "kdbench/losses.py", "AdamW(params, lr=lr, weight_decay=weight_decay,",
               "AdamW(params, lr=lr, weight_decay=0.0,", md_tests[:1]),
        Mutant("scheduled teacher lr applied one step late", "kdbench/losses.py",
               '    for group in optimizer.param_groups:\n        group["lr"] = lr\n    optimizer.step()\n',
               '    optimizer.step()\n    for group in optimizer.param_groups:\n        group["lr"] = lr\n', md_tests[:1]),
        Mutant("teacher clip value ignored", "kdbench/losses.py", "nn.utils.clip_grad_norm_(params, clip)", "nn.utils.clip_grad_norm_(params, 1.0)", md_tests[:1]),
        Mutant("linear teacher schedule off by one step", "kdbench/losses.py", "(ctx.total_steps - ctx.step) /", "(ctx.total_steps - ctx.step + 1) /", md_tests),
        Mutant("follow_student teacher lr not renormalised", "kdbench/losses.py", "return schedule_ratio(ctx) / at_start if at_start else 0.0",
               "return schedule_ratio(ctx)", md_tests),
        # -- MetaDistil, one per option and the step's structure
        Mutant("metadistil virtual_lr ignored", md, "return self.params.virtual_lr * (", "return 5e-5 * (", md_tests),
        Mutant("metadistil teacher_lr ignored (rate)", md, "lr = p.teacher_lr * teacher_lr_factor", "lr = 1e-5 * teacher_lr_factor", md_tests),
        Mutant("metadistil teacher_optimizer ignored", md, "build_teacher_optimizer(ctx.teacher, p.teacher_optimizer,",
               'build_teacher_optimizer(ctx.teacher, "adamw",', md_tests),
        Mutant("metadistil teacher_weight_decay ignored", md, "p.teacher_lr, p.teacher_weight_decay, p.teacher_momentum)",
               "p.teacher_lr, 0.0, p.teacher_momentum)", md_tests),
        Mutant("metadistil teacher_momentum ignored", md, "p.teacher_lr, p.teacher_weight_decay, p.teacher_momentum)",
               "p.teacher_lr, p.teacher_weight_decay, 0.9)", md_tests),
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
        (M + "dkd.py", "dkd temperature", "batch.labels, p.temperature)", "batch.labels, 4.0)", "tests/test_dkd.py"),
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
    # -- recipes: how a recipe's training block reaches the suite, and the recipe values themselves
    rc = "kdbench/recipes.py"
    rt = tuple(f"tests/test_recipes.py::{t}" for t in ("test_recipe_entry_expands_to_the_explicit_suite", "test_recipe_training_expands_to_the_explicit_suite",
                                                       "test_entry_params_override_and_sweep", "test_paper_cifar100_uses_the_recipes"))
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


def run(m: Mutant, verbose: bool) -> tuple[bool, float]:
    path = ROOT / m.path
    original = path.read_bytes()
    text = original.decode()
    if text.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the snippet occurs {text.count(m.old)} times in {m.path}; update tests/mutants.py")
    t0 = time.perf_counter()
    try:
        path.write_text(text.replace(m.old, m.new))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:warnings", "-p", "no:cacheprovider", "-p", "no:randomly", *m.tests]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=not verbose, text=True)
    finally:
        path.write_bytes(original)
    return done.returncode != 0, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("-v", action="store_true", help="show pytest's output")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N chosen mutations (resume a run)")
    args = ap.parse_args()
    chosen = [m for m in mutants() if args.k in m.name][args.skip:]
    survivors = []
    for m in chosen:
        if args.list:
            count = (ROOT / m.path).read_text().count(m.old)
            print(("" if count == 1 else f"BAD SNIPPET ({count} found) ") + f"{m.name}: {m.path}  ->  {' '.join(m.tests)}")
            continue
        killed, seconds = run(m, args.v)
        print(f"{'killed ' if killed else 'SURVIVED'} {seconds:5.0f}s  {m.name}  ({m.path})", flush=True)
        if not killed:
            survivors.append(m.name)
    if not args.list:
        print(f"{len(chosen) - len(survivors)} of {len(chosen)} killed" + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
