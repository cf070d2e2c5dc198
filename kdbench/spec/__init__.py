"""Suite files and run specs.

A suite (YAML in ``benchmarks/``) is validated once, when it is loaded, against the
schema *and* against the options each plugin declares; then it expands into frozen
:class:`RunSpec` objects. A run spec's content hash keys the results store, the teacher
cache and resume: nothing else decides what a run is.

The package is split by concern, and every name is importable from here as well:

- :mod:`kdbench.spec.schema`: the suite file's sections (pydantic models), its bounds
  and :class:`SuiteError`;
- :mod:`kdbench.spec.run`: :class:`RunSpec`, its hash and the hashing scheme;
- :mod:`kdbench.spec.building`: loading a suite, checking it against the plugins and
  expanding it into runs (:func:`load_suite`, :func:`build_suite`, :class:`Suite`);
- :mod:`kdbench.spec.schedules`: learning-rate schedules (:func:`lr_factor`).
"""

from kdbench.spec.building import (RESERVED_ROWS, Suite, build_suite, entry_settings, expand_grid, load_suite,
                                   selected_label)
from kdbench.spec.run import (HASH_SCHEME, PROTOCOL_VERSION, TEACHER_FREE, RunSpec, content_hash, describe_model,
                              drop_paths)
from kdbench.spec.schedules import lr_factor
from kdbench.spec.schema import (MAX_BATCH, MAX_EPOCHS, MAX_PROBLEMS_SHOWN, MAX_RUNS, MAX_SEED, MAX_STEPS, Budget, Frozen,
                                 Label, MethodEntry, ModelSpec, OptimizerSpec, PairSpec, Reference, Resources, SuiteError,
                                 SuiteSpec, TaskSpec, TeacherSpec, TeacherTraining, WithAddedFields, budget_limit,
                                 check_results_setting, printable_text, same_label)

__all__ = [
    "HASH_SCHEME", "MAX_BATCH", "MAX_EPOCHS", "MAX_PROBLEMS_SHOWN", "MAX_RUNS", "MAX_SEED", "MAX_STEPS", "PROTOCOL_VERSION",
    "RESERVED_ROWS", "TEACHER_FREE", "Budget", "Frozen", "Label", "MethodEntry", "ModelSpec", "OptimizerSpec", "PairSpec",
    "Reference", "Resources", "RunSpec", "Suite", "SuiteError", "SuiteSpec", "TaskSpec", "TeacherSpec", "TeacherTraining",
    "WithAddedFields", "budget_limit", "build_suite", "check_results_setting", "content_hash", "describe_model",
    "drop_paths", "entry_settings", "expand_grid", "load_suite", "lr_factor", "printable_text", "same_label",
    "selected_label",
]
