"""A synthetic results store for the report tests: real run specs from a small suite,
stored with ResultsStore.claim/finish and metrics made up so that the truth is known.

Baseline is ``none``. Per seed s there is a shared seed effect ``base[s]``; then
* ``none``            = base                   (the baseline)
* ``kd`` T=1          = base exactly           (identical to the baseline: p = 1)
* ``kd`` T=2 (centre) = base + 0.03 + tiny noise  (better by construction: a win)
* ``kd`` T=4          = base - 0.02 + tiny noise  (worse by construction: a loss)
* ``kd`` alpha 0.1/0.9 at T=2, and T=2 on the second student, same distribution as the
  baseline but independent noise (not significant for this fixed draw).
Plus one failed run and one diverged run, which must never be averaged. Ten seeds: the
exact sign-flip test's smallest p is then 2/1024, so a gap on every seed survives Holm
over the report's 6 comparisons (at 5 seeds no test could go below 0.0625).

``custom_store`` builds small stores with chosen seeds, scores, commits, data
fingerprints and teachers for the known-answer tests of issue 11.
"""

from __future__ import annotations

import copy
import zlib
from pathlib import Path

import numpy as np
import yaml

from kdbench.spec import build_suite
from kdbench.store import DIVERGED, DONE, FAILED, ResultsStore

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"
SEEDS = list(range(10))


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
        # cost: kd costs ~2x none; a bigger student more memory. kd runs record the new cost
        # fields, none runs only what older stores have (the report falls back on them).
        factor = 2.0 if spec.method == "kd" else 1.0
        big = spec.student_label == "tiny-2L"
        cost = {"wall_s": factor * (10 + spec.seed), "device_s": factor * (8 + spec.seed), "step_s": factor * 0.05,
                "peak_mem_mb": 500.0 + (100 if big else 0), "steps": 20, "student_params": 1000 + (500 if big else 0),
                "device_time_kind": "process_cpu", "peak_mem_kind": "process_rss", "train_s": factor * (9 + spec.seed % 2),
                "peak_mem_increase_mb": 40.0 + (10 if big else 0)}
        if spec.method == "kd":
            cost |= {"prep_s": 1.5, "eval_s": 0.5, "step_s_median": 0.1 + 0.001 * spec.seed, "step_s_q25": 0.09, "step_s_q75": 0.12,
                     "mem_mb": 80.0 + spec.seed, "mem_kind": "cpu_rss_increase", "shared_teacher_outputs": True,
                     "params_deployed": 1000 + (500 if big else 0), "params_training": 1200 + (500 if big else 0)}
        store.finish(spec, DONE, metrics=metrics, history=[{"step": 20, **metrics}], cost=cost, env=env)
    return suite, store


# ----------------------------------------------------------------- independent recomputation


def label(method: str, params: dict) -> str:
    """The synthetic suite's row label (kd's alpha and temperature vary; none has no params)."""
    return method if not params else f"{method}({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"


def brute_force_sign_flip(d: list[float]) -> float:
    """Two-sided p of the paired sign-flip test by enumerating every sign assignment."""
    import itertools

    obs = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-9 * max(1.0, sum(abs(x) for x in d))
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


def holm_by_hand(p: dict) -> dict:
    """Holm's step-down: the k-th smallest p times (m - k + 1), running max, capped at 1."""
    m, out, running = len(p), {}, 0.0
    for k, (key, v) in enumerate(sorted(p.items(), key=lambda kv: kv[1])):
        running = max(running, min(1.0, (m - k) * v))
        out[key] = running
    return out


