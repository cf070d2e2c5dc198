"""Learning curves (issue 13 item 1): the report shows each leaderboard row's validation
score at every evaluation step (mean ± std over finished seeds), says whether the curve
has flattened by the rule of its note, and plots it per task. Stores are made up here with
chosen histories; every number is recomputed from them with numpy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kdbench.report import build_report, render_report, write_outputs
from kdbench.report.curves import CURVE_COLS, flatness, share
from kdbench.report.plots import report_plots, shared_lr
from kdbench.report.sections import legend, sections
from kdbench.spec import build_suite
from kdbench.store import DONE, FAILED, ResultsStore
from kdbench.train.evaluation import VALIDATION, select_metrics
from support.suites import smoke_data

SEEDS = [0, 1, 2]
STEPS = [100, 200, 300]
NONE, KD1, KD4 = "none", "kd(temperature=1.0)", "kd(temperature=4.0)"
#: leaderboard label -> the validation accuracy of seed 0 at each step, and each seed's offset
CURVES = {
    NONE: ([0.60, 0.70, 0.702], [0.0, 0.004, 0.008]),  # +10 then +0.2: flat over the last interval only
    KD1: ([0.60, 0.65, 0.70], [0.0, 0.004, 0.008]),  # +5 over the last interval: still rising
    KD4: ([0.60, 0.61, 0.62], [-0.03, 0.0, 0.03]),  # +1 twice, but a seed std of 3: flat within noise
}


def label(spec) -> str:
    return NONE if spec.method == "none" else f"kd(temperature={spec.params['temperature']})"


def scores(spec, steps=STEPS) -> list[float]:
    base, offsets = CURVES[label(spec)]
    return [v + offsets[spec.seed] for v in base][: len(steps)]


def curve_suite(suite_changes=None, **kd) -> dict:
    return smoke_data(seeds=SEEDS + [3], methods=[{"name": "none"}, {"name": "kd", "params": {"alpha": 0.5, "temperature": [1.0, 4.0]}, **kd}],
                      **(suite_changes or {}))


def curve_store(path, steps=STEPS, suite_changes=None, **kd):
    """Every run of seeds 0-2 finished with the history of ``CURVES``; seed 3 failed with a
    history far off, which must never be averaged. The smoke suite's budget is 20 steps,
    so the histories (to step 300) do not fit its schedule unless ``suite_changes`` says
    otherwise."""
    suite = build_suite(curve_suite(suite_changes, **kd), source="curves-test")
    store = ResultsStore(path)
    for spec in suite.runs:
        assert store.claim(spec)
        if spec.seed == 3:
            store.finish(spec, FAILED, metrics={"main_metric": "accuracy"}, error="boom",  # readable, so only the status keeps it out
                         history=[{"step": s, VALIDATION: {"accuracy": 0.0}} for s in steps])
            continue
        history = [{"step": s, VALIDATION: {"accuracy": v}, "test": {"accuracy": v - 0.05}} for s, v in zip(steps, scores(spec, steps))]
        store.finish(spec, DONE, metrics=select_metrics(history, "final", "accuracy"), history=history, cost={"wall_s": 1.0},
                     env={"git_commit": "abc"})
    return suite, store


def report_of(path, steps=STEPS, suite_changes=None, **kd):
    suite, store = curve_store(path, steps, suite_changes, **kd)
    return build_report(store, [r.hash for r in suite.runs], suite_spec=suite.spec, title="curves", chance=False)


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    return report_of(tmp_path_factory.mktemp("curves") / "store.sqlite")


def by_hand(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std ddof=1) x100 per step over seeds 0-2 of the row ``name``."""
    base, offsets = CURVES[name]
    x = np.array([[(v + offsets[s]) * 100 for v in base] for s in SEEDS])
    return x.mean(axis=0), x.std(axis=0, ddof=1)


def test_the_history_keys_are_the_runners():
    from kdbench.report import curves, frame
    from kdbench.train import evaluation

    assert curves.VALIDATION == evaluation.VALIDATION and frame.STEP == "step"


def test_the_curve_is_the_mean_and_std_over_finished_seeds_at_every_step(rep):
    assert list(rep.curves.columns) == CURVE_COLS
    assert set(rep.curves["method"]) == set(CURVES) <= set(rep.board["method"])  # the leaderboard's labels
    for name in CURVES:
        rows = rep.curves[rep.curves["method"] == name].sort_values("step")
        mean, std = by_hand(name)
        assert list(rows["step"]) == STEPS and list(rows["n"]) == [3, 3, 3]  # the failed seed 3 is not counted
        assert rows["mean"].to_numpy() == pytest.approx(mean, abs=1e-9) and rows["std"].to_numpy() == pytest.approx(std, abs=1e-9)
    kd4 = rep.curves[(rep.curves["method"] == KD4) & (rep.curves["step"] == 300)].iloc[0]
    assert (kd4["mean"], kd4["std"]) == pytest.approx((62.0, 3.0))  # [59, 62, 65]


