"""Task data for runs: fixed splits, the quiz split, and encoded tensors cached across runs.

Integrity: :attr:`TaskData.fingerprints` hashes the examples actually read (so a changed
local data file is noticed even though its *path* is not part of a run's hash), and every
encoded split on disk carries a sha256 of its tensors in its safetensors metadata, checked
when it is read; a file that fails the check is rebuilt with a warning naming it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from kdbench.api import DataError, Encoded, Examples, ModelFactory, Objective, Options, Task, unhashed_fields
from kdbench.registry import Registry, get_registry
from kdbench.spec import TaskSpec, content_hash

TRAIN, VALIDATION, TEST, QUIZ = "train", "validation", "test", "quiz"


def cache_dir() -> Path:
    """Downloads and encoded splits live here (``KDBENCH_CACHE``, default ~/.cache/kdbench)."""
    return Path(os.environ.get("KDBENCH_CACHE", Path.home() / ".cache" / "kdbench"))


def quiz_split(n_train: int, fraction: float, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, quiz indices): a fixed ``fraction`` of the training split carved out
    by the task-level seed. The same for every method, so the quiz gives no method extra data."""
    if fraction <= 0:
        return np.arange(n_train), np.arange(0)
    rng = np.random.default_rng(data_seed)
    perm = rng.permutation(n_train)
    n_quiz = max(1, int(round(fraction * n_train)))
    return np.sort(perm[n_quiz:]), np.sort(perm[:n_quiz])


def _take(examples: Examples, index: np.ndarray) -> Examples:
    out: Examples = {}
    for key, col in examples.items():
        out[key] = col[index] if isinstance(col, np.ndarray) else [col[i] for i in index]
    return out


@dataclass
class TaskData:
    """A task's splits after the quiz carve-out: ``splits[name]`` are raw examples."""

    task: Task
    splits: dict[str, Examples]
    _fingerprints: dict[str, dict[str, object]] | None = field(default=None, repr=False)
    _objective: Objective | None = field(default=None, repr=False)

    @property
    def objective(self) -> Objective:
        """The objective the task names, built for it (from the process registry when
        this TaskData was made by hand)."""
        if self._objective is None:
            self._objective = get_registry().objective_for(self.task)
        return self._objective

    @property
    def fingerprints(self) -> dict[str, dict[str, object]]:
        """``{split: {"sha256": ..., "n": examples}}`` of the examples as read (after the
        quiz carve-out). Runs record it in ``env["data"]``; a finished run whose recorded
        fingerprint differs from the current data was trained on other data."""
        if self._fingerprints is None:
            self._fingerprints = {name: {"sha256": examples_sha256(ex), "n": len(ex["label"])} for name, ex in self.splits.items()}
        return self._fingerprints

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in self.splits if s not in (TRAIN, QUIZ)]

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.splits[split]["label"])


