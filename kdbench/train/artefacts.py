"""Files kdbench writes and later trusts (teacher checkpoints, teacher logits): written
atomically with a sha256 sidecar, verified when read, named when damaged."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from kdbench.api import KDBenchError

SIDECAR_SUFFIX = ".sha256"


class ArtefactError(KDBenchError):
    """A stored artefact that is missing, unreadable or does not match its checksum."""


class DiskFull(KDBenchError):
    """An artefact could not be written: the disk (or the user's quota) is full. Not a
    failed run or teacher: the command stops with exit code 2, naming the file; the run's
    or teacher's row says :data:`DISK_FULL_PREFIX` until the next command trains it."""


#: The error of a run or teacher row stopped by a full disk (until it is trained again).
DISK_FULL_PREFIX = "interrupted: disk full"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _temp(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_bytes(path: Path, blob: bytes) -> str:
    """Write ``blob`` to ``path`` atomically (temp file + rename), then its checksum
    sidecar; returns the sha256. A reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(blob).hexdigest()
    tmp = _temp(path)
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        return write_sidecar(path, sha)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"cannot write {path} ({len(blob):,} bytes): {exc.strerror}; free space on that disk "
                           "(or use --results on another disk) and run the same command again") from None
        raise


def write_sidecar(path: Path, sha: str | None = None) -> str:
    """Record the checksum of ``path`` beside it (``sha`` when the writer knows it; else
    computed, e.g. for a file an older kdbench wrote, checked readable first)."""
    sha = sha or sha256_file(path)
    side = _temp(sidecar(path))
    side.write_text(sha + "\n")
    os.replace(side, sidecar(path))
    return sha


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies that share no storage: safetensors refuses tensors that share
    memory (a language model's tied input and output embeddings); the second name gets
    its own copy, and loading the state dict ties them again through the model."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        t = value.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save tensors (and string ``metadata``) as safetensors at ``path`` with a checksum;
    returns the sha256. Serialised in memory and written by :func:`write_bytes`: the
    library's own file writer renames a ``.tmpXXXXXX`` file of its own, which a kill at
    the wrong moment would leave behind."""
    return write_bytes(path, save(_unshared(tensors), metadata=metadata))


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} when it has none or cannot be read)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable: the caller rebuilds it
        return {}


def expected_sha(path: Path) -> str | None:
    """The checksum recorded beside ``path`` (None for files written before checksums)."""
    try:
        return sidecar(path).read_text().strip() or None
    except OSError:
        return None


def verify(path: Path, what: str, sha: str | None = None) -> None:
    """Raise :class:`ArtefactError` naming ``path`` and ``what`` it is when the file is
    missing or its content does not match ``sha`` (default: its sidecar)."""
    if not path.is_file():
        raise ArtefactError(f"{what}: {path} is missing")
    want = sha or expected_sha(path)
    if want is not None and sha256_file(path) != want:
        raise ArtefactError(f"{what}: {path} does not match its recorded sha256 {want[:12]}... (damaged or changed)")


def read_tensors(path: Path, what: str, sha: str | None = None) -> dict[str, torch.Tensor]:
    """Verify and load a safetensors artefact; any damage is an :class:`ArtefactError`
    that names the file and what it belongs to."""
    verify(path, what, sha)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for truncated files
        raise ArtefactError(f"{what}: {path} cannot be read ({type(exc).__name__}: {exc})") from None


#: A library temp file (``.tmpXXXXXX``, as safetensors' writer names them) names no owner;
#: it is removed once it is this old (no artefact write takes this long).
LIBRARY_TEMP_STALE_S = 15 * 60


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files left in ``folder`` by a process killed between write and rename:
    ``<name>.<pid>.tmp`` whose pid no longer runs on this host, a legacy ``*.tmp``, and a
    library's ``.tmpXXXXXX`` (older kdbench let safetensors write through one) untouched
    for :data:`LIBRARY_TEMP_STALE_S`."""
    removed = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob("*.tmp"):
        pid = tmp.suffixes[-2][1:] if len(tmp.suffixes) >= 2 else ""
        if pid.isdigit() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    for tmp in folder.glob(".tmp*"):
        try:
            old = tmp.is_file() and time.time() - tmp.stat().st_mtime > LIBRARY_TEMP_STALE_S
        except OSError:
            continue
        if old and len(tmp.name) == 10:  # .tmp + 6 random characters
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host (one we may not signal counts)."""
    return _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
