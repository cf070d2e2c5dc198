"""Training, split by concern:

- :mod:`~kdbench.train.environment`: seeding, the device, the environment record;
- :mod:`~kdbench.train.cost`: the cost meter (time, step spread, the run's own memory);
- :mod:`~kdbench.train.optim`: budgets, optimizers and schedules;
- :mod:`~kdbench.train.loop`: batches and the loop shared by teachers and students;
- :mod:`~kdbench.train.evaluation`: prediction, metrics, reported-evaluation selection;
- :mod:`~kdbench.train.inputs`: model factories and encoded splits;
- :mod:`~kdbench.train.artefacts`: checksummed, atomically written files;
- :mod:`~kdbench.train.teachers`: the teachers-first phase and the teacher files;
- :mod:`~kdbench.train.trackers`: a run's enabled trackers;
- :mod:`~kdbench.train.runner`: one student run.
"""

from kdbench.train.cost import CostMeter, keep_freed_memory
from kdbench.train.environment import deterministic_cpu, environment, pick_device, seed_everything
from kdbench.train.evaluation import evaluate, predict, select_metrics
from kdbench.train.inputs import encoded_splits, model_factory
from kdbench.train.loop import Diverged
from kdbench.train.optim import build_optimizer, total_steps
from kdbench.train.runner import Runner, RunResult
from kdbench.train.teachers import TeacherCheckpoint, TeacherFailed, fine_tune_teacher, provide_teacher

__all__ = [
    "CostMeter", "Diverged", "RunResult", "Runner", "TeacherCheckpoint", "TeacherFailed", "build_optimizer", "keep_freed_memory",
    "deterministic_cpu", "encoded_splits", "environment", "evaluate", "fine_tune_teacher", "model_factory",
    "pick_device", "predict", "provide_teacher", "seed_everything", "select_metrics", "total_steps",
]
