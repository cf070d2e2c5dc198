"""``algorithmic``: seeded, offline prompt -> response tasks on digit strings, for causal
LMs trained from scratch on a CPU (objective ``generation``).

* ``addition``: ``"357+86="`` -> ``"443"`` (operands of ``digits`` digits each, so carries
  are common);
* ``reversal``: ``"35786>"`` -> ``"68753"``;
* ``sorting``: ``"35786:"`` -> ``"35678"``.

Splits, all drawn from one ``numpy`` generator seeded by ``seed`` (the task's own data
seed, part of every run's hash): ``train``, ``validation`` and ``test`` with lengths in
``digits`` (validation and test prompts never seen in train), and ``test_long``, the
length-generalisation split: lengths in ``long_digits``, longer than anything in training.
Main metric: exact match. ``max_new_tokens`` (the decoding cap) is the longest possible
answer plus its end token plus ``slack``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from kdbench.api import Examples, Options, Task
from kdbench.generation import PromptResponseTask
from kdbench.hookspecs import hookimpl

SEPARATOR = {"addition": "=", "reversal": ">", "sorting": ":"}


class AlgorithmicOptions(Options):
    kind: Literal["addition", "reversal", "sorting"] = "addition"
    train_size: int = Field(2000, ge=1)
    eval_size: int = Field(200, ge=1, description="examples in validation, test and test_long each")
    digits: tuple[int, int] = Field((1, 4), description="inclusive range of lengths (addition: digits per operand) in train/validation/test")
    long_digits: tuple[int, int] = Field((5, 6), description="inclusive range of lengths of the length-generalisation split")
    seed: int = Field(0, ge=0, description="seed of the examples")
    slack: int = Field(2, ge=0, description="decoding cap beyond the longest possible answer")

    @model_validator(mode="after")
    def _ranges(self) -> "AlgorithmicOptions":
        (lo, hi), (llo, lhi) = self.digits, self.long_digits
        if not 1 <= lo <= hi:
            raise ValueError(f"digits must be 1 <= low <= high, got {self.digits}")
        if not hi < llo <= lhi:
            raise ValueError(f"long_digits {self.long_digits} must be longer than anything in digits {self.digits}")
        return self


def _number(rng: np.random.Generator, length: int) -> str:
    first = str(rng.integers(1, 10)) if length > 1 else str(rng.integers(0, 10))
    return first + "".join(str(d) for d in rng.integers(0, 10, length - 1))


def example(kind: str, rng: np.random.Generator, lo: int, hi: int) -> tuple[str, str]:
    """One (prompt, reference) of ``kind`` with lengths drawn uniformly in ``[lo, hi]``."""
    if kind == "addition":
        a, b = _number(rng, int(rng.integers(lo, hi + 1))), _number(rng, int(rng.integers(lo, hi + 1)))
        return f"{a}+{b}=", str(int(a) + int(b))
    s = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(lo, hi + 1))))
    return s + SEPARATOR[kind], s[::-1] if kind == "reversal" else "".join(sorted(s))


def draw(kind: str, rng: np.random.Generator, n: int, lo: int, hi: int, exclude: set[str]) -> Examples:
    """``n`` distinct examples whose prompts are not in ``exclude`` (which grows by them)."""
    prompts: list[str] = []
    refs: list[str] = []
    tries = 0
    while len(prompts) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct '{kind}' examples of lengths {lo}..{hi}: ask for fewer")
        p, r = example(kind, rng, lo, hi)
        if p not in exclude:
            exclude.add(p)
            prompts.append(p)
            refs.append(r)
    return {"prompt": prompts, "reference": refs, "label": np.array(refs, dtype=object)}


class Algorithmic(PromptResponseTask):
    name = "algorithmic"
    description = "Seeded digit tasks (addition with carries, reversal, sorting) for causal LMs, with a longer test_long split; exact match."
    version = 1
    modality = "text"
    Options = AlgorithmicOptions

    objective = "generation"  # type: ignore[assignment]

    @property
    def main_metric(self) -> str:
        return "exact_match"

    @property
    def max_new_tokens(self) -> int:
        longest = self.options.long_digits[1] + (1 if self.options.kind == "addition" else 0)
        return longest + 1 + self.options.slack

    @property
    def max_length(self) -> int:  # type: ignore[override]
        prompt = 2 * self.options.long_digits[1] + 2
        return prompt + self.max_new_tokens

    def load(self, cache_dir: str) -> dict[str, Examples]:
        o = self.options
        rng = np.random.default_rng(o.seed)
        seen: set[str] = set()
        train = draw(o.kind, rng, o.train_size, *o.digits, seen)
        return {"train": train, "validation": draw(o.kind, rng, o.eval_size, *o.digits, seen),
                "test": draw(o.kind, rng, o.eval_size, *o.digits, seen), "test_long": draw(o.kind, rng, o.eval_size, *o.long_digits, seen)}

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError("the generation objective scores decoded text itself")


@hookimpl
def kdbench_tasks() -> list[type[Task]]:
    return [Algorithmic]
