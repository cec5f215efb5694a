"""Files that appear whole or not at all: temporary name, fsync, rename.

A temporary file is named after its final path with the host and process that
writes it, so a crashed writer's leftovers can be recognised and removed, and
two writers never share a temporary file.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

TMP_MARK = ".merger-tmp-"


def tmp_path_for(path: Path) -> Path:
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    token = secrets.token_hex(4)
    return path.with_name(f"{path.name}{TMP_MARK}{host}-{os.getpid()}-{token}")


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


STALE_SECONDS = 24 * 3600


def is_stale_tmp(path: Path) -> bool:
    """A temporary file left by a process of this host that is no longer running, or by
    any host more than a day ago (a shared cache sees other machines' leftovers)."""
    name = path.name
    if TMP_MARK not in name:
        return False
    try:
        if time.time() - path.stat().st_mtime > STALE_SECONDS:
            return True
    except OSError:
        return False
    try:
        host, pid, _ = name.split(TMP_MARK, 1)[1].rsplit("-", 2)
        pid_number = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname().replace(".", "_").replace("-", "_"):
        return False
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
