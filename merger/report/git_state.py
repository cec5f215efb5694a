"""The git commit and dirty flag of a recipe file, for the run report, read from the repository's files.

What: `git_state(path)` gives `{"repository", "commit", "dirty"}` for the file at `path`: the work
tree's top directory, the commit HEAD resolves to, and whether the file's content differs from its
content in that commit (True also when the commit does not track it).

How: walk up from the file's directory to a `.git` directory, or a `.git` file (`gitdir: <path>`, as
worktrees and submodules have; `commondir` says where refs and objects live); resolve HEAD through
loose refs and `packed-refs`; read the object format (`extensions.objectformat`, sha1 or sha256) from
`config`; then follow the commit's tree, path component by component, through the object store
(`merger.git_objects`), and compare the tree entry's blob id with the id of the bytes on disk (for a
symlink, of its target text).

Why: this used to run `git rev-parse` and `git status`. A recipe shared inside a git repository
brings that repository's configuration along, and git runs commands it names (core.fsmonitor,
filter drivers of `.gitattributes`, …), so recording the recipe's commit ran a command of the
recipe author's choosing. Reading a few files starts no process, and nothing here reads the
environment (GIT_DIR and the like). The repository is still untrusted input: every file is read with
a size cap, every chain is bounded (symbolic refs MAX_REF_CHAIN, `.git` files MAX_GITFILE_CHAIN, plus
the object store's bounds), and malformed content makes the part it affects None, never an exception.

`commit` is None, and `dirty` None with it, when HEAD or the config cannot be read: e.g. the reftable
ref storage, an unknown object format, a malformed ref. On an unborn branch (no commit yet) `commit` is
None and `dirty` True. `dirty` is None when the commit or a tree on the path cannot be read (missing
objects, as in partial clones; version 1 pack indexes; anything corrupt or over a bound), when the path
runs into a submodule, or when the file is neither a regular file, a symlink nor absent.

This is a comparison of raw bytes with HEAD, not `git status`: the index is not read (staged changes
count as dirty), nor `.gitignore` (an ignored file is untracked, so dirty), nor replace refs; no clean
filter or end-of-line conversion is applied (a file that git would normalize reads as dirty); and a
change of the executable bit alone is not reported.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from merger.report.git_objects import FAILURES, HASH_SIZES, GitFormatError, ObjectStore, read_capped

MAX_REF_CHAIN = 10
MAX_GITFILE_CHAIN = 4
MAX_TREE_ENTRIES = 1_000_000
_SMALL_CAP = 4096  # HEAD, loose refs, `.git` files, commondir
_CONFIG_CAP = 1 << 20
_PACKED_REFS_CAP = 64 << 20
_PER_WORKTREE_REFS = ("refs/worktree/", "refs/bisect/", "refs/rewritten/")
_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_MODE = re.compile(rb"[0-7]{1,7}")


@dataclass(frozen=True)
class _Repository:
    top: Path  # the work tree's top directory
    git_dir: Path  # HEAD and per-worktree refs
    common_dir: Path  # config, refs, packed-refs, objects


def git_state(path: Path) -> dict[str, object] | None:
    """`{"repository", "commit", "dirty"}` for the file at `path`, or None outside a git repository.

    `commit` is the hex id HEAD resolves to; `dirty` is True when the file's bytes differ from its
    blob in that commit or the commit does not track it, False when they are identical, None when
    that cannot be told simply and safely (see the module docstring). Never starts a process.
    """
    try:
        absolute = path.absolute()
        directory = Path(os.path.realpath(absolute.parent))  # as git sees its working directory
        repository = _find_repository(directory)
    except FAILURES:
        return None
    if repository is None:
        return None
    commit, dirty = _commit_and_dirty(repository, directory / absolute.name)
    return {"repository": str(repository.top), "commit": commit, "dirty": dirty}


def _commit_and_dirty(repository: _Repository, file: Path) -> tuple[str | None, bool | None]:
    try:
        algorithm = _object_format(repository.common_dir)
        commit = _resolve_head(repository, 2 * HASH_SIZES[algorithm])
    except FAILURES:
        return None, None
    if commit is None:
        return None, True  # unborn branch: nothing is tracked yet
    try:
        with ObjectStore(repository.common_dir / "objects", algorithm) as store:
            dirty = _dirty(store, commit, file.relative_to(repository.top), file)
    except FAILURES:
        dirty = None
    return commit, dirty


# --- finding the repository -------------------------------------------------------------------


def _find_repository(directory: Path) -> _Repository | None:
    """The repository whose work tree holds `directory`: the nearest `.git` up to the filesystem root."""
    if ".git" in directory.parts:
        return None  # inside a git directory, not a work tree
    for top in (directory, *directory.parents):
        dotgit = top / ".git"
        try:
            mode = os.stat(dotgit).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISDIR(mode):
            found = _repository(top, dotgit)
            if found is not None:
                return found  # else not a git directory (git skips it too): keep walking up
        elif stat.S_ISREG(mode):
            found = _repository(top, _follow_gitfile(dotgit))
            if found is None:
                raise GitFormatError(f"{dotgit} points to no git directory")
            return found
    return None


def _follow_gitfile(dotgit: Path) -> Path:
    """The directory a `.git` file (`gitdir: <path>`, relative to the file's directory) leads to."""
    current = dotgit
    for _ in range(MAX_GITFILE_CHAIN):
        data = read_capped(current, _SMALL_CAP)
        if data is None:
            raise GitFormatError(f"{current} does not exist")
        text = data.decode("utf-8").strip()
        if not text.startswith("gitdir:") or not text[len("gitdir:") :].strip():
            raise GitFormatError(f"{current} is not a gitdir file")
        target = Path(text[len("gitdir:") :].strip())
        current = target if target.is_absolute() else current.parent / target
        if current.is_dir():
            return current
    raise GitFormatError(f"more than {MAX_GITFILE_CHAIN} gitdir files in a chain")


def _repository(top: Path, git_dir: Path) -> _Repository | None:
    """`git_dir` as a repository when it looks like one (HEAD; objects and refs in its common dir)."""
    common_dir = git_dir
    data = read_capped(git_dir / "commondir", _SMALL_CAP)
    if data is not None:
        target = Path(data.decode("utf-8").strip())
        common_dir = target if target.is_absolute() else git_dir / target
    if not ((git_dir / "HEAD").is_file() and (common_dir / "objects").is_dir() and (common_dir / "refs").is_dir()):
        return None
    return _Repository(top, git_dir, common_dir)


# --- config and refs ---------------------------------------------------------------------------


def _object_format(common_dir: Path) -> str:
    """The repository's hash ("sha1" unless `extensions.objectformat` says otherwise).

    Only the `[extensions]` section is read (no includes, as git reads the repository format); ref
    storage other than files (reftable) is refused, since refs could not be read.
    """
    data = read_capped(common_dir / "config", _CONFIG_CAP) or b""
    keys = _extensions(data.decode("utf-8", "replace"))
    if keys.get("refstorage", "files").lower() != "files":
        raise GitFormatError("unsupported ref storage")
    algorithm = keys.get("objectformat", "sha1").lower()
    if algorithm not in HASH_SIZES:
        raise GitFormatError(f"unsupported object format {algorithm!r}")
    return algorithm


def _extensions(text: str) -> dict[str, str]:
    """The `objectformat` and `refstorage` keys of a config's `[extensions]` section (last one wins)."""
    keys: dict[str, str] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            end = line.find("]")
            if end < 0:
                raise GitFormatError("malformed config section header")
            section, line = line[1:end].strip().lower(), line[end + 1 :].strip()
        if section != "extensions" or not line or line[0] in "#;":
            continue
        key, equals, value = line.partition("=")
        key = key.strip().lower()
        if key in ("objectformat", "refstorage"):
            keys[key] = _config_value(value) if equals else "true"
    return keys


def _config_value(text: str) -> str:
    """A config value without quotes and trailing comment; escapes are refused (not needed here)."""
    out: list[str] = []
    quoted = False
    for ch in text.strip():
        if ch == '"':
            quoted = not quoted
        elif ch == "\\":
            raise GitFormatError("escapes in config values are not supported")
        elif not quoted and ch in "#;":
            break
        else:
            out.append(ch)
    return "".join(out).strip()


def _resolve_head(repository: _Repository, hex_len: int) -> str | None:
    """The commit id HEAD resolves to (following at most MAX_REF_CHAIN symbolic refs); None if unborn."""
    data = read_capped(repository.git_dir / "HEAD", _SMALL_CAP)
    for _ in range(MAX_REF_CHAIN + 1):
        if data is None:
            return None
        text = data.decode("utf-8").rstrip()
        if not text.startswith("ref:"):
            return _hex_id(text.split(None, 1)[0] if text else "", hex_len)
        name = text[len("ref:") :].strip()
        _check_ref_name(name)
        data = _read_ref(repository, name, hex_len)
    raise GitFormatError(f"more than {MAX_REF_CHAIN} symbolic refs in a chain")


def _hex_id(text: str, hex_len: int) -> str:
    if len(text) != hex_len or not re.fullmatch(r"[0-9a-fA-F]+", text):
        raise GitFormatError(f"not an object id: {text[:80]!r}")
    return text.lower()


def _check_ref_name(name: str) -> None:
    """Refuse anything but a plain `refs/…` name: no `..`, no dot-files, no odd characters."""
    parts = name.split("/")
    if parts[0] != "refs" or len(parts) < 2 or name.endswith(".") or _BAD_REF_CHARS.search(name):
        raise GitFormatError(f"unsupported ref name {name[:80]!r}")
    for part in parts:
        if not part or part.startswith(".") or part.endswith(".lock") or ".." in part or "@{" in part:
            raise GitFormatError(f"unsupported ref name {name[:80]!r}")


def _read_ref(repository: _Repository, name: str, hex_len: int) -> bytes | None:
    """The loose ref file's content, else the id `packed-refs` gives; None when the ref does not exist."""
    base = repository.git_dir if name.startswith(_PER_WORKTREE_REFS) else repository.common_dir
    data = read_capped(base.joinpath(*name.split("/")), _SMALL_CAP)
    if data is not None:
        return data
    packed = read_capped(repository.common_dir / "packed-refs", _PACKED_REFS_CAP)
    wanted = name.encode("utf-8")
    for line in (packed or b"").split(b"\n"):
        if not line or line.startswith(b"#"):
            continue  # the header (`# pack-refs with: peeled fully-peeled sorted`)
        if line.startswith(b"^"):
            _hex_id(line[1:].decode("ascii"), hex_len)  # the peeled id of the tag above
            continue
        oid, space, ref = line.partition(b" ")
        if not space:
            raise GitFormatError("malformed packed-refs line")
        if ref == wanted:
            return _hex_id(oid.decode("ascii"), hex_len).encode("ascii")
    return None


# --- the file against HEAD's tree ------------------------------------------------------------


def _dirty(store: ObjectStore, commit: str, relative: Path, file: Path) -> bool | None:
    """Whether `file` (at `relative` in the work tree) differs from its entry in `commit`'s tree."""
    names = [os.fsencode(part) for part in relative.parts]
    if not names:
        return None
    found = store.read(bytes.fromhex(commit))
    if found is None or found[0] != "commit":
        return None
    tree = _commit_tree(found[1], 2 * store.hash_size)
    for i, name in enumerate(names):
        entry = _tree_entry(store, tree, name)
        if entry is None:
            return True  # not tracked in HEAD
        kind, oid = entry
        if kind == 0o160000:
            return None  # a submodule: its own repository would have to tell
        if i == len(names) - 1:
            break
        if kind != 0o040000:
            return True  # HEAD has a file where the path has a directory: not tracked
        tree = oid
    if kind == 0o040000:
        return True  # a directory in HEAD: the file is not tracked
    on_disk = _disk_blob(file, store.algorithm)
    return on_disk != (kind, oid)


def _commit_tree(commit: bytes, hex_len: int) -> bytes:
    """The tree id of a commit object (its first line, `tree <hex>`)."""
    line = commit.split(b"\n", 1)[0]
    if not line.startswith(b"tree "):
        raise GitFormatError("commit without a tree line")
    return bytes.fromhex(_hex_id(line[len(b"tree ") :].decode("ascii"), hex_len))


def _tree_entry(store: ObjectStore, tree: bytes, name: bytes) -> tuple[int, bytes] | None:
    """The (file type bits of the mode, id) of `name` in tree `tree`; None when the tree has no such entry."""
    found = store.read(tree)
    if found is None or found[0] != "tree":
        raise GitFormatError("tree object unreadable")
    data, pos, size = found[1], 0, store.hash_size
    for _ in range(MAX_TREE_ENTRIES):
        if pos >= len(data):
            return None
        space = data.find(b" ", pos, pos + 8)
        nul = data.find(b"\0", space + 1) if space >= 0 else -1
        if nul < 0 or nul + 1 + size > len(data) or not _MODE.fullmatch(data, pos, space):
            raise GitFormatError("malformed tree entry")
        if data[space + 1 : nul] == name:
            return int(data[pos:space], 8) & 0o170000, data[nul + 1 : nul + 1 + size]
        pos = nul + 1 + size
    raise GitFormatError(f"tree with more than {MAX_TREE_ENTRIES} entries")


def _disk_blob(file: Path, algorithm: str) -> tuple[int, bytes] | None:
    """The (file type bits, blob id) git would give `file` as it is on disk; None when it is absent.

    A symlink's blob is its target text; a regular file's is its raw bytes, hashed as they are read
    (no clean filter or end-of-line conversion, which are what could run commands in git).
    """
    try:
        info = os.lstat(file)
    except (FileNotFoundError, NotADirectoryError):
        return None
    h = hashlib.new(algorithm, usedforsecurity=False)
    if stat.S_ISLNK(info.st_mode):
        target = os.fsencode(os.readlink(file))
        h.update(b"blob %d\0%s" % (len(target), target))
        return 0o120000, h.digest()
    if not stat.S_ISREG(info.st_mode):
        raise GitFormatError(f"{file} is neither a file nor a symlink")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    with os.fdopen(os.open(file, flags), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise GitFormatError(f"{file} changed while being read")
        h.update(b"blob %d\0" % size)
        read = 0
        while chunk := f.read(1 << 20):
            read += len(chunk)
            h.update(chunk)
    if read != size:
        raise GitFormatError(f"{file} changed while being read")
    return 0o100000, h.digest()