def expected(rows: list[dict], baseline: str = "none") -> dict[tuple[str, str], dict]:
    """Per (label, student), straight from the raw store rows with numpy/scipy and brute
    force: the numbers every report format must show."""
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
        lo, hi = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
        e["ci_low"], e["ci_high"] = max(lo, 0.0), min(hi, 100.0)  # accuracy lies in [0, 100]
        if rs[0]["method"] != baseline:
            base = {r["seed"]: r["metrics"]["test"]["accuracy"] * 100 for r in rows
                    if r["method"] == baseline and r["student"] == key[1] and r["status"] == "done"}
            seeds = sorted(set(done) & set(base))
            d = [done[s] - base[s] for s in seeds]
            e["pairs"], e["diff"], e["p"] = len(seeds), float(np.mean(d)), brute_force_sign_flip(d)
        out[key] = e
    adjusted = holm_by_hand({k: e["p"] for k, e in out.items() if "p" in e})
    for k, p_adj in adjusted.items():
        e = out[k]
        e["p_adj"] = p_adj
        e["result"] = "n.s." if p_adj >= 0.05 else ("win" if e["diff"] > 0 else "loss")
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
            p, p_adj = float(r["p"]), float(r["p (holm)"])
            assert abs(p - e["p"]) <= max(0.00005, 0.051 * e["p"]), (p, e["p"])
            assert abs(p_adj - e["p_adj"]) <= max(0.00005, 0.051 * e["p_adj"]), (p_adj, e["p_adj"])
            shown = r["result"].split()
            word = shown[1] if shown[0] == "significant" else ("n.s." if shown[0] == "equivalent" else shown[0])
            assert int(r["pairs"]) == e["pairs"] and word == e["result"], (r["result"], e["result"])
            # significant differences under the default 1-point margin of accuracy say so
            assert ("below the margin" in r["result"]) == (e["result"] in ("win", "loss") and abs(e["diff"]) < 1.0)
            checked += 5
        else:
            assert r["result"] == "baseline"
    for r in board_rows:
        name = r["method"]
        if name.startswith("teacher") or name == "chance":
            continue
        method, student = name.rsplit(" [", 1)
        e = exp[(method.replace("**", ""), student.rstrip("]"))]
        col = next(c for c in r if c.startswith("movie-sentiment"))
        mean, std, n = parse_cell(r[col])
        assert abs(mean - e["mean"]) <= 0.005 + 1e-9 and abs(std - e["std"]) <= 0.005 + 1e-9 and n == e["n"]
        marks = {"win": "▲", "loss": "▼"} if abs(e.get("diff", 0.0)) >= 1.0 else {"win": "△", "loss": "▽"}
        assert r[col].rstrip().endswith(marks[e["result"]]) if e.get("result") in marks else not r[col].rstrip().endswith(("▲", "▼", "△", "▽"))
        checked += 3
    return checked


# ----------------------------------------------------------------- small known-answer stores


def small_suite_data(seeds: list[int], two_teachers: bool = False) -> dict:
    """none and kd on movie-sentiment; one teacher x tiny-1L, or two teacher/student pairs."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(name="report-small", seeds=list(seeds), baseline="none")
    data["methods"] = [{"name": "none"}, {"name": "kd", "params": {"alpha": 0.5, "temperature": 2.0}}]
    if two_teachers:
        student, teacher = data.pop("students")[0], data.pop("teacher")
        big_t = copy.deepcopy(teacher) | {"label": "teacher-B"}
        big_t["options"]["tiny"]["layers"] = 3
        big_s = copy.deepcopy(student) | {"label": "tiny-2L"}
        big_s["options"]["tiny"]["layers"] = 2
        data["pairs"] = [{"teacher": teacher | {"label": "teacher-A"}, "student": student}, {"teacher": big_t, "student": big_s}]
    return data


def metrics_of(score: float) -> dict:
    return {"step": 20, "selection": "final", "main_metric": "accuracy", "validation": {"accuracy": score},
            "test": {"accuracy": score}}


def custom_store(path: Path, data: dict, score, env=None, cost=None, teacher_scores: dict | None = None):
    """Store every run of the suite ``data`` as done with ``score(method, student, seed)``
    (0-1), ``env(method, student, seed)`` and ``cost(method, student, seed)``; teachers
    (keyed by label) with ``teacher_scores``. Returns (suite, store)."""
    suite = build_suite(data, source="custom")
    store = ResultsStore(path)
    for spec in suite.runs:
        assert store.claim(spec)
        key = (spec.method, spec.student_label, spec.seed)
        store.finish(spec, DONE, metrics=metrics_of(score(*key)), history=[], cost=(cost or (lambda *k: {"wall_s": 1.0}))(*key),
                     env=(env or (lambda *k: {"git_commit": "abc123"}))(*key))
    for spec in {r.teacher_hash: r for r in suite.runs if r.teacher_hash}.values():
        t = spec.teacher
        assert store.claim_teacher(spec.teacher_hash, spec.task.name, t.model_dump(mode="json"))
        value = (teacher_scores or {}).get(t.label, 0.9)
        store.finish_teacher(spec.teacher_hash, DONE, path="teacher.safetensors", metrics=metrics_of(value),
                             cost={"wall_s": 100.0, "train_s": 90.0, "eval_s": 8.0, "prep_s": 2.0, "mem_mb": 50.0,
                                   "mem_kind": "cpu_rss_increase"}, env={"git_commit": "abc123"})
    return suite, store
