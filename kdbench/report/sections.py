"""The report's sections in order, each a display table (text cells) and a note, and the
legend that says how every number was computed. Shared by every format."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kdbench import stats
from kdbench.report.curves import CURVES_NOTE, MIN_TOLERANCE, curves_display
from kdbench.report.drift import DRIFT_NOTE, damage_note, disagreement_notes, drift_display
from kdbench.report.frame import LOSS, OFF_CPU, OFF_CPU_RATIO, OFF_CPU_WHY, WIN, reading_note
from kdbench.report.selection import selection_sections
from kdbench.report.truncation import any_truncated, truncation_note
from kdbench.report.frame import DEFAULT_MARGIN
from kdbench.report.tables import (EQUIV, FLAGGED, LOSS_SMALL, SMALL_N, TIE, WIN_SMALL, cell, comparison_display, fmt_num, fmt_p,
                                   spread_text)


def references_display(refs: pd.DataFrame) -> pd.DataFrame:
    def published(r: Any) -> str:
        text = fmt_num(r.reference) + (f" ± {r.ref_std:.2f}" if r.ref_std is not None and r.ref_std == r.ref_std else "")
        return text + (f" (n={int(r.ref_n)})" if r.ref_n is not None and r.ref_n == r.ref_n else "")

    return pd.DataFrame.from_records([{
        "task": r.task, "method": r.method, "teacher": r.teacher, "student": r.student, "metric": r.metric, "reference": published(r),
        "reproduced": fmt_num(r.reproduced), "difference": fmt_num(r.difference), "seeds": str(r.n),
        "95% CI": "-" if np.isnan(r.ci_low) else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]", "reference in CI": r.inside_ci,
        "protocol": r.protocol or "-", "citation": r.citation} for r in refs.itertuples()])


def sensitivity_display(scores: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame.from_records([{
        "task": r.task, "method": r.method, "factor": r.factor, "levels": str(r.levels), "held at": r.at or "-",
        "std": fmt_num(r.std), "max - min": fmt_num(r.range), "drop from best": fmt_num(r.drop_from_best),
        "seed std within setting": fmt_num(r.seed_std), "ANOVA F": fmt_num(r.anova_f), "ANOVA p": fmt_p(r.anova_p),
        "ANOVA": getattr(r, "design", "one-way"),
        "ANOVA p adj": fmt_p(r.anova_p_adj), "best": str(r.best_level), "worst": str(r.worst_level)} for r in scores.itertuples()])


def sweep_display(levels: pd.DataFrame) -> pd.DataFrame:
    """Per task, factor and level (rows), each method's mean ± std (n) (columns)."""
    rows: dict[tuple, dict[str, str]] = {}
    for r in levels.itertuples():
        row = rows.setdefault((r.task, r.factor, str(r.level)), {"task": r.task, "factor": r.factor, "level": str(r.level)})
        row[r.method] = cell(r.mean, r.std, r.n)
    return pd.DataFrame.from_records(list(rows.values())).fillna("-")


def _na(v: Any, digits: int = 2) -> str:
    """A number, or "n/a" where the store did not record it."""
    text = fmt_num(v, digits)
    return "n/a" if text == "-" else text


def _rel(v: Any) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.2f}x"


def _step(r: Any) -> str:
    if r.step_s_median != r.step_s_median:
        return "n/a"
    iqr = f" [{r.step_s_q25 * 1000:.1f}, {r.step_s_q75 * 1000:.1f}]" if r.step_s_q25 == r.step_s_q25 and r.step_s_q75 == r.step_s_q75 else " [IQR n/a]"
    return f"{r.step_s_median * 1000:.1f}{iqr}"


def _off_cpu_text(r: Any) -> str:
    if r.wall_cpu_max != r.wall_cpu_max:
        return "n/a"
    return f"{r.off_cpu} of {r.n} runs: wall > {OFF_CPU_RATIO:g}x CPU" if r.off_cpu else "no"


