import resource, sys, json
sys.path.insert(0, "benchmarks")
import peers
peers.CLOCKS["faults"] = lambda: float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt) + __import__("time").perf_counter() * 1e-3
rc = peers.main(sys.argv[1:])
rounds = json.load(open(sys.argv[1] + "/rounds.json"))
for r in rounds:
    print(r["pair"], r["round"], "faults per step kdbench/peer:", [(round(a), round(b)) for a, b in r["steps"]])
