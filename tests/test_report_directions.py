"""Two report defects, each against a committed store (copied, never written):

* the figures' score axes name the task's metric, its scale and its direction as the
  tables do (regression-mse-cpu: "mse x1, lower is better", never "score x100"), and the
  Pareto front of a lower-is-better metric keeps the points nothing beats on cost *and* a
  smaller error (recomputed here from the cost table);
* the "Less sensitive than ...?" table is headed and filled with the method entries'
  labels (vision-cpu-2021: the temperature sweeps are those of the entries labelled
  dkd+ls and kd+ls, compared with each other, not "dkd vs kd"), with the spreads those
  labelled entries' runs give, recomputed here from the store."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from kdbench.report import build_report, plots
from kdbench.report.text import render_report
from kdbench.spec import load_suite
from kdbench.store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]


def _report(name: str, folder: Path):
    shutil.copy(ROOT / "results" / name / "store.sqlite", folder / "store.sqlite")
    suite = load_suite(ROOT / "benchmarks" / f"{name}.yaml")
    return build_report(ResultsStore(folder / "store.sqlite"), [r.hash for r in suite.runs], suite_spec=suite.spec, title=name)


def test_figures_name_the_metric_and_its_direction(tmp_path, monkeypatch):
    rep = _report("regression-mse-cpu", tmp_path)
    seen: dict[str, dict] = {}

    def capture(fig):
        ax = fig.axes[0]
        front = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
        seen[ax.get_title()] = {"ylabels": [a.get_ylabel() for a in fig.axes],
                                "front": sorted(zip(front[0].get_xdata(), front[0].get_ydata())) if front else None}
        plots.plt.close(fig)
        return b""

    monkeypatch.setattr(plots, "_png", capture)
    names = plots.report_plots(rep)
    assert {n.split("-")[0] for n in names} >= {"sensitivity", "pareto"}
    labels = [y for s in seen.values() for y in s["ylabels"] if y]
    assert labels and all("mse x1, lower is better (movie-rating)" in y for y in labels), labels
    assert not any("score x100" in y for y in labels)
    # the front by the metric's direction: no other point both no costlier and no worse (a larger MSE is worse)
    cost = rep.cost[rep.cost["task"] == "movie-rating"].dropna(subset=["active_train_s", "score"])
    c, s = cost["active_train_s"].to_numpy(float), cost["score"].to_numpy(float)
    expected = sorted((c[i], s[i]) for i in range(len(c))
                      if not np.any((c <= c[i]) & (s <= s[i]) & ((c < c[i]) | (s < s[i]))))
    (pareto,) = [v for t, v in seen.items() if t.startswith("Score vs cost")]
    assert len(pareto["front"]) == len(expected) and np.allclose(pareto["front"], expected)
    assert min(s) in [p[1] for p in pareto["front"]]  # the lowest error is always on the front


def test_less_sensitive_table_names_the_labelled_entries(tmp_path):
    rep = _report("vision-cpu-2021", tmp_path)
    inter = rep.interactions
    assert list(zip(inter["method"], inter["other"], inter["factor"])) == [("dkd+ls", "kd+ls", "temperature")]
    md = render_report(rep, "md")
    assert "## Less sensitive than kd+ls?" in md and "## Less sensitive than kd?" not in md
    assert "no evidence that dkd+ls and kd+ls respond differently to temperature" in md
    assert set(rep.sens_scores["method"]) == {"dist", "dkd+ls", "kd+ls", "reviewkd"}
    # the spreads are those of the labelled entries' runs (logit standardisation on), from the store
    db = sqlite3.connect(f"file:{ROOT / 'results' / 'vision-cpu-2021' / 'store.sqlite'}?mode=ro", uri=True)
    by: dict[tuple[str, float], list[float]] = {}
    for method, params, metrics in db.execute("select method, params, metrics from runs where status = 'done'"):
        p, m = json.loads(params), json.loads(metrics)
        if method in ("dkd", "kd") and p.get("logit_standardization"):
            by.setdefault((method, p["temperature"]), []).append(100 * m["test"][m["main_metric"]])
    spread = {k: max(np.mean(v) for (m, _), v in by.items() if m == k) - min(np.mean(v) for (m, _), v in by.items() if m == k)
              for k in ("dkd", "kd")}
    row = inter.iloc[0]
    assert (row["range"], row["other_range"]) == pytest.approx((spread["dkd"], spread["kd"]))
    assert all(len(v) == 10 for v in by.values()) and len(by) == 6
