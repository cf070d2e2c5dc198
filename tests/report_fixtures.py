"""A synthetic results store for the report tests: real run specs from a small suite,
stored with ResultsStore.claim/finish and metrics made up so that the truth is known.

Baseline is ``none``. Per seed s there is a shared seed effect ``base[s]``; then
* ``none``            = base                   (the baseline)
* ``kd`` T=1          = base exactly           (identical to the baseline: p = 1)
* ``kd`` T=2 (centre) = base + 0.03 + tiny noise  (better by construction: a win)
* ``kd`` T=4          = base - 0.02 + tiny noise  (worse by construction: a loss)
* ``kd`` alpha 0.1/0.9 at T=2, and T=2 on the second student, same distribution as the
  baseline but independent noise (not significant for this fixed draw).
Plus one failed run and one diverged run, which must never be averaged.
"""

from __future__ import annotations

import copy
import zlib
from pathlib import Path

import numpy as np
import yaml

from kdbench.spec import build_suite
from kdbench.store import DIVERGED, DONE, FAILED, ResultsStore

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"
SEEDS = [0, 1, 2, 3, 4]


def suite_data() -> dict:
    data = yaml.safe_load(SMOKE.read_text())
    data["name"] = "report-synthetic"
    small = copy.deepcopy(data["students"][0])
    big = copy.deepcopy(small)
    big["options"]["tiny"]["layers"] = 2
    big["label"] = "tiny-2L"
    data["students"] = [small, big]
    data["methods"] = [
        {"name": "none"},
        {"name": "kd", "params": {"alpha": 0.5, "temperature": [1.0, 2.0, 4.0]}, "students": ["tiny-1L"]},
        {"name": "kd", "params": {"alpha": [0.1, 0.9], "temperature": 2.0}, "students": ["tiny-1L"]},
        {"name": "kd", "params": {"alpha": 0.5, "temperature": 2.0}, "students": ["tiny-2L"]},
    ]
    data["seeds"] = SEEDS
    data["baseline"] = "none"
    data["references"] = [{"task": "movie-sentiment", "method": "none", "value": 70.0, "student": "tiny-1L",
                           "citation": "Made-up et al. 2024, Table 1"}]
    return data


def synthetic_score(method: str, params: dict, student: str, seed: int) -> float | None:
    rng = np.random.default_rng(1000 + seed)
    base = 0.70 + 0.05 * rng.standard_normal()
    noise = np.random.default_rng(zlib.crc32(repr((method, sorted(params.items()), student, seed)).encode()))
    if method == "none":
        return base
    t, a = params["temperature"], params["alpha"]
    if student == "tiny-1L" and a == 0.5 and t == 1.0:
        return base
    if student == "tiny-1L" and a == 0.5 and t == 2.0:
        return base + 0.03 + 0.002 * noise.standard_normal()
    if student == "tiny-1L" and a == 0.5 and t == 4.0:
        return base - 0.02 + 0.002 * noise.standard_normal()
    return 0.70 + 0.05 * noise.standard_normal()


FAIL = ("none", "tiny-2L", 4)  # (method, student, seed) recorded as failed
DIVERGE = ("kd", "tiny-2L", 3)


def build_store(path: Path):
    """Returns (suite, store)."""
    suite = build_suite(suite_data(), source="synthetic")
    store = ResultsStore(path)
    for i, spec in enumerate(suite.runs):
        assert store.claim(spec)
        key = (spec.method, spec.student_label, spec.seed)
        env = {"device_name": "CPU x2", "torch": "2.x-test", "kdbench": "0.1.0"}
        if key == FAIL:
            store.finish(spec, FAILED, error="Traceback...\nRuntimeError: boom", env=env)
            continue
        if key == DIVERGE:
            store.finish(spec, DIVERGED, error="loss became nan at step 7", diverged_step=7, env=env)
            continue
        score = synthetic_score(spec.method, spec.params, spec.student_label, spec.seed)
        metrics = {"step": 20, "selection": "final", "main_metric": "accuracy",
                   "validation": {"accuracy": score - 0.01}, "test": {"accuracy": score, "f1": score - 0.02}}
        # cost: kd costs ~2x none; a bigger student more memory
        factor = 2.0 if spec.method == "kd" else 1.0
        cost = {"wall_s": factor * (10 + spec.seed), "device_s": factor * (8 + spec.seed), "step_s": factor * 0.05,
                "peak_mem_mb": 500.0 + (100 if spec.student_label == "tiny-2L" else 0), "steps": 20,
                "student_params": 1000 + (500 if spec.student_label == "tiny-2L" else 0),
                "device_time_kind": "process_cpu", "peak_mem_kind": "process_rss", "train_s": factor * 9}
        store.finish(spec, DONE, metrics=metrics, history=[{"step": 20, **metrics}], cost=cost, env=env)
    return suite, store


