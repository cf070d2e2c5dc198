"""docs/model-families.md holds: the outside package of tests/external_plugin adds the
``mpnet`` family by entry point, exactly as the page shows, and kdbench lists it, builds
it, refuses what it lacks and trains a suite with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kdbench.api import ATTENTION_PROBS, ATTENTION_SCORES, HIDDEN_STATES, VALUES, Problem
from kdbench.executors.local import run_local
from kdbench.executors.phases import open_store
from kdbench.registry import get_registry, set_registry
from kdbench.spec import SuiteError, build_suite
from support.suites import smoke_data
from test_cli import external_plugin, kdbench_here  # noqa: F401  (installs tests/external_plugin)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "model-families.md"
EXAMPLE = ROOT / "tests" / "external_plugin" / "kdbench_example_plugin" / "family.py"


def test_the_page_shows_the_example_package_as_it_is():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert EXAMPLE.read_text() in blocks
    toml = (ROOT / "tests" / "external_plugin" / "pyproject.toml").read_text()
    assert 'example-family = "kdbench_example_plugin.family"' in toml and 'example-family = "kdbench_example_plugin.family"' in DOC.read_text()


def tiny_mpnet(layers: int) -> dict:
    return {"model": "hf", "options": {"family": "mpnet", "tiny": {"layers": layers, "hidden": 16, "heads": 2, "intermediate": 32,
                                                                   "vocab_size": 200}, "dropout": 0.0}}


def test_an_outside_family_is_listed_built_refused_and_trained(tmp_path, external_plugin, capsys):  # noqa: F811
    code, out, _ = kdbench_here(capsys, "list", "families")
    line = next(l for l in out.splitlines() if l.startswith("mpnet"))
    assert code == 0 and line.rstrip().endswith("example-family")
    set_registry(None)
    registry = get_registry()
    try:
        from kdbench_plugins.models.hf import HFFactory, HFOptions

        torch.manual_seed(0)
        model = HFFactory().build(HFOptions(**tiny_mpnet(3)["options"], num_layers=2), Problem("classification", 2)).eval()
        ids = torch.randint(3, 200, (2, 6))
        out = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, need=model.capabilities)
        assert ATTENTION_SCORES not in model.capabilities and {ATTENTION_PROBS, VALUES, HIDDEN_STATES} <= model.capabilities
        assert len(out.hidden_states) == 3 and len(out.values) == 2 and out.values[0].shape == (2, 2, 6, 8)
        assert out.attention_probs[0].shape == (2, 2, 6, 6)

        teacher = {**tiny_mpnet(2), "train": {"budget": {"steps": 3, "batch_size": 8, "eval_every": 3}, "optimizer": {"name": "adamw", "lr": 0.001}}}
        data = smoke_data(teacher=teacher, students=[{**tiny_mpnet(1), "label": "mpnet-1L"}], methods=[{"name": "kd"}], seeds=[0],
                          tasks=[{"name": "movie-sentiment", "options": {"train_size": 120, "max_length": 16}}],
                          budget={"steps": 3, "batch_size": 8, "eval_every": 3, "log_every": 1})
        with pytest.raises(SuiteError, match=r"method 'tinybert' needs the student to expose \['attention_scores'\]"):
            build_suite({**data, "methods": [{"name": "tinybert"}], "baseline": "tinybert"}, registry=registry)
        run_local(build_suite(data, registry=registry), tmp_path, registry=registry, progress=False)
        (row,) = open_store(tmp_path).runs()
        assert row["status"] == "done", row["error"]
    finally:
        set_registry(None)
