"""Suite dictionaries the runner, executor and fault tests start from."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"


def smoke_data(**changes) -> dict:
    """benchmarks/smoke.yaml (tiny BERTs on movie snippets) with ``changes`` applied."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(changes)
    return data
