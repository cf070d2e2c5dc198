"""Per-step profile of each side of a peers.py pair (cProfile, one profiler per side,
switched at the pair boundary). Usage: profile_pair.py PAIR STEPS SKIP"""
import cProfile, io, pstats, sys, tempfile
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
import peers, step_cost
from kdbench.train import runner as runner_module
from kdbench.train.runner import Runner
from kdbench.train.teachers import provide_teacher
from kdbench.store import ResultsStore

name, steps, skip = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
pair = peers.PAIRS[name]
registry = peers.peers_registry()
prof_k, prof_p = cProfile.Profile(), cProfile.Profile()
with tempfile.TemporaryDirectory() as tmp:
    store = ResultsStore(Path(tmp) / "store.sqlite")
    runner = Runner(tmp, registry, device="cpu", progress=False, share_teacher_outputs=False)
    spec = peers.run_spec(registry, pair, False, steps, 16 if pair.peer == "textbrewer" else 64)
    checkpoint = provide_teacher(spec, Path(tmp), store, registry, runner.device)
    m = peers.build_models(registry, spec, checkpoint)
    peer = peers.build_peer(pair, m, tmp)
    done = [0]

    class Meter(runner_module.CostMeter):
        def record_step(self, seconds):
            super().record_step(seconds)
            done[0] += 1
            if done[0] > skip:
                prof_k.disable()
                prof_p.enable()
            peer.step()
            if done[0] > skip:
                prof_p.disable()
            if skip <= done[0] < steps:
                prof_k.enable()

    store.claim(spec, rerun=True)
    with step_cost.runner_meter(Meter), peers.deterministic_cpu():
        result = runner.run(spec, checkpoint)
    assert result.status == "done", result.error
n = steps - skip
for side, prof in (("kdbench", prof_k), ("peer", prof_p)):
    s = pstats.Stats(prof)
    total = sum(v[2] for v in s.stats.values())
    print(f"== {side}: {n} steps, profiled total {1000 * total / n:.2f} ms per step")
    rows = sorted(((v[2], k) for k, v in s.stats.items()), reverse=True)
    for t, (file, line, fn) in rows[:25]:
        print(f"  {1000 * t / n:8.3f} ms  {Path(file).name}:{line} {fn}")
    by_file = {}
    for (file, line, fn), v in s.stats.items():
        key = "C/builtin" if file == "~" else ("/".join(Path(file).parts[-2:]))
        by_file[key] = by_file.get(key, 0.0) + v[2]
    python = sum(t for k, t in by_file.items() if k != "C/builtin")
    print(f"  C and built-in functions {1000 * by_file.get('C/builtin', 0.0) / n:.2f} ms, Python functions {1000 * python / n:.2f} ms per step")
    print("  by file (tottime per step, every file from 0.01 ms):")
    for k, t in sorted(by_file.items(), key=lambda kv: -kv[1]):
        if 1000 * t / n >= 0.01:
            print(f"  {1000 * t / n:8.3f} ms  {k}")
