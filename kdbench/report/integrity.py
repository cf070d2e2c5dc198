"""What a report says about the store rows it read: how many of the suite's runs were
verified by their checksum, how many were written before checksums existed (reported,
but unverified), which were left out because their row failed its checksum, and which
are simply not in the store yet. Every format prints these lines (see :func:`store_lines`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from kdbench.store import CORRUPT, FINISHED, UNVERIFIED, VERIFIED

#: At most this many run hashes are named per line (the rest are counted).
NAMED = 20


@dataclass
class StoreIntegrity:
    """The suite's finished runs by integrity (``verified``: count; the others: hashes),
    and ``missing``: runs of the suite with no row at all."""

    verified: int = 0
    unverified: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    missing: int = 0

    def table(self) -> pd.DataFrame:
        """One row per run that is not simply verified: hash and integrity (csv side file)."""
        rows = [(h, CORRUPT) for h in self.corrupt] + [(h, UNVERIFIED) for h in self.unverified]
        return pd.DataFrame(rows, columns=["hash", "integrity"])

    def as_dict(self) -> dict[str, Any]:
        return {"verified": self.verified, "unverified": list(self.unverified), "corrupt": list(self.corrupt),
                "missing": self.missing}


def store_integrity(rows: list[dict[str, Any]], wanted: set[str] | None) -> StoreIntegrity:
    """Classify ``rows`` (from ``ResultsStore.runs(include_corrupt=True)``) of the runs
    ``wanted`` (None: every row)."""
    out = StoreIntegrity()
    present = set()
    for r in rows:
        if wanted is not None and r["hash"] not in wanted:
            continue
        present.add(r["hash"])
        if r.get("integrity") == CORRUPT:
            out.corrupt.append(r["hash"])
        elif r.get("status") in FINISHED and r.get("integrity") == UNVERIFIED:
            out.unverified.append(r["hash"])
        elif r.get("status") in FINISHED and r.get("integrity") == VERIFIED:
            out.verified += 1
    out.missing = len(wanted - present) if wanted is not None else 0
    return out


def _named(hashes: list[str]) -> str:
    more = len(hashes) - NAMED
    return ", ".join(hashes[:NAMED]) + (f" and {more} more" if more > 0 else "")


def store_lines(integrity: StoreIntegrity | None) -> list[str]:
    """One sentence per kind of row that is not simply verified (none when all are)."""
    if integrity is None:
        return []
    lines = []
    if integrity.corrupt:
        lines.append(f"{len(integrity.corrupt)} run(s) of the suite left out: their stored rows failed their checksum "
                     f"(changed since they were written): {_named(integrity.corrupt)}; 'kdbench run' trains them again")
    if integrity.unverified:
        lines.append(f"{len(integrity.unverified)} finished run(s) were written before checksums existed and are reported "
                     f"unverified: {_named(integrity.unverified)}")
    if integrity.missing:
        lines.append(f"{integrity.missing} run(s) of the suite not in the store yet")
    return lines
