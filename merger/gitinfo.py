"""The git commit and dirty flag of a recipe file, for the run report."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _git(directory: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(path: Path) -> dict[str, object] | None:
    """{commit, dirty, repository} for the file at `path`, or None outside a repository.

    `dirty` is true when the file differs from the commit or is not tracked.
    """
    directory = path.parent
    top = _git(directory, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    commit = _git(directory, "rev-parse", "HEAD")
    status = _git(directory, "status", "--porcelain", "--", path.name)
    return {"repository": top, "commit": commit, "dirty": bool(status) if status is not None else None}
