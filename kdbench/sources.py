"""Local data files a task reads (``source_file``, a GLUE folder's TSVs): checked before
they are opened, so that every file-system case has a named error (exit code 2 at
``kdbench run``/``prepare``) instead of a hang, a traceback or a memory error.

A FIFO would block the reader forever, a character device (``/dev/zero``) never ends, a
directory or a dangling link is not a data file, and a file larger than
:func:`max_source_bytes` would be read whole into memory. Task plugins read a source
with :func:`read_source_file` (its bytes) or :func:`open_source_file` (a stream, for large
files parsed as they are read); :func:`check_source_file` only checks a path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO, Any

from kdbench.api import DataError

#: Default bound on one task source file; raise it with KDBENCH_MAX_SOURCE_BYTES.
MAX_SOURCE_BYTES = 4 * 2**30


def max_source_bytes() -> int:
    """The bound on one source file: ``KDBENCH_MAX_SOURCE_BYTES`` (bytes), else 4 GiB."""
    raw = os.environ.get("KDBENCH_MAX_SOURCE_BYTES")
    if raw is None:
        return MAX_SOURCE_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise DataError(f"environment variable KDBENCH_MAX_SOURCE_BYTES={raw[:40]!r} is not an integer") from None
    if value <= 0:
        raise DataError(f"environment variable KDBENCH_MAX_SOURCE_BYTES must be positive, got {value}")
    return value


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_source_file(path: str | Path, what: str) -> Path:
    """``path`` if it is a readable regular file within the size bound; else a
    :class:`~kdbench.api.DataError` that names ``what`` (e.g. ``"movie-sentiment:
    source_file"``), the path and which case it is: missing, a dangling link, a folder, a
    FIFO, a device, a socket, unreadable, or too large."""
    path = Path(path).expanduser()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist") from None
        raise DataError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what} {path} is {_kind(st.st_mode)}, not a data file: give a regular file")
    limit = max_source_bytes()
    if st.st_size > limit:
        raise DataError(f"{what} {path} is {st.st_size:,} bytes, over the limit of {limit:,} for one source file "
                        "(set KDBENCH_MAX_SOURCE_BYTES to allow more)")
    if not os.access(path, os.R_OK):
        raise DataError(f"{what} {path} cannot be read: permission denied")
    return path


def open_source_file(path: str | Path, what: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """A source file checked by :func:`check_source_file`, opened for reading (``mode``
    ``"rb"`` or ``"r"``; ``kwargs`` go to :func:`open`, e.g. ``encoding``). Opened with
    ``O_NONBLOCK`` and checked again on the open descriptor, so a file swapped for a FIFO
    or a device after the check can neither hang the open nor be read; the size bound is
    checked again there too. Use it as a context manager."""
    if mode not in ("rb", "r"):
        raise ValueError(f"open_source_file reads only ('rb' or 'r'), not {mode!r}")
    path = check_source_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_source_bytes():
        os.close(fd)
        why = f"changed into {_kind(st.st_mode)}" if not stat.S_ISREG(st.st_mode) else f"grew to {st.st_size:,} bytes"
        raise DataError(f"{what} {path} {why} while being opened")
    return os.fdopen(fd, mode, **kwargs)


def read_source_file(path: str | Path, what: str) -> bytes:
    """The bytes of a source file opened by :func:`open_source_file`, never more than the
    bound."""
    limit = max_source_bytes()
    with open_source_file(path, what) as fh:
        try:
            blob = fh.read(limit + 1)
        except OSError as exc:
            why = "the file is being changed" if exc.errno == errno.EAGAIN else exc.strerror or str(exc)
            raise DataError(f"{what} {path} cannot be read: {why}") from None
    if len(blob) > limit:
        raise DataError(f"{what} {path} grew past the limit of {limit:,} bytes while being read")
    return blob
