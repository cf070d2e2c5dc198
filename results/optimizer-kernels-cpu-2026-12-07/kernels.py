"""PyTorch's optimizer step kernels on a CPU, for the students kdbench's reference setups
train: the per-parameter for-loop (PyTorch's CPU default, what kdbench uses) against the
multi-tensor ``foreach`` kernel. Parameters: resnet20 from kdbench's CIFAR zoo (65
tensors, 0.28 M) and the shapes of the MiniLM 3-layer student (57 tensors, 17.4 M, random
values); SGD (lr 0.05, momentum 0.9, wd 5e-4) and AdamW (lr 1e-4, wd 0.01); fixed random
gradients. Each of 7 rounds times both kernels in turn (resnet20: 60 steps, MiniLM: 6);
printed: each kernel's median ms per step and foreach / for-loop per round, median
[min, max].

    python kernels.py keep    # with the heap setting every kdbench run makes (keep_freed_memory)
    python kernels.py no      # glibc's default heap
Run from a kdbench checkout's root with the project's .venv."""

import statistics
import sys
import time

import torch

torch.set_num_threads(2)
from kdbench.train.cost import keep_freed_memory  # noqa: E402

if sys.argv[1] == "keep":
    print("freed memory kept in the heap:", keep_freed_memory())
sys.path.insert(0, "plugins")
from kdbench_plugins.models.cifar import CifarOptions, CifarResNet  # noqa: E402

r20 = list(CifarResNet("resnet20", CifarOptions(arch="resnet20"), 100, 20, (16, 16, 32, 64)).parameters())
shapes = [(30522, 384), (512, 384), (2, 384), (384,), (384,)]
for _ in range(3):
    shapes += [(384, 384), (384,)] * 4 + [(384,), (384,)] + [(1536, 384), (1536,), (384, 1536), (384,)] + [(384,), (384,)]
shapes += [(384, 384), (384,), (2, 384), (2,)]
mini = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
g = torch.Generator().manual_seed(0)
for name, params in (("resnet20", r20), ("minilm3", mini)):
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    for oname, cls, kw in (("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
                           ("adamw", torch.optim.AdamW, dict(lr=1e-4, weight_decay=0.01))):
        opts = {k: cls(params, foreach=f, **kw) for k, f in (("loop", False), ("foreach", True))}
        t: dict[str, list[float]] = {k: [] for k in opts}
        n = 60 if name == "resnet20" else 6
        for _ in range(7):
            for k, o in opts.items():
                o.step()
                a = time.perf_counter()
                for _ in range(n):
                    o.step()
                t[k].append((time.perf_counter() - a) / n)
        ratio = [f / l for f, l in zip(t["foreach"], t["loop"])]
        print(f"{name:9s} {oname:6s} loop {1e3 * statistics.median(t['loop']):8.3f} ms foreach {1e3 * statistics.median(t['foreach']):8.3f} ms  "
              f"foreach/loop {statistics.median(ratio):.3f} [{min(ratio):.3f},{max(ratio):.3f}]")