def examples_sha256(examples: Examples) -> str:
    """A content hash of a split's columns (names, dtypes, shapes and values), independent
    of where the data came from."""
    digest = hashlib.sha256()
    for key in sorted(examples):
        col = examples[key]
        digest.update(f"\0col:{key}\0".encode())
        if isinstance(col, np.ndarray):
            arr = np.ascontiguousarray(col)
            digest.update(f"{arr.dtype.str}{arr.shape}".encode())
            digest.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode())
        else:
            for item in col:
                text = item if isinstance(item, str) else repr(item)
                raw = text.encode("utf-8", "surrogatepass")
                digest.update(len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over an encoded split's tensors (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"\0{key}\0{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _validate_splits(task: Task, objective: Objective, splits: dict[str, Examples]) -> None:
    for required in (TRAIN, VALIDATION, TEST):
        if required not in splits:
            raise DataError(f"task '{task.name}' did not provide a '{required}' split")
    for name, ex in splits.items():
        if "label" not in ex:
            raise DataError(f"task '{task.name}': split '{name}' has no labels")
        n = len(ex["label"])
        if n == 0:
            raise DataError(f"task '{task.name}': split '{name}' is empty")
        for key, col in ex.items():
            if len(col) != n:
                raise DataError(f"task '{task.name}': split '{name}' column '{key}' has {len(col)} rows, labels have {n}")
        objective.check_labels(name, np.asarray(ex["label"]))


def local_label_problems(registry: Registry, spec: TaskSpec) -> list[str]:
    """Why the labels of task ``spec`` do not fit its objective, where the task can read
    them cheaply (:meth:`Task.local_labels`): what ``kdbench validate`` reports, so a bad
    label is refused before any run starts rather than when its data loads. Empty when
    they fit or the task cannot read them without loading its data."""
    cls = registry.task(spec.name)
    task = cls(cls.Options.model_validate(spec.options))
    try:
        labels = task.local_labels()
        if not labels:
            return []
        objective = registry.objective_for(task)
        for split, values in labels.items():
            objective.check_labels(split, np.asarray(values))
    except DataError as exc:
        return [f"task '{spec.name}': {exc}" if f"'{spec.name}'" not in str(exc) else str(exc)]
    return []


_TASK_DATA: dict[tuple, TaskData] = {}


#: Files of a location (a data folder) looked at for :func:`location_signature`; a folder
#: with more is signed by its first this many (in sorted order).
MAX_SIGNED_FILES = 10_000


def _stat_signature(st: os.stat_result) -> tuple[int, ...]:
    # st_ctime_ns moves on every write and cannot be set back by a program
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def location_signature(path: str) -> tuple:
    """What identifies the current content of a local data path without reading it: the
    inode, size and modification/change times of the file, or of every file under the
    folder (up to :data:`MAX_SIGNED_FILES`); () for a path that does not exist (a hub
    name, a folder not made yet). A FIFO or device is stat'ed, never opened."""
    path = os.path.expanduser(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return ()
    if not stat.S_ISDIR(st.st_mode):
        return _stat_signature(st)
    out: list[tuple] = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            try:
                out.append((os.path.relpath(os.path.join(root, name), path), *_stat_signature(os.stat(os.path.join(root, name)))))
            except OSError:
                continue
            if len(out) >= MAX_SIGNED_FILES:
                return tuple(out)
    return tuple(out)


def _locations(registry: Registry, spec: TaskSpec) -> tuple:
    """:func:`location_signature` of each location option (a data folder, a source file)."""
    fields = unhashed_fields(registry.task(spec.name).Options)
    return tuple((f, location_signature(v)) for f in sorted(fields) if isinstance(v := spec.options.get(f), str))


def load_task_data(registry: Registry, spec: TaskSpec, quiz_fraction: float, data_seed: int) -> TaskData:
    """Load (memoised per process) a task's splits with the quiz carved out of train. The
    memo is keyed by the task spec *and* the signature of its data locations, so a file
    changed while the process lives (a Ray worker serving several ``kdbench run``) is read
    again instead of training on the old content under the new file's name."""
    key = (spec.model_dump_json(), quiz_fraction, data_seed, _locations(registry, spec))
    if key not in _TASK_DATA:
        cls = registry.task(spec.name)
        task = cls(cls.Options(**spec.options))
        loaded = task.load(str(cache_dir() / "data"))
        if not isinstance(loaded, dict) or not all(isinstance(v, dict) for v in loaded.values()):
            raise DataError(f"task '{spec.name}': load() returned {type(loaded).__name__}, expected a dict of splits (dicts of columns)")
        splits = dict(loaded)
        objective = registry.objective_for(task)
        _validate_splits(task, objective, splits)
        keep, quiz = quiz_split(len(splits[TRAIN]["label"]), quiz_fraction, data_seed)
        if keep.size == 0:
            raise DataError(f"task '{spec.name}': the train split has {len(splits[TRAIN]['label'])} example(s) and "
                            f"quiz_fraction {quiz_fraction} carves {quiz.size} out for the quiz, leaving none to train on: "
                            "use more training data or a smaller quiz_fraction")
        train = splits[TRAIN]
        splits[TRAIN] = _take(train, keep)
        if quiz.size:
            splits[QUIZ] = _take(train, quiz)
        for old in [k for k in _TASK_DATA if k[:3] == key[:3]]:  # the same task read before its files changed
            del _TASK_DATA[old]
        _TASK_DATA[key] = TaskData(task, splits, _objective=objective)
    return _TASK_DATA[key]


_ENCODED: dict[str, Encoded] = {}


def encode_split(
    factory: ModelFactory, options: Options, data: TaskData, split: str, key_parts: dict
) -> Encoded:
    """Encode a split for a model family, cached in memory and on disk (safetensors) under
    a key made of the task spec, the split, the split's *content* (its fingerprint: new
    text at the same path is a new key) and the encoder: tokenization runs once."""
    key = content_hash({**key_parts, "split": split, "encoder": factory.encoder_id(options), "max_length": data.task.max_length,
                        "content": data.fingerprints[split]["sha256"], **_encoder_files(factory, options)})
    if key in _ENCODED:
        return _ENCODED[key]
    path = cache_dir() / "encoded" / f"{key}.safetensors"
    enc = read_encoded(path) if path.exists() else None
    if enc is None:
        enc = {k: v.contiguous() for k, v in factory.encode(options, data.splits[split], data.task.max_length).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        # serialised here, not by save_file: the library's own temp file and rename would
        # leave a stray .tmpXXXXXX behind when killed
        try:
            tmp.write_bytes(save(enc, metadata={ENCODED_CHECKSUM: tensors_sha256(enc)}))
            os.replace(tmp, path)  # atomic: concurrent writers produce the same bytes
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the environment's, not the run's: exit 2
                from kdbench.train.artefacts import DiskFull

                raise DiskFull(f"cannot write the encoded split {path}: {exc.strerror}; free space on that disk "
                               "(or point KDBENCH_CACHE at another one) and run the same command again") from None
            raise
    _ENCODED[key] = enc
    return enc


def _encoder_files(factory: ModelFactory, options: Options) -> dict[str, str]:
    # only when there are files to hash: the keys of encoders without any stay as they were
    fingerprint = factory.encoder_fingerprint(options)
    return {"encoder_files": fingerprint} if fingerprint else {}


#: safetensors metadata key holding the sha256 of an encoded split's tensors.
ENCODED_CHECKSUM = "kdbench_sha256"


def read_encoded(path: Path) -> Encoded | None:
    """An encoded split from the cache if it is intact; None (rebuild it) otherwise: a torn
    write from a killed process, a file from before checksums, or one whose tensors no
    longer match their recorded sha256 (warned about, naming the file)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            recorded = (fh.metadata() or {}).get(ENCODED_CHECKSUM)
            enc = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is rebuilt
        warnings.warn(f"encoded split {path} cannot be read ({type(exc).__name__}); rebuilding it", stacklevel=3)
        return None
    if recorded is None:
        return None  # written before checksums: rebuilt once, quietly
    if recorded != tensors_sha256(enc):
        warnings.warn(f"encoded split {path} does not match its checksum (changed on disk); rebuilding it", stacklevel=3)
        return None
    return enc


def labels_tensor(data: TaskData, split: str) -> torch.Tensor:
    """A split's labels in the layout its objective trains on (:meth:`Objective.labels`)."""
    return data.objective.labels(data.labels(split))
