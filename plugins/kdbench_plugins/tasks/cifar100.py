"""``cifar100``: CIFAR-100, 100 fine classes of 32x32 colour images; accuracy.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", tech. report, 2009.
The distillation setting of CRD (Tian et al., ICLR 2020) and its RepDistiller code.

Data: the standard *python version* (``cifar-100-python.tar.gz``, md5
``eb9058c3a382ffc7106e4002c42a8d85``): ``cifar-100-python/train`` (50,000 images) and
``test`` (10,000), pickled dicts with ``b"data"`` (N, 3072) uint8, rows of 1024 red, 1024
green, 1024 blue pixels, and ``b"fine_labels"``. (``meta`` holds only the class names and
is not needed.) The folder is option ``data_dir`` (the folder that holds
``cifar-100-python/``, or that folder itself), default ``<cache>/data/cifar100``. When the
files are missing: an archive already in that folder is verified and unpacked; otherwise,
with ``download: true``, the archive is fetched from the authors' site, its md5 checked and
its members checked before unpacking (regular files and folders under
``cifar-100-python/`` only: no absolute paths, ``..`` or links).

Pickle is the format these files are published in, and unpickling can run code. So only
the two expected files in the folder the user chose (or the checksummed download) are
read, with an unpickler that refuses every global but the numpy array constructors (and
``_codecs.encode``, which protocol 2 uses for bytes), through :mod:`kdbench.sources`: a
FIFO, a device, a folder or a file past the source size bound is a named error.

Splits: ``test`` = the official test set; ``validation`` = ``validation_size`` (default
5,000) training images held out by a fixed seed; ``train`` = the other 45,000 (or a
seeded subset of ``train_size`` of them, for smoke runs). The core carves its quiz split
out of ``train``.

Augmentation (``augment: true``, the CRD recipe): random 32x32 crop of the image padded
with 4 zero pixels on each side, then a horizontal flip with probability 1/2; batched on
the device, drawn from the run's seeded generator.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdbench.api import DataError, Examples, Options, Task, location
from kdbench.hookspecs import hookimpl
from kdbench.metrics import accuracy, carve_splits
from kdbench.sources import open_source_file

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
NUM_CLASSES, IMAGE_SHAPE, SPLIT_SEED, PADDING = 100, (3, 32, 32), 0, 4


class Cifar100Options(Options):
    data_dir: str | None = location(description="folder holding cifar-100-python/ (default: <cache>/data/cifar100)")
    download: bool = Field(True, description="download the archive when the files are missing")
    validation_size: int = Field(5000, gt=0, description="training images held out for validation")
    train_size: int | None = Field(None, gt=0, description="use a seeded subset of the training split")
    augment: bool = Field(True, description="random crop (4-pixel zero padding) and horizontal flip")


# --------------------------------------------------------------------------- files


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays; any other global is refused."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2: a pure function
        *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
        *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR file")
        with warnings.catch_warnings():  # numpy 2 warns on the numpy.core alias the files use
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), fine labels int64 (N,)) from one python-format file,
    opened through :func:`kdbench.sources.open_source_file` (a FIFO, a device, a folder or a
    file over the size bound is a named :class:`~kdbench.api.DataError`, never a hang)."""
    with open_source_file(path, "cifar100: data_dir file") as f:
        try:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except DataError:
            raise
        except MemoryError:
            raise DataError(f"{path}: not a CIFAR-100 python-format file (it asks for more memory than there is)") from None
        except Exception as exc:  # noqa: BLE001 - a damaged pickle raises nearly anything; each is this one error
            raise DataError(f"{path}: not a CIFAR-100 python-format file ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"fine_labels" not in batch:
        raise DataError(f"{path}: expected a dict with b'data' and b'fine_labels'")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != int(np.prod(IMAGE_SHAPE)):
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(f"{path}: row {int(bad[0])} has label {int(labels[bad[0]])}, outside 0..{NUM_CLASSES - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def find_folder(root: Path) -> Path | None:
    """The folder with ``train`` and ``test``: ``root/cifar-100-python`` or ``root`` itself.
    A folder where both names exist but one is not a regular file (a FIFO, a folder, a
    dangling link) is returned too, so that reading it names what is wrong instead of
    starting a download beside it."""
    for folder in (root / FOLDER, root):
        if (folder / "train").is_file() and (folder / "test").is_file():
            return folder
    for folder in (root / FOLDER, root):
        if os.path.lexists(folder / "train") and os.path.lexists(folder / "test"):
            return folder
    return None


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (raises ``urllib.error.URLError`` when offline)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack the regular files and folders of ``archive`` under ``dest/cifar-100-python``.

    Every member is checked before anything is written: a path that is absolute, climbs
    out with ``..``, lies outside the expected folder, or a member that is a link or a
    device makes the whole archive refused."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0] != FOLDER:
                    raise DataError(f"{archive}: refusing member '{m.name}' (outside {FOLDER}/)")
                if not (m.isfile() or m.isdir()):
                    raise DataError(f"{archive}: refusing member '{m.name}' (links and special files are not allowed)")
            root = dest.resolve()
            for m in members:
                target = (dest / m.name).resolve()
                if root not in target.parents:
                    raise DataError(f"{archive}: refusing member '{m.name}' (resolves outside {dest})")
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None  # a regular file always has contents
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot unpack ({exc})") from None


def unpack(archive: Path, root: Path) -> None:
    """Unpack into a private folder, then move ``cifar-100-python`` into place at once, so
    a concurrent run never reads half-written files."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
    try:
        safe_extract(archive, tmp)
        if find_folder(tmp / FOLDER) is None:
            raise DataError(f"{archive}: has no {FOLDER}/train and {FOLDER}/test")
        try:
            os.replace(tmp / FOLDER, root / FOLDER)
        except OSError as exc:
            if find_folder(root) is None:  # not another run's finished copy: a real failure
                raise DataError(f"cannot move the unpacked files to {root / FOLDER} ({exc}); remove that folder and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_files(root: Path, download: bool) -> Path:
    """The folder holding ``train`` and ``test``, unpacking or downloading when needed."""
    folder = find_folder(root)
    if folder is not None:
        return folder
    where = (
        f"put the python-format files at {root / FOLDER}/{{train,test}} (unpack {ARCHIVE} from {URL} "
        f"into {root}), or set the task option data_dir to the folder that holds them"
    )
    archive = root / ARCHIVE
    if archive.is_file():  # the user's own copy: checked, never deleted
        digest = md5sum(archive)
        if digest != MD5:
            raise DataError(f"{archive}: md5 {digest} does not match {MD5}; replace or remove it: {where}")
    elif not download:
        raise DataError(f"CIFAR-100 not found and download is off: {where}")
    else:
        root.mkdir(parents=True, exist_ok=True)
        part = root / f"{ARCHIVE}.{os.getpid()}.part"
        try:
            fetch(URL, part)
            digest = md5sum(part)
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, full disks
            part.unlink(missing_ok=True)
            raise DataError(f"CIFAR-100 not found and the download failed ({exc!r}): {where}") from None
        if digest != MD5:
            part.unlink(missing_ok=True)  # a truncated or tampered download must not be reused
            raise DataError(f"the download of {URL} has md5 {digest}, expected {MD5} (removed it): {where}")
        os.replace(part, archive)
    unpack(archive, root)
    folder = find_folder(root)
    if folder is None:  # pragma: no cover - unpack() checked it
        raise DataError(f"CIFAR-100 files missing after unpacking {archive}: {where}")
    return folder


# --------------------------------------------------------------------------- augmentation


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = PADDING) -> Tensor:
    """Random crops of the zero-padded images (same size as the input), each flipped
    left-right with probability 1/2. ``images`` is (B, C, H, W) on any device; per image
    the generator draws (row offset, column offset) in [0, 2*padding], then all B flips."""
    b, _, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator).to(images.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # advanced indices around a slice put the indexed dims first: (B, H, W, C)
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- the task


class Cifar100(Task):
    name = "cifar100"
    description = "CIFAR-100 (python-format files, downloaded where online), 100 classes; accuracy; crop+flip augmentation."
    version = 1
    modality = "image"
    Options = Cifar100Options

    objective = "classification"
    num_labels = NUM_CLASSES

    @property
    def main_metric(self) -> str:
        return "accuracy"

    @property
    def has_augmentation(self) -> bool:
        return self.options.augment

    def data_root(self, cache_dir: str) -> Path:
        return Path(self.options.data_dir).expanduser() if self.options.data_dir else Path(cache_dir) / "cifar100"

    def load(self, cache_dir: str) -> dict[str, Examples]:
        folder = ensure_files(self.data_root(cache_dir), self.options.download)
        train_x, train_y = read_batch(folder / "train")
        test_x, test_y = read_batch(folder / "test")
        n_val = self.options.validation_size
        if n_val >= len(train_y):
            raise DataError(f"cifar100: validation_size {n_val} leaves no training images (the train file has {len(train_y)})")
        parts = carve_splits(len(train_y), SPLIT_SEED, {"validation": n_val}, limits={"train": self.options.train_size}, sort=True)
        val_idx, train_idx = parts["validation"], parts["train"]
        return {
            "train": {"image": train_x[train_idx], "label": train_y[train_idx]},
            "validation": {"image": train_x[val_idx], "label": train_y[val_idx]},
            "test": {"image": test_x, "label": test_y},
        }

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": accuracy(predictions, labels)}

    def augment(self, inputs: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        if not self.options.augment:
            return inputs
        return {**inputs, "pixel_values": random_crop_flip(inputs["pixel_values"], generator)}


@hookimpl
def kdbench_tasks() -> list[type[Task]]:
    return [Cifar100]
