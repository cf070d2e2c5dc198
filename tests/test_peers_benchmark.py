"""benchmarks/peers.py: kdbench's side computes the loss docs/peers.md writes down, and the
weights it hands the peers (torchdistill's alpha, TextBrewer's DistillationConfig) make the
peers' formulas, written out here by hand, give the same number on the same outputs. Where
the peers are installed (``make peers``), the benchmark's own check passes on the tiny
models and fails when a weight is off by 1%. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("peers")
    sys.modules["peers"] = module  # it registers itself as a plugin (the bench-images task)
    spec.loader.exec_module(module)
    yield module
    if saved is None:
        sys.modules.pop("peers", None)
    else:
        sys.modules["peers"] = saved


@pytest.fixture(scope="module")
def built(peers, tmp_path_factory):
    """Every pair's tiny models, built as the benchmark builds them (teachers used as built)."""
    from kdbench.store import ResultsStore
    from kdbench.train.teachers import provide_teacher

    tmp = tmp_path_factory.mktemp("peers")
    registry = peers.peers_registry()
    store = ResultsStore(tmp / "store.sqlite")
    out = {}
    for name, pair in peers.PAIRS.items():
        spec = peers.run_spec(registry, pair, True, 4, 16)
        checkpoint = provide_teacher(spec, tmp, store, registry, torch.device("cpu"))
        out[name] = peers.build_models(registry, spec, checkpoint)
    return out


def outputs(m, student):
    with torch.no_grad():
        t = m.teacher(m.first.teacher_inputs, need=m.method.teacher_needs)
    s = student(m.first.inputs, need=m.method.student_needs)
    return s, t


def kl(s, t, temperature):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch."""
    log_ps, log_pt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    return temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def soft_ce(s, t, temperature):
    """TextBrewer's kd_ce_loss: -sum_c softmax(t/T) log_softmax(s/T), mean over the batch (no T^2)."""
    return -(F.softmax(t / temperature, -1) * F.log_softmax(s / temperature, -1)).sum(-1).mean()


def test_vision_kd_is_hinton_kd_and_torchdistills_kdloss_with_alpha_swapped(peers, built):
    m = built["vision-kd"]
    p = peers.PAIRS["vision-kd"].params
    torch.manual_seed(0)
    loss, _ = peers.kdbench_loss(m, m.build_student().train(), m.first)
    torch.manual_seed(0)
    s_out, t_out = outputs(m, m.build_student().train())
    s, t, y = s_out.logits, t_out.logits, m.first.labels
    hinton = p["alpha"] * kl(s, t, p["temperature"]) + (1 - p["alpha"]) * F.cross_entropy(s, y)
    a = 1 - p["alpha"]  # torchdistill's KDLoss: a * CE + (1 - a) * T^2 * KL (the benchmark passes alpha = 1 - kdbench's)
    torchdistill = a * F.cross_entropy(s, y) + (1 - a) * kl(s, t, p["temperature"])
    assert float(loss) == pytest.approx(float(hinton), rel=1e-5)
    assert float(loss) == pytest.approx(float(torchdistill), rel=1e-5)
    assert float(loss) > 0.1  # a real loss, not a degenerate zero


def textbrewer_total(peers, pair, m, s, t, labels, extra=None):
    """TextBrewer's GeneralDistiller.compute_loss written out for the benchmark's config:
    kd_loss_weight * softCE + hard_label_weight * CE + sum of weighted matches."""
    d, td = m.student.describe(), m.teacher.describe()
    c = peers.textbrewer_config(pair, d["num_layers"], td["num_layers"], d["hidden_size"])
    total = c["kd_loss_weight"] * soft_ce(s.logits, t.logits, c["temperature"]) + c["hard_label_weight"] * F.cross_entropy(s.logits, labels)
    for match in c["intermediate_matches"]:
        if match["loss"] == "pkd":  # normalised [CLS], squared distance summed over the width, mean over the batch
            a = F.normalize(s.hidden_states[match["layer_S"]][:, 0], dim=-1)
            b = F.normalize(t.hidden_states[match["layer_T"]][:, 0], dim=-1)
            total = total + match["weight"] * (a - b).pow(2).sum(-1).mean()
        elif match["loss"] == "hidden_mse":  # every position real (mask all ones): the plain mean
            total = total + match["weight"] * F.mse_loss(extra(s.hidden_states[match["layer_S"]]), t.hidden_states[match["layer_T"]])
        else:
            assert match["loss"] == "attention_mse"
            total = total + match["weight"] * F.mse_loss(s.attention_scores[match["layer_S"]], t.attention_scores[match["layer_T"]])
    return total, c


