"""What an autograd hook costs a bare KD step (no kdbench runner): resnet14 -> resnet8 from
kdbench's CIFAR zoo at batch 16, SGD, the loss of kdbench's ``kd``; each step of one round
runs every variant once, in turn (none, multi, none2, prehook, builtin, retain), 300 rounds
after 10 discarded; printed: each variant's median step and the median of its per-round
ratio to ``none`` (``none2`` is ``none`` again: the noise floor). Variants, each on the
student's logits: ``multi`` ``torch.autograd.graph.register_multi_grad_hook`` (mode
"any", what kdbench's pass counter registers per forward), ``prehook`` a Python pre-hook on
its autograd node, ``builtin`` the same with a C function as the hook (``list.append``),
``retain`` ``retain_grad()`` (a hook in C++).

    python hook_loop.py THREADS        # from a kdbench checkout's root
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "plugins")
torch.set_num_threads(int(sys.argv[1]))
from kdbench.train.cost import keep_freed_memory  # noqa: E402
from kdbench_plugins.models.cifar import CifarOptions, CifarResNet  # noqa: E402

keep_freed_memory()
torch.manual_seed(0)
student = CifarResNet("resnet8", CifarOptions(arch="resnet8"), 100, 8, (16, 16, 32, 64)).train()
teacher = CifarResNet("resnet14", CifarOptions(arch="resnet14"), 100, 14, (16, 16, 32, 64)).eval()
opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 100, (16,))
SINK: list = []


def step(kind: str) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        t_logits = teacher({"pixel_values": x}).logits
    logits = student({"pixel_values": x}).logits
    if kind == "multi":
        torch.autograd.graph.register_multi_grad_hook([logits], lambda g: None, mode="any")
    elif kind == "prehook":
        logits.grad_fn.register_prehook(lambda g: None)
    elif kind == "builtin":
        logits.grad_fn.register_prehook(SINK.append)
    elif kind == "retain":
        logits.retain_grad()
    loss = 0.9 * 16 * F.kl_div(F.log_softmax(logits / 4, -1), F.softmax(t_logits / 4, -1), reduction="batchmean") + 0.1 * F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    SINK.clear()
    return time.perf_counter() - start


kinds = ["none", "multi", "none2", "prehook", "builtin", "retain"]
for _ in range(10):
    for k in kinds:
        step(k)
seconds: dict[str, list[float]] = {k: [] for k in kinds}
for _ in range(300):
    for k in kinds:
        seconds[k].append(step(k))
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 300 rounds")
for k in kinds:
    ratios = [a / b for a, b in zip(seconds[k], seconds["none"])]
    print(f"{k:8s} median {1e3 * statistics.median(seconds[k]):.3f} ms, per-round ratio to none {statistics.median(ratios):.4f}")