def test_the_verdicts_follow_the_rule(rep):
    f = rep.flatness.set_index("method")
    assert f.loc[KD1, "state"] == "rising" and f.loc[KD1, "change"] == pytest.approx(5.0)
    assert f.loc[KD1, "tolerance"] == pytest.approx(0.5)  # the seed std 0.4 / sqrt(3) is below the floor
    assert f.loc[KD1, "verdict"].startswith("still rising: +5.00 over the last interval (tolerance 0.50; seed std 0.40)")
    assert f.loc[NONE, "state"] == "flat" and f.loc[NONE, "change"] == pytest.approx(0.2)
    assert f.loc[NONE, "earlier_change"] == pytest.approx(10.0) and "flat for one interval only" in f.loc[NONE, "verdict"]
    # +1.00 is more than 0.5 points but inside the standard error of the last mean, 3 / sqrt(3)
    assert f.loc[KD4, "tolerance"] == pytest.approx(3 / np.sqrt(3)) and f.loc[KD4, "change"] == pytest.approx(1.0)
    assert f.loc[KD4, "state"] == "flat" and f.loc[KD4, "verdict"].endswith("and +1.00 over the interval before")
    assert list(f["last_step"]) == [300] * 3 and list(f["prev_step"]) == [200] * 3


def curve_frame(means: list[float], std: float = 0.3, n: int = 3, lr: float = np.nan) -> pd.DataFrame:
    return pd.DataFrame({"task": "t", "method": "m", "method_name": "m", "student": "s", "step": range(1, len(means) + 1),
                         "metric": "accuracy", "n": n, "mean": means, "std": std, "lr": lr})[CURVE_COLS]


@pytest.mark.parametrize("means, state, text", [
    ([80.0, 78.0], "falling", "falling: -2.00 over the last interval"),
    ([80.0, 80.4], "flat", "only two evaluations"),
    ([80.0, 80.6], "rising", "still rising: +0.60"),
    ([70.0, 80.0, 79.6], "flat", "but +10.00 over the interval before"),
])
def test_flat_rising_and_falling_on_constructed_curves(means, state, text):
    (row,) = flatness(curve_frame(means)).itertuples()
    assert row.state == state and text in row.verdict and row.change == pytest.approx(means[-1] - means[-2])


def test_one_seed_has_no_noise_estimate_and_keeps_the_floor():
    (row,) = flatness(curve_frame([50.0, 50.4], std=np.nan, n=1)).itertuples()
    assert row.tolerance == 0.5 and row.state == "flat" and "one seed: no seed std" in row.verdict


def test_the_section_shows_the_numbers_and_the_rule(rep):
    (title, table, note), = [s for s in sections(rep) if s[0] == "Learning curves"]
    row = table.set_index("method").loc[KD4]
    assert row["seeds"] == "3" and row["step 300"] == "62.00 ± 3.00" and row["last change"] == "+1.00 (200 → 300)"
    mean, std = by_hand(NONE)
    assert table.set_index("method").loc[NONE, "step 100"] == f"{mean[0]:.2f} ± {std[0]:.2f}"
    assert "max(0.5 points, standard error of the last mean" in note and "learning-rate decay" in note
    titles = [s[0] for s in sections(rep)]
    assert titles.index("Learning curves") < titles.index("Cost")
    assert any(line.startswith("Learning curves: ") for line in legend(rep))


def test_the_section_is_absent_with_one_evaluation(tmp_path):
    rep = report_of(tmp_path / "store.sqlite", steps=STEPS[:1])
    assert rep.curves.empty and rep.flatness.empty
    assert "Learning curves" not in [s[0] for s in sections(rep)] and not any("Learning curves" in x for x in legend(rep))
    assert not any(name.startswith("curves-") for name in report_plots(rep))
    assert "Learning curves" not in render_report(rep, "md")


def test_every_format_shows_the_curves_and_the_plot(rep, tmp_path):
    files = write_outputs(rep, ["md", "html", "json", "csv", "latex"], tmp_path)
    text = {p.name: p.read_bytes() for p in files}
    png = tmp_path / "plots" / "curves-movie-sentiment.png"
    assert png in files and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = text["leaderboard.md"].decode()
    assert "## Learning curves" in md and "](plots/curves-movie-sentiment.png)" in md
    assert md.index("](plots/curves-movie-sentiment.png)") > md.index("## Learning curves")
    html = text["report.html"].decode()
    assert "id='section-curves'" in html and "id='plot-curves-movie-sentiment'" in html
    assert "Learning curves" in text["leaderboard.tex"].decode()
    full = json.loads(text["report.json"])
    assert len(full["learning_curves"]) == len(CURVES) * len(STEPS)
    assert {r["method"]: r["state"] for r in full["learning_curve_flatness"]} == {NONE: "flat", KD1: "rising", KD4: "flat"}
    side = pd.read_csv(tmp_path / "leaderboard.curves.csv")
    mean, std = by_hand(KD1)
    kd1 = side[side["method"] == KD1].sort_values("step")
    assert kd1["mean"].to_numpy() == pytest.approx(mean) and kd1["std"].to_numpy() == pytest.approx(std)
    assert "leaderboard.curves_flatness.csv" in text


