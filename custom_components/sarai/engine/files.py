"""Open local files safely: regular files only, whatever they are named and however they are reached.

A FIFO, a character device (``/dev/zero``), a socket or a directory behind a path (or behind a
symlink, or swapped in between a check and the open) must never reach a reader: opening a FIFO
for reading blocks until a writer appears, and ``/dev/zero`` never ends. So every local file
SARAi reads (model files, images, clips) is resolved (``realpath``), checked with ``stat`` to be
a regular file, opened with ``O_NONBLOCK`` (a FIFO open returns at once instead of blocking) and
``O_NOFOLLOW``, and checked again with ``fstat`` on the opened descriptor, which is what is read.
"""

from __future__ import annotations

import os
from pathlib import Path
import stat
from typing import BinaryIO

from .errors import EngineError, InvalidInput

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_FLAGS |= getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)


class MissingError(InvalidInput):
    """A media file that does not exist or cannot be read (``file_missing``)."""

    translation_key = "file_missing"


class NotRegularError(InvalidInput):
    """A path that names a directory, device, FIFO or socket (``file_not_regular``)."""

    translation_key = "file_not_regular"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"  # pragma: no cover - no other kinds on Linux


def resolve_regular(
    path: str | os.PathLike[str],
    *,
    missing: type[EngineError] = MissingError,
    not_regular: type[EngineError] = NotRegularError,
) -> str:
    """The real path (symlinks resolved) of a regular file; raise ``missing`` / ``not_regular`` otherwise."""
    real = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(real)
    except OSError as err:
        raise missing(f"cannot stat {path}: {err.strerror}", path=path) from err
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(f"{path} is a {_kind(st.st_mode)}, not a regular file", key="file_not_regular", path=path)
    return real


def open_regular(
    path: str | os.PathLike[str],
    *,
    missing: type[EngineError] = MissingError,
    not_regular: type[EngineError] = NotRegularError,
) -> BinaryIO:
    """Open a regular file for binary reading without ever blocking on a FIFO or device.

    The returned file object reads the descriptor that was checked with ``fstat``, so a file swapped
    for a FIFO between the check and the open is refused, not read.
    """
    real = resolve_regular(path, missing=missing, not_regular=not_regular)
    try:
        fd = os.open(real, _FLAGS)
    except OSError as err:  # swapped for a symlink (ELOOP), removed, or no permission
        raise missing(f"cannot open {path}: {err.strerror}", path=path) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(
                f"{path} became a {_kind(st.st_mode)} while it was opened", key="file_not_regular", path=path
            )
        if _FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: str | os.PathLike[str],
    max_bytes: int,
    *,
    too_large: type[EngineError] = InvalidInput,
    missing: type[EngineError] = MissingError,
    not_regular: type[EngineError] = NotRegularError,
) -> bytes:
    """Read a whole regular file of at most ``max_bytes`` bytes (bounded even if it grows while read)."""
    with open_regular(path, missing=missing, not_regular=not_regular) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = b"" if size > max_bytes else fh.read(max_bytes + 1)
    if size > max_bytes or len(data) > max_bytes:  # too large, or grew past the limit while read
        raise too_large(
            f"{path} has {max(size, len(data))} bytes (at most {max_bytes})",
            key="file_too_large",
            path=path,
            max_mb=max_bytes // (1024 * 1024),
        )
    return data


def file_size(fh: BinaryIO) -> int:
    """Size of an opened file, from its descriptor."""
    return os.fstat(fh.fileno()).st_size


def display_name(path: str | os.PathLike[str]) -> str:
    """A file's name for messages (never its directory)."""
    return Path(os.fspath(path)).name or os.fspath(path)
