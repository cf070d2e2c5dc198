"""The experiment behind docs/peers.md's "kdbench's own work per step": benchmarks/peers.py
with one piece of kdbench's pass counter (kdbench.compute.PassCounter) changed in this
process only, nothing in kdbench's code:

    python counter_variants.py MODE OUT [peers.py options]

MODE ``plain``: kdbench as it is (a ``register_multi_grad_hook`` on each forward's outputs
counts the backward passes that reach it); ``prehook``: one pre-hook per autograd node
that made the outputs, deduplicated by graph task (the same counts, a cheaper
registration); ``nohook``: forwards counted, no backward hook (backward counts then read
0: not a configuration kdbench offers, only the measure of what the hook costs).
Run from a kdbench checkout's root, in the peers' environment (docs/peers.md)."""

import sys

sys.path.insert(0, "benchmarks")
import peers  # noqa: E402

import kdbench.compute as c  # noqa: E402


def prehook(tensors, fn):
    seen = set()

    def reached(*_):
        task = c.torch._C._current_graph_task_id()
        if task not in seen:
            seen.add(task)
            fn()

    nodes = {}
    for t in tensors:
        if t.grad_fn is None:
            t.register_hook(reached)
        else:
            nodes.setdefault(id(t.grad_fn), t.grad_fn)
    for node in nodes.values():
        node.register_prehook(reached)


def forward_with(register):
    def _forward(self, role, output):
        if not self.active or role in self._silent:
            return
        if c.in_tangent_pass():
            self.add(role, "jvp")
            return
        self.add(role, "fwd")
        tensors = [t for t in c._float_outputs(output) if t.requires_grad]
        if tensors and register is not None:
            register(tensors, lambda: self.add(role, "bwd"))
    return _forward


mode = sys.argv[1]
if mode == "prehook":
    c.PassCounter._forward = forward_with(prehook)
elif mode == "nohook":
    c.PassCounter._forward = forward_with(None)
elif mode != "plain":
    raise SystemExit(f"unknown mode {mode!r} (plain, prehook, nohook)")
sys.exit(peers.main(sys.argv[2:]))
