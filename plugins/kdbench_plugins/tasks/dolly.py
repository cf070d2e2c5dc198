"""``dolly``: instruction following on databricks-dolly-15k (objective ``generation``), the
data set of MiniLLM's, GKD's and DistiLLM's instruction-following evaluations.

Conover et al., "Free Dolly: Introducing the World's First Truly Open Instruction-Tuned
LLM", Databricks 2023 (CC BY-SA 3.0). Read from the hub (``databricks/databricks-dolly-15k``,
needs the internet the first time) or from a local JSON-lines file in the same format
(``source_file``: one object per line with ``instruction``, ``context``, ``response``,
``category``). Prompts use the Alpaca template MiniLLM uses (with the ``### Input:``
block only when the example has a context). Split as in MiniLLM (Gu et al., ICLR 2024):
a seeded permutation, ``test_size`` test and ``validation_size`` validation examples, the
rest for training; examples with an empty response are dropped (MiniLLM's further length
filtering is not reproduced: prompts or references past ``max_length`` tokens are cut by
the model's encoding, and a prompt that alone passes it is a named error).
Main metric: ROUGE-L, as the papers report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from kdbench.api import DataError, Examples, Options, Task, location
from kdbench.generation import PromptResponseTask
from kdbench.hookspecs import hookimpl
from kdbench.sources import read_source_file

HUB_NAME = "databricks/databricks-dolly-15k"
HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


class DollyOptions(Options):
    test_size: int = Field(500, ge=1)
    validation_size: int = Field(500, ge=1)
    train_size: int | None = Field(None, ge=1, description="subsample the training split")
    seed: int = Field(0, ge=0, description="seed of the split")
    max_new_tokens: int = Field(256, ge=1, description="decoding cap")
    max_length: int = Field(512, ge=8, description="prompt plus reference tokens at most")
    source_file: str | None = location(description="a local JSON-lines file in dolly-15k's format (skips the hub)")


def prompt(instruction: str, context: str) -> str:
    """MiniLLM's (Alpaca's) prompt for one example."""
    if context.strip():
        return f"{HEADER}### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"{HEADER}### Instruction:\n{instruction}\n\n### Response:\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a local dolly-format file; a malformed line is a :class:`DataError`
    naming the file and the line."""
    rows = []
    try:  # through kdbench.sources: a FIFO, a device, a folder or an oversized file is named, never a hang
        text = read_source_file(path, "dolly: source_file").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        missing = [k for k in ("instruction", "response") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}:{lineno}: missing text field(s) {missing}")
        rows.append(row)
    return rows


def read_hub(cache_dir: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset

        return list(load_dataset(HUB_NAME, split="train", cache_dir=cache_dir))
    except Exception as exc:  # offline, or the hub refused: name it with the way out
        raise DataError(f"dolly: cannot load '{HUB_NAME}' from the hub ({type(exc).__name__}: {str(exc)[:200]}); "
                        "pass options.source_file (a JSON-lines file in its format)") from None


class Dolly(PromptResponseTask):
    name = "dolly"
    description = "databricks-dolly-15k instruction following (hub or a local JSON-lines file), MiniLLM's split; ROUGE-L."
    version = 1
    modality = "text"
    Options = DollyOptions

    objective = "generation"  # type: ignore[assignment]

    @property
    def main_metric(self) -> str:
        return "rougeL"

    def load(self, cache_dir: str) -> dict[str, Examples]:
        o = self.options
        rows = read_jsonl(Path(o.source_file)) if o.source_file else read_hub(cache_dir)
        rows = [r for r in rows if r["response"].strip()]
        if len(rows) <= o.test_size + o.validation_size:
            raise DataError(f"dolly: {len(rows)} examples leave none for training after {o.test_size} test and {o.validation_size} validation")
        order = np.random.default_rng(o.seed).permutation(len(rows))
        parts = {"test": order[:o.test_size], "validation": order[o.test_size:o.test_size + o.validation_size],
                 "train": order[o.test_size + o.validation_size:]}
        if o.train_size is not None:
            parts["train"] = parts["train"][:o.train_size]
        out: dict[str, Examples] = {}
        for split, idx in parts.items():
            refs = [rows[i]["response"].strip() for i in idx]
            out[split] = {"prompt": [prompt(rows[i]["instruction"], rows[i].get("context") or "") for i in idx], "reference": refs,
                          "label": np.array(refs, dtype=object), "category": [str(rows[i].get("category", "")) for i in idx]}
        return out

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError("the generation objective scores decoded text itself")


@hookimpl
def kdbench_tasks() -> list[type[Task]]:
    return [Dolly]