# ----------------------------------------------------------------- independent recomputation


def label(method: str, params: dict) -> str:
    """The synthetic suite's row label (kd's alpha and temperature vary; none has no params)."""
    return method if not params else f"{method}({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"


def expected(rows: list[dict], baseline: str = "none") -> dict[tuple[str, str], dict]:
    """Per (label, student), straight from the raw store rows with numpy/scipy: the numbers
    every report format must show."""
    from scipy import stats as st

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((label(r["method"], r["params"]), r["student"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        done = {r["seed"]: r["metrics"]["test"]["accuracy"] * 100 for r in rs if r["status"] == "done"}
        x = np.array(list(done.values()))
        e = {"n": len(x), "mean": x.mean(), "std": x.std(ddof=1),
             "failed": sum(r["status"] == "failed" for r in rs), "diverged": sum(r["status"] == "diverged" for r in rs)}
        e["ci_low"], e["ci_high"] = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
        method = rs[0]["method"]
        if method != baseline:
            base = {r["seed"]: r["metrics"]["test"]["accuracy"] * 100 for r in rows
                    if r["method"] == baseline and r["student"] == key[1] and r["status"] == "done"}
            seeds = sorted(set(done) & set(base))
            a, b = np.array([done[s] for s in seeds]), np.array([base[s] for s in seeds])
            e["pairs"], e["diff"] = len(seeds), float((a - b).mean())
            e["p"] = 1.0 if np.allclose(a, b, rtol=0, atol=0) else float(st.ttest_rel(a, b).pvalue)
            e["result"] = "n.s." if e["p"] >= 0.05 else ("win" if e["diff"] > 0 else "loss")
        out[key] = e
    return out


def parse_cell(text: str) -> tuple[float, float | None, int]:
    """'72.92 ± 3.67 (n=5) ▲' (maybe in ** or <b>) -> (72.92, 3.67, 5)."""
    import re

    m = re.search(r"([-\d.]+)(?: ± ([-\d.]+))? \(n=(\d+)\)", text)
    assert m, text
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None), int(m.group(3))


def check_rows(stats_rows: list[dict[str, str]], board_rows: list[dict[str, str]], exp: dict, baseline: str = "none") -> int:
    """Compare a report's displayed tables (lists of {column: text}) with ``exp``; returns
    the number of values checked. Displayed numbers have 2 decimals (p: 4, or 2 significant)."""
    checked = 0
    for r in stats_rows:
        e = exp[(r["method"], r["student"])]
        for col in ("mean", "std"):
            assert abs(float(r[col]) - e[col]) <= 0.005 + 1e-9, (r, col, e[col])
            checked += 1
        assert int(r["n"]) == e["n"] and int(r["failed"]) == e["failed"] and int(r["diverged"]) == e["diverged"]
        lo, hi = (float(v) for v in r["95% CI"].strip("[]").split(","))
        assert abs(lo - e["ci_low"]) <= 0.005 + 1e-9 and abs(hi - e["ci_high"]) <= 0.005 + 1e-9
        checked += 5
        if "diff" in e:
            assert abs(float(r[f"Δ vs {baseline}"]) - e["diff"]) <= 0.005 + 1e-9
            p = float(r["p"])
            assert abs(p - e["p"]) <= max(0.00005, 0.051 * e["p"]), (p, e["p"])
            assert int(r["pairs"]) == e["pairs"] and r["result"].split()[0] == e["result"]
            checked += 4
        else:
            assert r["result"] == "baseline"
    for r in board_rows:
        name = r["method"]
        if name == "teacher":
            continue
        method, student = name.rsplit(" [", 1)
        e = exp[(method.replace("**", ""), student.rstrip("]"))]
        col = next(c for c in r if c.startswith("movie-sentiment"))
        mean, std, n = parse_cell(r[col])
        assert abs(mean - e["mean"]) <= 0.005 + 1e-9 and abs(std - e["std"]) <= 0.005 + 1e-9 and n == e["n"]
        marks = {"win": "▲", "loss": "▼"}
        assert r[col].rstrip().endswith(marks[e["result"]]) if e.get("result") in marks else not r[col].rstrip().endswith(("▲", "▼"))
        checked += 3
    return checked
