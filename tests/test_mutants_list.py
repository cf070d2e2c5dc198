"""The mutation list (tests/mutants.py) stays honest as the code moves: a mutation whose
snippet is no longer in its file (or is there twice) would be reported neither killed nor
survived by a reviewer who runs it, only as a ``BAD SNIPPET`` in ``--list``; this test fails
instead, the day an edit makes a snippet stale."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location("kdbench_mutants", ROOT / "tests" / "mutants.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # defines the list only: running mutations needs main()
    return mod.mutants()


def test_every_mutation_replaces_one_existing_snippet_and_names_existing_tests():
    ms = _mutants()
    assert len(ms) >= 150  # the list the tests/README counts (153 when this test was written)
    names = [m.name for m in ms]
    assert len(names) == len(set(names)), "two mutations share a name"
    bad = []
    for m in ms:
        count = (ROOT / m.path).read_text().count(m.old)
        if count != 1 or m.old == m.new:
            bad.append(f"{m.name}: snippet found {count} times in {m.path}" + (" (no change)" if m.old == m.new else ""))
        bad += [f"{m.name}: no test file {t}" for t in m.tests if not (ROOT / t.split("::")[0]).is_file()]
    assert not bad, "\n".join(bad)