def test_the_terminal_shows_the_verdicts_and_the_steps_only_when_verbose(rep):
    short, long = render_report(rep, "terminal"), render_report(rep, "terminal", verbose=True)
    for out in (short, long):
        assert "Learning curves" in out and "still rising: +5.00" in out
    assert "step 300" not in short and "step 300" in long


def test_the_plot_has_one_line_and_band_per_row(rep, monkeypatch):
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", lambda self, x, lo, hi, **kw: drawn.append((list(x), list(lo), list(hi))))
    report_plots(rep)
    assert len(drawn) == len(CURVES)
    mean, std = by_hand(KD4)
    assert ([100, 200, 300], pytest.approx(list(mean - std)), pytest.approx(list(mean + std))) in drawn


def test_grid_selection_curves_follow_the_chosen_setting(tmp_path):
    """With grid_selection the leaderboard has one kd row (the setting best on validation,
    temperature 1.0 here); the curves show that row under the same label, not the sweep."""
    rep = report_of(tmp_path / "store.sqlite", grid_selection="validation")
    row = "kd (selected on validation from 2 settings)"
    assert set(rep.curves["method"]) == {NONE, row} and row in set(rep.board["method"])
    mean, _ = by_hand(KD1)
    assert rep.curves[rep.curves["method"] == row].sort_values("step")["mean"].to_numpy() == pytest.approx(mean)


BUDGET_300 = {"steps": 300, "batch_size": 16, "eval_every": 100}


@pytest.mark.parametrize("optimizer, lr", [
    # warmup over int(0.1 * 300) = 30 updates, then (300 - k) / 270: the updates 0..99, 100..199, 200..299
    ({"schedule": "linear", "warmup_ratio": 0.1},
     [(sum((k + 1) / 30 for k in range(30)) + sum((300 - k) / 270 for k in range(30, 100))) / 100,
      sum((300 - k) / 270 for k in range(100, 200)) / 100, sum((300 - k) / 270 for k in range(200, 300)) / 100]),
    ({"schedule": "constant"}, [1.0, 1.0, 1.0]),
    ({"schedule": "multistep", "milestones": [250], "gamma": 0.1}, [1.0, 1.0, (50 * 1.0 + 50 * 0.1) / 100]),
])
def test_the_learning_rate_over_each_interval_is_the_schedules(tmp_path, optimizer, lr):
    rep = report_of(tmp_path / "store.sqlite", suite_changes={"budget": BUDGET_300, "optimizer": {"name": "adamw", "lr": 0.001, **optimizer}})
    for name in CURVES:
        rows = rep.curves[rep.curves["method"] == name].sort_values("step")
        assert rows["lr"].to_numpy() == pytest.approx(lr, abs=1e-12)
    f = rep.flatness.set_index("method")
    assert f["lr_last"].to_numpy() == pytest.approx([lr[-1]] * 3, abs=1e-12)
    table = dict(next(s for s in sections(rep) if s[0] == "Learning curves")[1].set_index("method")["lr over it"])
    assert table[KD4] == f"{lr[-1]:.0%} of peak"
    steps, shares = zip(*shared_lr(rep.curves))  # drawn on the curves plot
    assert steps == (100, 200, 300) and shares == pytest.approx(lr, abs=1e-12)
    assert shared_lr(rep.curves.assign(lr=rep.curves["lr"].where(rep.curves["method"] != NONE, 0.3))) is None  # rows differ: not drawn
    if lr[-1] < 0.5:  # linear: 50.5 / 270 = 19% of the peak over the last interval; KD4 and none are flat there
        assert "at a learning rate 19% of its peak: the decaying schedule flattens the curve by itself" in f.loc[KD4, "verdict"]
        assert f.loc[KD1, "verdict"].endswith("learning rate 19% of its peak over that interval")  # still rising, even so
    elif lr[-1] < 1:
        assert f.loc[KD4, "verdict"].endswith("; learning rate 55% of its peak over that interval") and "flattens" not in f.loc[KD4, "verdict"]
    else:
        assert "learning rate" not in f.loc[KD4, "verdict"]


def test_a_history_past_the_runs_steps_gets_no_learning_rate(rep):
    # the smoke budget is 20 steps; the made-up evaluations are at 100-300: no rate is claimed
    assert rep.curves["lr"].isna().all() and "learning rate" not in " ".join(rep.flatness["verdict"])


@pytest.mark.parametrize("lr, low", [(0.49, True), (0.5, False), (np.nan, False)])
def test_flat_at_a_low_rate_is_said_to_be(lr, low):
    (row,) = flatness(curve_frame([80.0, 80.1, 80.2], lr=lr)).itertuples()
    assert row.state == "flat" and ("flattens the curve by itself" in row.verdict) == low


@pytest.mark.parametrize("x, text", [(1.0, "100%"), (0.1146, "11%"), (0.1, "10%"), (0.0551, "5.5%"), (0.001, "0.1%"), (0.0, "0%")])
def test_a_small_learning_rate_share_is_not_rounded_to_zero(x, text):
    assert share(x) == text
