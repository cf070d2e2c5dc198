"""The method catalogue as a Markdown table, generated from the registry
(``kdbench list methods --format md``), so the README's table cannot go stale.

One row per registered method: its name, :attr:`kdbench.api.Method.formula` (or its
description where a plugin gives no formula), its citation, what it reads from the models
(the union of ``student_needs`` and ``teacher_needs`` in words) and whether MetaDistil-style
strategies can wrap it (:meth:`kdbench.api.Method.is_loss_based`).
"""

from __future__ import annotations

from kdbench.api import ATTENTION_PROBS, ATTENTION_SCORES, EMBEDDING, FEATURES, HIDDEN_STATES, KEYS, LOGITS, PREACT_FEATURES, QUERIES, VALUES, Method
from kdbench.registry import Registry

#: what a ModelOutput field is called in the table, in the order the table lists them
NEEDS_WORDS = {LOGITS: "logits", HIDDEN_STATES: "hidden states", ATTENTION_SCORES: "attention", ATTENTION_PROBS: "attention",
               QUERIES: "q/k/v", KEYS: "q/k/v", VALUES: "q/k/v", FEATURES: "features", PREACT_FEATURES: "features", EMBEDDING: "embedding"}
#: the markers between which README.md holds the generated table
BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"


def needs_in_words(cls: type[Method]) -> str:
    """What the method reads from the models, e.g. ``logits, features`` (``labels`` for
    a method without a teacher that reads only the student's logits)."""
    needs = set(cls.student_needs) | (set(cls.teacher_needs) if cls.uses_teacher else set())
    words = dict.fromkeys(NEEDS_WORDS.get(n, n.replace("_", " ")) for n in sorted(needs, key=lambda n: (list(NEEDS_WORDS).index(n) if n in NEEDS_WORDS else len(NEEDS_WORDS), n)))
    return ", ".join(words)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def methods_markdown(registry: Registry, pattern: str = "*") -> str:
    """The Markdown table of the registered methods matching ``pattern``, sorted by name,
    ending with a newline."""
    rows = ["| method | loss | citation | reads | MetaDistil can wrap it |", "|---|---|---|---|---|"]
    for entry in registry.listing("methods", pattern):
        cls = entry.cls
        formula = f"`{cls.formula}`" if cls.formula else _cell(cls.description)
        wrap = "yes" if cls.is_loss_based() else "no"
        rows.append(f"| `{cls.name}` | {formula.replace('|', chr(92) + '|')} | {_cell(cls.citation) or '-'} | {needs_in_words(cls)} | {wrap} |")
    return "\n".join(rows) + "\n"


def between_markers(text: str) -> str | None:
    """What ``text`` holds between :data:`BEGIN` and :data:`END` (stripped), or None when
    it lacks either marker."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
