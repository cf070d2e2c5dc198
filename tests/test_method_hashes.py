"""Run hashes change only where a run's meaning changed: every run in the committed stores
is re-validated through today's plugins and its hash recomputed. Only runs of methods
whose defaults changed meaning (pkd, tinybert and prokt version 2; metadistil wrapping
pkd, or with the old follow_student_schedule) get new hashes, and only when they were stored
before that change (results/nlp-cpu was recorded after it)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from kdbench.registry import get_registry
from kdbench.spec import RunSpec

STORES = sorted((Path(__file__).resolve().parents[1] / "results").glob("*/store.sqlite"))


#: the field each method's version 2 added (dumped with its default, so it changed the hash):
#: a stored run that already has it was recorded after the change and keeps its hash
VERSION_2_FIELD = {"pkd": "soft_reduction", "tinybert": "soft_reduction", "prokt": "teacher_init"}


def changed_meaning(method: str, params: dict) -> bool:
    if method in VERSION_2_FIELD:
        return VERSION_2_FIELD[method] not in params
    return method == "metadistil" and ((params.get("inner") == "pkd" and "inner_version" not in params)
                                       or params.get("follow_student_schedule") is True)


@pytest.mark.skipif(not STORES, reason="no committed stores")
@pytest.mark.parametrize("store", STORES, ids=lambda p: p.parent.name)
def test_stored_runs_keep_their_hashes_unless_their_meaning_changed(store: Path) -> None:
    registry = get_registry()
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT hash, method, spec FROM runs").fetchall()
    assert rows
    for stored_hash, method, spec_json in rows:
        spec = json.loads(spec_json)
        cls = registry.method(method)
        params = cls.Params.model_validate(spec["params"], context={"registry": registry}).model_dump(mode="json")
        new = RunSpec.model_validate({**spec, "params": params}).hash
        assert (new != stored_hash) == changed_meaning(method, spec["params"]), (store.parent.name, method, spec["params"])