def cost_display(cost: pd.DataFrame, reference: str) -> pd.DataFrame:
    return pd.DataFrame.from_records([{
        "task": r.task, "method": r.method, "student": r.student, "runs": str(r.n), "score": fmt_num(r.score),
        "train (s)": spread_text(r.train_s, r.train_s_std), "train + teacher share (s)": _na(getattr(r, "train_with_teacher_s", np.nan)),
        "generation in steps (s)": _dash(r.generation_s, r.generation_s_std), "update (s)": _dash(r.update_s, r.update_s_std),
        "active train (s)": spread_text(r.active_train_s, r.active_train_s_std), "CPU (s)": _na(r.cpu_s, 1),
        "prep (s)": spread_text(r.prep_s, r.prep_s_std),
        "eval (s)": spread_text(r.eval_s, r.eval_s_std), "wall (s)": spread_text(r.wall_s, r.wall_s_std),
        "wall/CPU (max)": _na(r.wall_cpu_max, 1), f"{OFF_CPU} runs": _off_cpu_text(r),
        "step (ms) median [IQR]": _step(r), "memory (MB)": spread_text(r.mem_mb, r.mem_mb_std, 1), "memory kind": r.mem_kind or "n/a",
        "cached teacher outputs": r.shared_teacher_outputs,
        "params deployed": _na(r.params_deployed, 0), "params training": _na(r.params_training, 0),
        "passes per step": r.passes_per_step if isinstance(r.passes_per_step, str) else "-", "FLOPs teacher + student": _flops(r),
        f"active train vs {reference}": _rel(r.train_rel), f"CPU vs {reference}": _rel(r.cpu_rel), f"step vs {reference}": _rel(r.step_rel),
        f"memory vs {reference}": _rel(r.mem_rel), f"params vs {reference}": _rel(r.params_rel),
        f"FLOPs vs {reference}": _rel(r.flops_rel),
    } for r in cost.itertuples()])


def _dash(mean: float, std: float) -> str:
    """mean ± std, or "-" where the runs recorded no such time (a method that never samples)."""
    return "-" if mean != mean else spread_text(mean, std)


def _flops(r: Any) -> str:
    """Total counted FLOPs with the teacher's and the student's share; "-" where not recorded."""
    if r.train_flops != r.train_flops:
        return "-"
    return f"{r.train_flops:.3g} ({r.teacher_flops:.3g} + {r.student_flops:.3g})"


