"""Opening a file that must be a regular file: a FIFO, a device or a socket at a model's (or a
record's) path would block a plain `open` forever, or never end."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

NOT_REGULAR = "not a regular file (a FIFO, a device or a socket?)"


def open_regular(path: Path) -> BinaryIO:
    """`open(path, "rb")`, refusing anything but a regular file without blocking on it (OSError)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: Path, limit: int) -> tuple[bytes, int]:
    """A regular file's bytes when it holds at most `limit` (else b""), and its size as found (the
    larger of its stat size and what was read, so a file that grows while read still counts)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    return (data if len(data) <= limit else b""), max(size, len(data))