@pytest.mark.parametrize("name", ["text-kd", "text-pkd", "text-tinybert"])
def test_text_pairs_textbrewer_formula_minus_the_teacher_entropy_is_kdbenchs_loss(peers, built, name):
    pair, m = peers.PAIRS[name], built[name]
    student = m.build_student().eval()  # dropout off: both formulas read the same outputs
    loss, parts = peers.kdbench_loss(m, student, m.first)
    s, t = outputs(m, student)
    theirs, config = textbrewer_total(peers, pair, m, s, t, m.first.labels, m.extra)
    offset = peers.definition_offset(pair, m, m.first)
    if pair.method == "tinybert":
        assert offset == 0.0 and config["kd_loss_weight"] == 1.0 and config["hard_label_weight"] == 0.0
        assert len(config["intermediate_matches"]) == 2 * 2 + 1  # 2 attention maps, embeddings + 2 hidden layers (2-layer tiny student)
    else:
        p = pair.params
        assert offset == pytest.approx(p["alpha"] * p["temperature"] ** 2 * float(peers.teacher_entropy(t.logits, p["temperature"])))
        assert offset > 0.01  # the teacher's entropy really is there to subtract
    assert float(theirs) - offset == pytest.approx(float(loss), rel=1e-5)
    if name == "text-pkd":
        assert float(parts["patience"]) > 0  # the patient term takes part in the comparison


