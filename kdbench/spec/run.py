"""A run spec: one run, fully resolved, and its content hash, which keys the results
store, the teacher cache and resume (nothing else decides what a run is)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from kdbench.spec.schema import Budget, Frozen, ModelSpec, OptimizerSpec, TaskSpec, TeacherSpec

#: Bump when the runner's semantics change so that old results are not reused.
PROTOCOL_VERSION = 1
#: How run hashes are computed. 2: the teacher is left out of the hash of a run whose
#: method uses no teacher (changing only the teacher no longer "changes" a ``none`` run).
#: Stores written under scheme 1 stay readable: :meth:`RunSpec.legacy_hash` is the old
#: hash, and the store adopts such rows (see ``ResultsStore.adopt_legacy``).
HASH_SCHEME = 2
#: Added to ``RunSpec.unhashed`` for runs whose method uses no teacher.
TEACHER_FREE = ("teacher",)


class RunSpec(Frozen):
    """One run, fully resolved: every plugin option with its default filled in."""

    protocol: int = PROTOCOL_VERSION
    task: TaskSpec
    task_version: int
    teacher: TeacherSpec | None
    student: ModelSpec
    method: str
    params: dict[str, Any]
    seed: int
    data_seed: int
    quiz_fraction: float
    budget: Budget
    optimizer: OptimizerSpec
    selection: Literal["final", "validation"]
    #: dotted paths of location options (data folders): not part of what the run *is*
    unhashed: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """The spec as hashed: display labels and location options left out."""
        return drop_paths(self.model_dump(mode="json", exclude={"student": {"label"}, "unhashed": True}), self.unhashed)

    @property
    def hash(self) -> str:
        return content_hash(self.identity())

    def _identity_with_teacher(self) -> dict[str, Any]:
        kept = tuple(p for p in self.unhashed if p not in TEACHER_FREE)
        return drop_paths(self.model_dump(mode="json", exclude={"student": {"label"}, "unhashed": True}), kept)

    @property
    def legacy_hash(self) -> str | None:
        """The hash under scheme 1 (teacher always hashed), where it differs from ``hash``."""
        if not set(TEACHER_FREE) <= set(self.unhashed):
            return None
        return content_hash(self._identity_with_teacher())

    @property
    def teacher_hash(self) -> str | None:
        if self.teacher is None:
            return None
        # the suite's teacher (also for a run whose method uses none, so reports still find it)
        ident = self._identity_with_teacher()
        return content_hash({"protocol": PROTOCOL_VERSION, "task": ident["task"], "task_version": self.task_version,
                             "teacher": ident["teacher"], "data_seed": self.data_seed, "quiz_fraction": self.quiz_fraction})

    @property
    def student_label(self) -> str:
        return self.student.label or describe_model(self.student)

    def params_label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))


def content_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def drop_paths(obj: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    for path in paths:
        *parents, leaf = path.split(".")
        node: Any = obj
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return obj



def describe_model(spec: ModelSpec) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(spec.options.items()) if k not in {"pretrained", "path"})
    return f"{spec.model}({opts})" if opts else spec.model

