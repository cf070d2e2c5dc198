"""Six processes open one new results store at the same moment, 40 times; prints how many of
the 240 opens failed and the first distinct messages.

    python open_race.py KDBENCH_ROOT [TRIALS] [PROCESSES]

KDBENCH_ROOT: the checkout whose ``kdbench.store.ResultsStore`` is tried (a worktree at an
older commit measures the code before a fix)."""

import multiprocessing as mp
import os
import sys
import tempfile

root = sys.argv[1]
trials = int(sys.argv[2]) if len(sys.argv) > 2 else 40
procs = int(sys.argv[3]) if len(sys.argv) > 3 else 6
sys.path.insert(0, root)
from kdbench.store import ResultsStore  # noqa: E402


def opener(path, barrier, queue):
    barrier.wait()
    try:
        ResultsStore(path)
        queue.put(None)
    except Exception as exc:  # noqa: BLE001 - counted
        queue.put(str(exc).split(": ", 1)[-1])


if __name__ == "__main__":
    ctx = mp.get_context("fork")
    errors = []
    for _ in range(trials):
        path = os.path.join(tempfile.mkdtemp(), "store.sqlite")
        barrier, queue = ctx.Barrier(procs), ctx.Queue()
        workers = [ctx.Process(target=opener, args=(path, barrier, queue)) for _ in range(procs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        errors += [e for e in (queue.get() for _ in workers) if e]
    print(f"{root}: {len(errors)} of {trials * procs} opens failed")
    for message in sorted(set(errors)):
        print(f"  {errors.count(message)} x {message}")