def test_teacher_entropy_of_uniform_and_one_hot_logits(peers):
    uniform = torch.zeros(3, 5)
    assert float(peers.teacher_entropy(uniform, 2.0)) == pytest.approx(torch.log(torch.tensor(5.0)).item())
    sharp = torch.tensor([[100.0, 0.0, 0.0]])
    assert float(peers.teacher_entropy(sharp, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_summary_is_the_median_and_range_of_the_round_ratios_and_the_csv_has_every_step(peers, tmp_path):
    rounds = [{"pair": "vision-kd", "round": r, "kdbench_over_peer": v, "kdbench_s_median": v, "peer_s_median": 1.0,
               "steps": [[v, 1.0]] * 3, "skipped_first": 2, "kdbench_peak_mem_increase_mb": 5.0}
              for r, v in enumerate([1.10, 0.90, 1.00], start=1)]
    summary = peers.summarise(rounds, {"vision-kd": {"kdbench": 5.0, "peer": 6.0}})
    assert summary["vision-kd"]["kdbench_over_peer"] == {"median": 1.0, "min": 0.9, "max": 1.1}
    assert summary["vision-kd"]["peak_mem_increase_mb"] == {"kdbench": 5.0, "peer": 6.0}
    peers.write_outputs(tmp_path, {"command": "x"}, [], rounds, summary)
    lines = (tmp_path / "steps.csv").read_text().splitlines()
    assert lines[0] == "pair,peer,round,step,kdbench_s,peer_s,in_ratio"
    assert len(lines) == 1 + 3 * 3 and lines[1].endswith(",0") and lines[3].endswith(",1")  # first 2 steps of a round outside the ratio
    assert json.loads((tmp_path / "rounds.json").read_text())[0]["kdbench_over_peer"] == 1.10


def test_tensor_peak_is_the_most_live_tensor_memory_between_the_meter_marks(peers):
    mb = 2**20

    def run():  # 1 MB kept, 3 MB freed, then 2 MB: at most 4 MB alive at once
        a = torch.ones(mb, dtype=torch.uint8)
        b = torch.ones(3 * mb, dtype=torch.uint8)
        del b
        return a, torch.ones(2 * mb, dtype=torch.uint8)

    def marked():  # only what happens between the marks counts: 1 MB, then 2 MB more
        before = torch.ones(5 * mb, dtype=torch.uint8)
        with torch.profiler.record_function(peers.METER_START):
            pass
        inside = [torch.ones(mb, dtype=torch.uint8), torch.ones(2 * mb, dtype=torch.uint8)]
        with torch.profiler.record_function(peers.METER_END):
            pass
        return before, inside, torch.ones(8 * mb, dtype=torch.uint8)

    assert peers.tensor_peak_mb(run) == 4.0
    assert peers.tensor_peak_mb(marked) == 3.0
    held: list = []
    assert peers.tensor_peak_mb(lambda: held.append(torch.ones(5 * mb, dtype=torch.uint8))) == 5.0
    # freeing a block allocated before (a previous run's models) does not lower the figure
    assert peers.tensor_peak_mb(lambda: (held.clear(), torch.ones(mb, dtype=torch.uint8))) == 1.0


def test_missing_peers_are_named_with_the_make_target(peers, monkeypatch, tmp_path):
    monkeypatch.setitem(peers.PAIRS, "fake", peers.PairDef("fake", "no_such_peer_module_xyz", "kd", {}, ""))
    assert peers.peers_missing(["fake"]) == ["no_such_peer_module_xyz"]
    with pytest.raises(SystemExit, match="make peers"):
        peers.main([str(tmp_path / "out"), "--pairs", "fake", "--tiny"])
    with pytest.raises(SystemExit):
        peers.main([str(tmp_path / "out"), "--rounds", "2"])  # a spread needs 3 rounds


@pytest.mark.parametrize("name,peer", [("vision-kd", "torchdistill"), ("text-kd", "textbrewer"), ("text-pkd", "textbrewer"),
                                       ("text-tinybert", "textbrewer")])
def test_with_the_peers_installed_the_check_passes_and_fails_on_a_weight_off_by_one_percent(peers, built, tmp_path, name, peer):
    pytest.importorskip(peer, reason="the peers live in .venv-peers (make peers)")
    pair, m = peers.PAIRS[name], built[name]
    result = peers.check_equal(pair, m, peers.build_peer(pair, m, str(tmp_path)))
    assert result["equal"], result
    assert result["loss_rel_diff"] <= peers.LOSS_RTOL and result["grad_rel_diff"] <= peers.GRAD_RTOL
    key = "alpha" if "alpha" in pair.params else "temperature"
    off = peers.PairDef(pair.name, pair.peer, pair.method, {**pair.params, key: pair.params[key] * 1.01}, pair.definitions)
    # the peer built from the off weight, kdbench's side unchanged: the check must refuse
    wrong = peers.build_peer(off, m, str(tmp_path))
    assert not peers.check_equal(pair, m, wrong)["equal"]


def test_pooled_steps_median_interval_share_and_verdict_by_hand(peers):
    """The pooled figure: every kept step's ratio (a round's skipped first steps left out),
    their median, the share above 1, and an interval from resampling whole rounds."""
    def rnd(r, ratios):
        return {"pair": "vision-kd", "round": r, "steps": [[9.0, 1.0], [9.0, 1.0]] + [[x, 1.0] for x in ratios], "skipped_first": 2}

    same = [rnd(1, [0.99, 1.01, 1.00]), rnd(2, [1.02, 0.98, 1.00]), rnd(3, [1.00, 1.01, 0.99])]
    q = peers.pooled_steps(same)
    assert q["steps"] == 9 and q["median"] == 1.0  # the 9.0s of the skipped steps are not in it
    assert q["kdbench_slower_share"] == 3 / 9
    assert q["ci95"][0] <= 1.0 <= q["ci95"][1] and q["verdict"] == "no difference measurable"
    slower = [rnd(r, [1.02, 1.03, 1.04]) for r in (1, 2, 3)]  # every round's steps above 1
    q = peers.pooled_steps(slower)
    assert q["median"] == 1.03 and q["ci95"][0] >= 1.02 and q["verdict"] == "kdbench slower" and q["kdbench_slower_share"] == 1.0
    faster = [rnd(r, [0.97, 0.98]) for r in (1, 2, 3)]
    assert peers.pooled_steps(faster)["verdict"] == "kdbench faster"


def test_summarise_writes_the_summary_again_from_the_raw_rounds(peers, tmp_path, capsys):
    rounds = [{"pair": "vision-kd", "round": r, "kdbench_over_peer": v, "kdbench_s_median": v, "peer_s_median": 1.0,
               "steps": [[v, 1.0]] * 3, "skipped_first": 2, "kdbench_peak_mem_increase_mb": 5.0}
              for r, v in enumerate([1.10, 0.90, 1.00], start=1)]
    memory = {"vision-kd": {"kdbench": 5.0, "peer": 6.0, "kdbench_tensors": 1.0, "peer_tensors": 1.0}}
    env = {"command": "x", "rounds": 3, "steps": 3, "threads": 2, "clock": "wall", "wall_s": 60.0}
    peers.write_outputs(tmp_path, env, [], rounds, {"vision-kd": {"peak_mem_increase_mb": memory["vision-kd"]}})
    assert peers.main([str(tmp_path), "--summarise"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["vision-kd"]
    assert summary["kdbench_over_peer"] == {"median": 1.0, "min": 0.9, "max": 1.1}
    assert summary["peak_mem_increase_mb"] == memory["vision-kd"]
    assert summary["steps_pooled"]["steps"] == 3 and summary["steps_pooled"]["median"] == 1.0
    assert "no difference measurable" in capsys.readouterr().out
