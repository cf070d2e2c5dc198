"""Throwaway: peers.py with counterbalanced order (A1 B1 B2 A2 A3 B3 ...) to look for an order effect."""
import contextlib, json, sys
import numpy as np
sys.path.insert(0, "benchmarks")
import peers, step_cost
from kdbench.train import runner as runner_module

@contextlib.contextmanager
def paired_abba(partner, pairs):
    pending = []
    class PairedMeter(runner_module.CostMeter):
        def record_step(self, seconds):
            super().record_step(seconds)
            if pending:                       # this kdbench step ran right after its peer step
                pairs.append((seconds, pending.pop()))
            else:                             # peer step right after; then the next pair's peer step first
                pairs.append((seconds, partner.step()))
                pending.append(partner.step())
    with step_cost.runner_meter(PairedMeter):
        yield

step_cost.paired_with = paired_abba
out = sys.argv[1]
rc = peers.main(sys.argv[1:])
for name in sorted({r["pair"] for r in json.load(open(out + "/rounds.json"))}):
    rs = [r for r in json.load(open(out + "/rounds.json")) if r["pair"] == name]
    ab = [a / b for r in rs for i, (a, b) in enumerate(r["steps"]) if i >= 2 and i % 2 == 0]
    ba = [a / b for r in rs for i, (a, b) in enumerate(r["steps"]) if i >= 2 and i % 2 == 1]
    print(f"{name}: kdbench first (peer after) median {np.median(ab):.4f} n={len(ab)}; peer first median {np.median(ba):.4f} n={len(ba)}")