def teacher_cost_display(tc: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame.from_records([{
        "task": r.task, "teacher": r.teacher, "hash": r.hash, "fine-tuning train (s)": _na(r.train_s),
        "prep (s)": _na(r.prep_s), "eval (s)": _na(r.eval_s),
        "memory (MB)": _na(r.mem_mb, 1), "student runs using it": str(r.runs),
        "amortised train (s) per run": _na(r.amortised_train_s)} for r in tc.itertuples()])


def problems_display(problems: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame.from_records([{
        "hash": r.hash, "task": r.task, "method": r.method, "student": r.student, "seed": str(r.seed), "status": r.status,
        "diverged at step": fmt_num(r.diverged_step, 0) if r.diverged_step == r.diverged_step and r.diverged_step is not None else "-",
        "error": (r.error or "")[:160]} for r in problems.itertuples()])


def env_display(env: dict[str, list[str]]) -> pd.DataFrame:
    return pd.DataFrame({"field": list(env), "value": [", ".join(v) for v in env.values()]})


def chance_note(report: Any) -> str:
    parts = [f"{task}: {c['rule']}" + (f" ({c['error']})" if c.get("error") else "") for task, c in report.chance.items()]
    missing = sorted(set(report.board["task"]) - set(report.chance)) if not report.board.empty else []
    parts += [f"{t}: no chance row (no finished run with its data spec)" for t in missing]
    return "Chance rows: " + "; ".join(parts) if parts else ""


def family_line(report: Any) -> str:
    """The one line under the leaderboard that says what its marks mean (all formats)."""
    corr = stats.CORRECTION_METHOD[report.correction].split(" (")[0]
    need = stats.least_n(report.family) if report.family else None
    power = (f" With {report.family} comparisons no difference can be significant below n = {need} pairs." if need else "")
    return (f"{WIN}/{LOSS}: {corr}-adjusted p < {stats.ALPHA} against '{report.baseline}' (exact sign-flip test), "
            f"family of {report.family} comparisons; p_adj shown per cell; {WIN_SMALL}/{LOSS_SMALL}: significant but smaller "
            f"than the task's practical margin; {EQUIV}: equivalent within the margin (two one-sided tests).{power} "
            f"{SMALL_N} n < 3 (smallest attainable p: {stats.min_p(2):.2f} at n = 2, {stats.min_p(1):.0f} at n = 1). "
            f"{TIE} tied for best: 95% interval overlapping the best's and not significantly worse than the baseline."
            + flagged_line(report) + (f" {damage_note()}" if _any_damaged(report) else "") + off_cpu_line(report)
            + (f" {truncation_note()}" if any_truncated(report.board) else ""))


def off_cpu_line(report: Any) -> str:
    """What "(k off-CPU)" beside a leaderboard time means, when some row has it."""
    board = report.board
    if "off_cpu" not in board or not (board["off_cpu"].fillna(0) > 0).any():
        return ""
    return (f" Time/run (k {OFF_CPU}): k runs whose wall time exceeds {OFF_CPU_RATIO:g}x their CPU time ({OFF_CPU_WHY}), "
            "so their time is not their cost: compare CPU and active training time in the cost table.")


def flagged_line(report: Any) -> str:
    """Why a task's column is flagged (its teacher is not above chance by the margin)."""
    flagged = getattr(report, "flagged", {}) or {}
    if not flagged:
        return ""
    return " " + " ".join(f"{FLAGGED} {task}: {why}; its column ranks nothing and is left out of the averages."
                          for task, why in flagged.items())


def _any_damaged(report: Any) -> bool:
    board = report.board
    return "teacher_damaged" in board and bool((board["teacher_damaged"] != "").any())


def legend(report: Any) -> list[str]:
    """The sentences that say how every number was computed (in every file, and --verbose)."""
    return [
        f"Report made {report.date}. {reading_note(report.runs)}; cells are mean ± std "
        "(ddof=1) over seeds, n = finished seeds.",
        f"95% CI: {stats.CI_METHOD}.",
        f"Comparison with the baseline '{report.baseline}': {stats.TEST_METHOD} on the same task, student and seed. "
        f"Every comparison of the report is one family ({report.family} tests), corrected by "
        f"{stats.CORRECTION_METHOD[report.correction]}; {WIN} / {LOSS} mark a significant win / loss at adjusted "
        f"p < {stats.ALPHA}; 'n/a' when fewer than 2 matched seeds.",
        f"{SMALL_N}: n < 3; with n pairs the exact test cannot go below p = 2/2^n (0.50 at 2, 0.25 at 3, 0.0625 at 5); "
        f"corrected over a family of m it can be significant only from the least n with m x 2/2^n < {stats.ALPHA} "
        f"(here m = {report.family}: n ≥ {stats.least_n(report.family) if report.family else '-'}); cells below it say "
        "'impossible' in words.",
        damage_note(),
        *([truncation_note()] if any_truncated(report.board) else []),
        f"Δ 95% CI (exact): {stats.INTERVAL_METHOD}.",
        f"MDD 80%: {stats.POWER_METHOD}.",
        f"Practical margin: the smallest difference that matters, per task (the suite's 'margins', else {DEFAULT_MARGIN:g} "
        f"point for proportions and correlations on the x100 scale, none for unbounded metrics such as errors and losses): {margins_text(report)}. "
        f"A significant difference smaller than it is 'significant, below the margin' ({WIN_SMALL}/{LOSS_SMALL}); "
        f"'equivalent' ({EQUIV}) only when two one-sided exact sign-flip tests (TOST), corrected over their own family, "
        f"reject a difference of at least the margin each way. A task whose teacher is not above the chance row by more "
        f"than its margin is flagged {FLAGGED} and left out of the averages over tasks.",
        f"Best: bold only when its interval does not overlap the runner-up's; otherwise the tied cells carry {TIE}, "
        "except a cell significantly worse than the baseline, which is never tied for best.",
        "Failed, diverged and running runs are listed and counted, never averaged; so are runs of one row whose data "
        "fingerprints differ ('mixed data'), and runs in the store outside the suite.",
        "Average over tasks: the unweighted mean of the per-task mean score; a task's score is its main metric "
        "averaged over its test splits (e.g. MNLI matched and mismatched); shown only for rows with every task.",
        "Sensitivity: spread of the per-level mean scores across a sweep (std ddof=1; max - min; drop from best = best - "
        "mean of the levels) beside the pooled within-setting seed std and an ANOVA of the seed scores across levels, "
        "blocked by seed where every level ran the same seeds (two-way without replication), else one-way "
        "(scipy.stats.f_oneway); corrected over the report's sweeps; only the ANOVA says whether a factor matters. "
        "Less sensitive than the baseline: the method x factor interaction (the ANOVA blocked by seed of the per-seed "
        "difference across the levels, corrected over the report's interaction tests) beside each one's spread (max - "
        f"min of the level means) with a percentile bootstrap interval resampling seeds ({stats.BOOTSTRAP_DRAWS} draws, "
        f"seed {stats.BOOTSTRAP_SEED}; with few seeds such intervals are too narrow: the interaction test decides).",
        f"Cost: mean ± std over finished runs; train = training steps only (no evaluation, no one-off preparation, shown "
        f"as prep); step = median of the runs' median step time [their quartiles]; memory = the run's own figure "
        f"(its kind beside it); relative columns divide by the baseline '{report.cost_reference}' on the same task (and "
        "student); 'train + teacher share' adds the teacher's fine-tuning time divided by the runs that used it "
        "(labels-only runs add nothing); 'generation in steps' = sampling inside the training steps (on-policy "
        "methods; '-' for methods that never sample), 'update' = train minus it; n/a = not recorded by this store's "
        "version. Time off the CPU: 'CPU' is the "
        "process CPU time, 'active train' the steps x the median step time (a pause moves neither; load that slows "
        "every step raises the second); the relative training and CPU columns divide those, never the wall time; a run "
        f"whose wall time exceeds {OFF_CPU_RATIO:g}x its CPU time spent most of it off the CPU ({OFF_CPU_WHY}: the "
        f"ratio cannot tell which) and is counted as '{OFF_CPU}' in the cost table and beside the leaderboard's time.",
        "Compute, counted: passes per step = teacher (T) and student (S) forwards (F), backwards (B), forward-mode "
        "passes (J) and decode steps (D) counted in every training step, mean per step; FLOPs = the run's total "
        "(teacher + student), counted on step 1 and multiplied by passes: one pass of each kind counted on the first "
        "training batch with PyTorch's FLOP counter (matrix multiplications, convolutions, attention; not the "
        "method's own modules or loss, not decode steps), times its count; '-' = not recorded by this store's version.",
        "Chance: a constant prediction scored with the task's metric (majority class of the test split; regression: the "
        "training mean).",
        "Reference values are compared on the leaderboard's x100 scale.",
    ] + ([f"Learning curves: the validation main metric x100 at every evaluation step, mean ± std over finished seeds; "
          f"a curve is flat when its last change is at most max({MIN_TOLERANCE} points, the standard error of its last mean)."]
         if getattr(report, "curves", None) is not None and not report.curves.empty else [])


def margins_text(report: Any) -> str:
    """Each task's margin as the report used it."""
    if report.board.empty or "margin" not in report.board:
        return "no comparisons"
    pairs = report.board.dropna(subset=["margin"]).drop_duplicates("task")
    declared = getattr(report, "margins", {}) or {}
    parts = [f"{t} {m:.2f}" + (" (declared)" if t in declared else " (default)") for t, m in zip(pairs["task"], pairs["margin"])]
    return ", ".join(parts) or "none applies"


def interactions_display(inter: pd.DataFrame) -> pd.DataFrame:
    """Is a method less sensitive than the baseline to a factor: spreads with intervals and the interaction test."""
    def ci(a: float, lo: float, hi: float) -> str:
        return f"{a:.2f} [{lo:.2f}, {hi:.2f}]"

    return pd.DataFrame.from_records([{
        "task": r.task, "factor": r.factor, "method": r.method, "vs": r.other, "levels x seeds": f"{r.levels} x {r.seeds}",
        "spread (max - min) [95% CI]": ci(r.range, r.range_low, r.range_high),
        f"spread of {r.other} [95% CI]": ci(r.other_range, r.other_range_low, r.other_range_high),
        "difference [95% CI]": ci(r.range - r.other_range, r.range_diff_low, r.range_diff_high),
        "interaction F": fmt_num(r.interaction_f), "interaction p adj": fmt_p(r.interaction_p_adj),
    } for r in inter.itertuples()])


def provenance_sections(report: Any) -> list[tuple[str, pd.DataFrame | None, str]]:
    out: list[tuple[str, pd.DataFrame | None, str]] = [("Commits of the runs", report.commits, f"Report made {report.date}.")]
    out.append(("Data fingerprints", report.data, ""))
    if not report.mixed.empty:
        out.append(("Rows whose runs read different data (not averaged)", report.mixed.reset_index(drop=True), ""))
    if not report.outside.empty:
        out.append(("Runs in the store outside this suite (not averaged)", report.outside, ""))
    return out


def comparison_note(report: Any) -> str:
    """Beside the comparison: where a teacher-updating method's difference from the
    baseline has one sign on validation and the other on test."""
    dis = getattr(report, "disagreements", None)
    if dis is None or dis.empty:
        return ""
    return " ".join(disagreement_notes(dis, several_students=dis["student"].nunique() > 1 or report.runs["student"].nunique() > 1))


def drift_section(report: Any) -> list[tuple[str, pd.DataFrame | None, str]]:
    """Teacher drift (teacher-updating methods), or a line saying the runs did not record it."""
    drift = getattr(report, "drift", None)
    if drift is not None and not drift.empty:
        return [("Teacher drift", drift_display(drift), DRIFT_NOTE)]
    if getattr(report, "updating", None):
        missing = pd.DataFrame({"method": report.updating, "teacher drift": "not recorded"})
        return [("Teacher drift", missing, "These runs of methods that update their teacher were stored before kdbench "
                                           "logged the live teacher at each evaluation.")]
    return []


CURVES = "Learning curves"
#: figure name prefix (kdbench.report.plots) -> the title of the section it is shown under
FIGURE_SECTIONS = {"sensitivity": "Sweeps", "pareto": "Cost", "curves": CURVES}


def figures_for(title: str, names: Any) -> list[str]:
    """The figure names (of ``names``) shown under the section ``title``, in their order."""
    return [n for n in names if FIGURE_SECTIONS.get(n.split("-", 1)[0]) == title]


def curves_section(report: Any) -> list[tuple[str, pd.DataFrame | None, str]]:
    """The students' validation curves and whether each has flattened; none when no run
    evaluated more than once."""
    curves = getattr(report, "curves", None)
    if curves is None or curves.empty:
        return []
    return [(CURVES, curves_display(curves, report.flatness), CURVES_NOTE)]


def sections(report: Any) -> list[tuple[str, pd.DataFrame | None, str]]:
    """(title, table, note) in file order; a None table is a text-only note."""
    out: list[tuple[str, pd.DataFrame | None, str]] = [("Leaderboard", report.wide(), family_line(report) + " " + chance_note(report))]
    out.append((f"Statistics and paired comparison vs {report.baseline}",
                comparison_display(report.board, report.baseline, report.correction), comparison_note(report)))
    out += selection_sections(report)  # method entries with grid_selection (none otherwise)
    if not report.references.empty:
        out.append(("Paper comparison", references_display(report.references), ""))
    out += drift_section(report)
    out += curves_section(report)
    if not report.sens_scores.empty:
        verdicts = " ".join(f"{r.task}: {r.verdict}." for r in report.sens_scores.itertuples())
        out.append(("Sensitivity", sensitivity_display(report.sens_scores), verdicts))
        inter = getattr(report, "interactions", None)
        if inter is not None and not inter.empty:
            others = ", ".join(dict.fromkeys(inter["other"]))  # the entries compared with: the baseline, or a labelled entry of its method
            out.append((f"Less sensitive than {others}?", interactions_display(inter),
                        " ".join(f"{r.task}: {r.answer}." for r in inter.itertuples())))
        out.append(("Sweeps", sweep_display(report.sens_levels), ""))
    if not report.cost.empty:
        out.append(("Cost", cost_display(report.cost, report.cost_reference), ""))
    if not report.teacher_cost.empty:
        out.append(("Teacher fine-tuning cost", teacher_cost_display(report.teacher_cost), ""))
    if not report.problems.empty:
        out.append(("Runs that did not finish", problems_display(report.problems), ""))
    out += provenance_sections(report)
    if report.env:
        out.append(("Environment", env_display(report.env), ""))
    return out
