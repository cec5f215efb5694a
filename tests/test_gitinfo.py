"""git_state reads a recipe's commit and dirty flag from the repository's files, starting no process.

The repositories are built with the real `git` (the tests' own, trusted use of it), and every answer
in the ordinary cases is compared with what `git rev-parse` and `git status --porcelain` say. Hostile
repositories (core.fsmonitor, filter drivers) must not run anything; corrupt ones must not raise or hang.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import merger.report.git_objects
import merger.report.git_state
from merger.report.git_objects import MAX_DELTA_DEPTH, ObjectStore, object_id
from merger.report.git_state import git_state


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        HOME=str(home),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    return env


def git(cwd: Path, *args: str, check: bool = True) -> str:
    """Run the real git in `cwd` (HOME is the test's directory: no user or system config)."""
    done = subprocess.run(["git", *args], cwd=cwd, env=_env(_home(cwd)), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip() if done.returncode == 0 else ""


def _home(cwd: Path) -> Path:
    """The test directory above `cwd` (each test's tmp_path holds a `.home` marker directory)."""
    for parent in (cwd, *cwd.parents):
        if (parent / ".home").is_dir():
            return parent / ".home"
    raise AssertionError(f"no .home above {cwd}")


def init(root: Path, *args: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    git(root, "-c", "init.defaultBranch=main", "init", "-q", *args)
    return root


def commit_all(repo: Path, message: str = "c") -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def expected(repo: Path, file: Path) -> dict[str, object]:
    """What real git says: the top level, `rev-parse HEAD`, and whether `status --porcelain` lists the file."""
    status = git(file.parent, "status", "--porcelain", "--", file.name)
    return {
        "repository": git(file.parent, "rev-parse", "--show-toplevel"),
        "commit": git(repo, "rev-parse", "--verify", "-q", "HEAD", check=False) or None,
        "dirty": bool(status),
    }


def assert_like_git(repo: Path, file: Path) -> dict[str, object] | None:
    state = git_state(file)
    assert state == expected(repo, file)
    return state


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / ".home").mkdir()
    return tmp_path


def _write_history(repo: Path, commits: int = 6) -> None:
    """Several commits of similar, large-ish files, so that `git gc` stores deltas (trees too)."""
    for n in range(commits):
        (repo / "sub").mkdir(exist_ok=True)
        lines = [f"line {i}: weight {i * 7 % 13} {'changed ' * (i % 5 == n % 5)}" for i in range(1500)]
        (repo / "data.txt").write_text("\n".join(lines))
        for j in range(40):
            (repo / "sub" / f"part_{j:02d}.yaml").write_text(f"part: {j}\nround: {n if j < 3 else 0}\n")
        (repo / "sub" / "recipe.yaml").write_text(f"recipe:\n  alpha: 0.5\n  round: {n}\n" + "x: 1\n" * 200)
        commit_all(repo, f"round {n}")


# --- ordinary repositories, compared with git -----------------------------------------------------


def test_not_in_a_repository(home: Path) -> None:
    (home / "plain").mkdir()
    (home / "plain" / "recipe.yaml").write_text("a: 1\n")
    assert git(home / "plain", "rev-parse", "--show-toplevel", check=False) == ""
    assert git_state(home / "plain" / "recipe.yaml") is None


def test_clean_modified_untracked_staged(home: Path) -> None:
    repo = init(home / "repo")
    (repo / "recipe.yaml").write_text("a: 1\n")
    head = commit_all(repo)
    clean = assert_like_git(repo, repo / "recipe.yaml")
    assert clean == {"repository": str(repo.resolve()), "commit": head, "dirty": False}

    (repo / "recipe.yaml").write_text("a: 2\n")
    assert assert_like_git(repo, repo / "recipe.yaml") == {**clean, "dirty": True}

    git(repo, "add", "recipe.yaml")  # staged, not committed: still differs from HEAD
    assert assert_like_git(repo, repo / "recipe.yaml") == {**clean, "dirty": True}

    (repo / "new.yaml").write_text("b: 1\n")
    assert assert_like_git(repo, repo / "new.yaml") == {**clean, "dirty": True}
    git(repo, "add", "new.yaml")
    assert assert_like_git(repo, repo / "new.yaml") == {**clean, "dirty": True}

    (repo / "recipe.yaml").write_text("a: 1\n")  # back to HEAD's content, with a different index
    assert git_state(repo / "recipe.yaml") == clean


def test_relative_path_and_subdirectory(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = init(home / "repo")
    _write_history(repo, commits=2)
    assert_like_git(repo, repo / "sub" / "recipe.yaml")
    monkeypatch.chdir(repo / "sub")
    assert git_state(Path("recipe.yaml")) == expected(repo, repo / "sub" / "recipe.yaml")
    (repo / "sub" / "recipe.yaml").write_text("changed\n")
    assert git_state(Path("recipe.yaml"))["dirty"] is True  # type: ignore[index]


def test_packed_objects_deltas_and_packed_refs(home: Path) -> None:
    repo = init(home / "repo")
    _write_history(repo)
    files = [repo / "sub" / "recipe.yaml", repo / "data.txt", repo / "sub" / "part_01.yaml"]
    (repo / "sub" / "part_01.yaml").write_text("modified\n")
    before = [assert_like_git(repo, f) for f in files]
    assert [s["dirty"] for s in before if s] == [False, False, True]

    git(repo, "gc", "-q", "--aggressive")
    git(repo, "pack-refs", "--all")
    assert not list((repo / ".git" / "objects").glob("??/*")), "gc should leave no loose objects"
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    (idx,) = (repo / ".git" / "objects" / "pack").glob("*.idx")
    assert "chain length" in git(repo, "verify-pack", "-v", str(idx)), "the pack should hold deltas"
    assert [git_state(f) for f in files] == before

    # REF_DELTA entries instead of OFS_DELTA ones.
    git(repo, "-c", "repack.useDeltaBaseOffset=false", "repack", "-q", "-a", "-d", "-f")
    assert [git_state(f) for f in files] == before


@pytest.mark.parametrize("offsets", [True, False], ids=["ofs-delta", "ref-delta"])
def test_object_store_reads_every_packed_object_like_cat_file(home: Path, offsets: bool) -> None:
    """An independent check of the pack reader: every object, deltas included, as `git cat-file --batch`."""
    repo = init(home / "repo")
    _write_history(repo)
    git(repo, "-c", f"repack.useDeltaBaseOffset={str(offsets).lower()}", "repack", "-q", "-a", "-d", "-f")
    listing = git(repo, "cat-file", "--batch-all-objects", "--batch-check")
    batch = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch"],
        cwd=repo,
        env=_env(_home(repo)),
        capture_output=True,
        check=True,
    ).stdout
    pos = 0
    with ObjectStore(repo / ".git" / "objects", "sha1") as store:
        for line in listing.splitlines():
            oid, kind, size = line.split()
            header = f"{oid} {kind} {size}\n".encode()
            assert batch[pos : pos + len(header)] == header
            pos += len(header)
            content = batch[pos : pos + int(size)]
            pos += int(size) + 1
            assert store.read(bytes.fromhex(oid)) == (kind, content)


def test_detached_head_and_symbolic_ref_chain(home: Path) -> None:
    repo = init(home / "repo")
    (repo / "recipe.yaml").write_text("a: 1\n")
    first = commit_all(repo)
    (repo / "recipe.yaml").write_text("a: 2\n")
    commit_all(repo)
    git(repo, "checkout", "-q", "--detach", first)
    assert (repo / ".git" / "HEAD").read_text().strip() == first
    assert assert_like_git(repo, repo / "recipe.yaml")["commit"] == first  # type: ignore[index]

    git(repo, "checkout", "-q", "main")
    git(repo, "symbolic-ref", "refs/heads/alias", "refs/heads/main")
    git(repo, "symbolic-ref", "HEAD", "refs/heads/alias")
    assert_like_git(repo, repo / "recipe.yaml")
    # A loop of symbolic refs is cut off: commit and dirty unknown.
    (repo / ".git" / "refs" / "heads" / "main").write_text("ref: refs/heads/alias\n")
    state = git_state(repo / "recipe.yaml")
    assert state == {"repository": str(repo.resolve()), "commit": None, "dirty": None}


def test_worktree(home: Path) -> None:
    repo = init(home / "repo")
    _write_history(repo, commits=2)
    git(repo, "gc", "-q")
    git(repo, "worktree", "add", "-q", "-b", "other", str(home / "wt"))
    wt = home / "wt"
    assert (wt / ".git").is_file()
    (wt / "sub" / "recipe.yaml").write_text("in the worktree\n")
    commit_all(wt)
    for file in (wt / "sub" / "recipe.yaml", wt / "data.txt"):
        assert_like_git(wt, file)
    assert git_state(wt / "data.txt")["repository"] == str(wt.resolve())  # type: ignore[index]
    assert git_state(repo / "sub" / "recipe.yaml") == expected(repo, repo / "sub" / "recipe.yaml")
    assert git_state(wt / "sub" / "recipe.yaml")["commit"] != git_state(repo / "data.txt")["commit"]  # type: ignore[index]


def test_dotgit_file_pointing_elsewhere(home: Path) -> None:
    (home / "store").mkdir()
    repo = init(home / "repo", f"--separate-git-dir={home / 'store' / 'repo.git'}")
    assert (repo / ".git").read_text().startswith("gitdir: /")
    (repo / "recipe.yaml").write_text("a: 1\n")
    commit_all(repo)
    assert_like_git(repo, repo / "recipe.yaml")
    # A relative gitdir is relative to the directory of the `.git` file.
    (repo / ".git").write_text("gitdir: ../store/repo.git\n")
    assert_like_git(repo, repo / "recipe.yaml")
    # A `.git` file that leads nowhere: not a repository (git refuses it too).
    (repo / ".git").write_text("gitdir: ../nowhere\n")
    assert git_state(repo / "recipe.yaml") is None


def test_environment_is_not_read(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = init(home / "repo")
    other = init(home / "other")
    (repo / "recipe.yaml").write_text("a: 1\n")
    commit_all(repo)
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(other))
    monkeypatch.setenv("GIT_OBJECT_DIRECTORY", str(other / ".git" / "objects"))
    state = git_state(repo / "recipe.yaml")
    monkeypatch.delenv("GIT_DIR")
    monkeypatch.delenv("GIT_WORK_TREE")
    monkeypatch.delenv("GIT_OBJECT_DIRECTORY")
    assert state == expected(repo, repo / "recipe.yaml")


def test_sha256_repository(home: Path) -> None:
    repo = home / "repo"
    repo.mkdir()
    done = subprocess.run(
        ["git", "init", "-q", "--object-format=sha256"], cwd=repo, env=_env(_home(repo)), capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("this git cannot make sha256 repositories")
    _write_history(repo, commits=3)
    state = assert_like_git(repo, repo / "sub" / "recipe.yaml")
    assert state is not None and len(str(state["commit"])) == 64
    git(repo, "gc", "-q", "--aggressive")
    assert git_state(repo / "sub" / "recipe.yaml") == state
    (repo / "data.txt").write_text("other\n")
    assert_like_git(repo, repo / "data.txt")


def test_repository_format_from_config(home: Path) -> None:
    repo = init(home / "repo")
    (repo / "recipe.yaml").write_text("a: 1\n")
    commit_all(repo)
    answer = expected(repo, repo / "recipe.yaml")
    config = repo / ".git" / "config"
    original = config.read_text()
    unknown = {"repository": answer["repository"], "commit": None, "dirty": None}
    for extra, state in [
        ('[Extensions] objectFormat = "sha1" ; a comment\n', answer),
        ('[extensions "x"]\n\tobjectformat = sha256\n', answer),  # a subsection: another section
        ("[extensions]\n\tobjectformat = sha512\n", unknown),
        ("[extensions]\n\trefstorage = reftable\n", unknown),
        ("[extensions]\n\tobjectformat = sha\\\n1\n", unknown),  # a continuation line: refused
    ]:
        config.write_text(original + extra)
        assert git_state(repo / "recipe.yaml") == state, extra


def test_unborn_repository(home: Path) -> None:
    repo = init(home / "repo")
    (repo / "recipe.yaml").write_text("a: 1\n")
    assert git_state(repo / "recipe.yaml") == {"repository": str(repo.resolve()), "commit": None, "dirty": True}
    git(repo, "add", "recipe.yaml")
    assert git_state(repo / "recipe.yaml") == expected(repo, repo / "recipe.yaml")


def test_symlinks_and_directories_in_the_tree(home: Path) -> None:
    repo = init(home / "repo")
    (repo / "target.yaml").write_text("a: 1\n")
    (repo / "link.yaml").symlink_to("target.yaml")
    (repo / "d").mkdir()
    (repo / "d" / "inner.yaml").write_text("b: 1\n")
    commit_all(repo)
    assert assert_like_git(repo, repo / "link.yaml")["dirty"] is False  # type: ignore[index]
    (repo / "link.yaml").unlink()
    (repo / "link.yaml").symlink_to("d/inner.yaml")  # another target: dirty, whatever the content
    assert assert_like_git(repo, repo / "link.yaml")["dirty"] is True  # type: ignore[index]
    (repo / "link.yaml").unlink()
    (repo / "link.yaml").write_text("target.yaml")  # a regular file with the link's text: a type change
    assert assert_like_git(repo, repo / "link.yaml")["dirty"] is True  # type: ignore[index]
    # A path that is a directory in HEAD, and a path under a file of HEAD: not tracked.
    shutil.rmtree(repo / "d")
    (repo / "d").write_text("now a file\n")
    assert assert_like_git(repo, repo / "d")["dirty"] is True  # type: ignore[index]
    (repo / "target.yaml").unlink()
    (repo / "target.yaml").mkdir()
    (repo / "target.yaml" / "x.yaml").write_text("c: 1\n")
    assert assert_like_git(repo, repo / "target.yaml" / "x.yaml")["dirty"] is True  # type: ignore[index]


def test_alternates(home: Path) -> None:
    source = init(home / "source")
    _write_history(source, commits=2)
    git(source, "gc", "-q")
    git(home, "clone", "-q", "--shared", str(source), str(home / "clone"))
    clone = home / "clone"
    assert (clone / ".git" / "objects" / "info" / "alternates").is_file()
    assert not list((clone / ".git" / "objects").glob("pack/*.idx"))
    assert_like_git(clone, clone / "sub" / "recipe.yaml")
    (clone / ".git" / "objects" / "info" / "alternates").write_text("/nonexistent\n")
    state = git_state(clone / "sub" / "recipe.yaml")
    assert state is not None and state["commit"] is not None and state["dirty"] is None


def test_submodule(home: Path) -> None:
    inner = init(home / "inner")
    (inner / "recipe.yaml").write_text("a: 1\n")
    commit_all(inner)
    outer = init(home / "outer")
    (outer / "top.yaml").write_text("t: 1\n")
    git(outer, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(inner), "sub")
    commit_all(outer)
    assert (outer / "sub" / ".git").is_file()
    state = assert_like_git(outer / "sub", outer / "sub" / "recipe.yaml")
    assert state is not None and state["repository"] == str((outer / "sub").resolve())
    assert_like_git(outer, outer / "top.yaml")
    # Without the submodule's `.git`, the path runs into a gitlink of the outer tree: unknown.
    git(outer, "submodule", "deinit", "-q", "-f", "sub")
    (outer / "sub" / "stray.yaml").write_text("s: 1\n")
    assert git_state(outer / "sub" / "stray.yaml") == {
        "repository": str(outer.resolve()),
        "commit": git(outer, "rev-parse", "HEAD"),
        "dirty": None,
    }


def test_inside_the_git_directory(home: Path) -> None:
    repo = init(home / "repo")
    assert git_state(repo / ".git" / "config") is None


# --- hostile repositories -------------------------------------------------------------------------


def test_fsmonitor_and_filter_drivers_do_not_run(home: Path) -> None:
    repo = init(home / "repo")
    (repo / "recipe.yaml").write_text("a: 1\n")
    (repo / ".gitattributes").write_text("*.yaml filter=x\n")
    commit_all(repo)
    answer = expected(repo, repo / "recipe.yaml")
    markers = [home / "fsmonitor-ran", home / "filter-ran"]
    git(repo, "config", "core.fsmonitor", f"touch {markers[0]}; false")
    git(repo, "config", "filter.x.clean", f"touch {markers[1]}; cat")
    git(repo, "config", "filter.x.smudge", f"touch {markers[1]}; cat")
    os.utime(repo / "recipe.yaml", (1e9, 1e9))  # stat info differs from the index: git would re-hash
    assert git_state(repo / "recipe.yaml") == answer
    assert not any(m.exists() for m in markers)
    # The trap is real: git itself runs both commands.
    git(repo, "status", "--porcelain")
    assert all(m.exists() for m in markers)


def test_special_files_and_zlib_bomb(home: Path) -> None:
    repo = init(home / "repo")
    (repo / "recipe.yaml").write_text("a: 1\n")
    head = commit_all(repo)
    loose = repo / ".git" / "objects" / head[:2] / head[2:]
    loose.chmod(0o644)
    loose.write_bytes(zlib.compress(b"commit 104857600\0" + bytes(100 << 20), 9))  # inflates to 100 MiB
    start = time.monotonic()
    assert git_state(repo / "recipe.yaml") == {"repository": str(repo.resolve()), "commit": head, "dirty": None}
    assert time.monotonic() - start < 2
    (repo / ".git" / "refs" / "heads" / "main").unlink()
    os.mkfifo(repo / ".git" / "refs" / "heads" / "main")  # a blocking read would hang
    assert git_state(repo / "recipe.yaml") == {"repository": str(repo.resolve()), "commit": None, "dirty": None}
    (repo / "fifo.yaml").unlink(missing_ok=True)
    os.mkfifo(repo / "fifo.yaml")
    state = git_state(repo / "fifo.yaml")
    assert state is not None and state["dirty"] is None


def _pack_and_index(directory: Path, entries: list[tuple[bytes, bytes]]) -> None:
    """Write `objects/pack/pack-x.{pack,idx}` (version 2) from (object id, raw entry bytes) pairs."""
    pack = bytearray(b"PACK" + struct.pack(">II", 2, len(entries)))
    offsets = {}
    for oid, raw in entries:
        offsets[oid] = len(pack)
        pack += raw
    pack += hashlib.sha1(pack).digest()
    names = sorted(offsets)
    fanout = [sum(1 for n in names if n[0] <= b) for b in range(256)]
    idx = b"\xfftOc" + struct.pack(">I", 2) + struct.pack(">256I", *fanout) + b"".join(names)
    idx += bytes(4 * len(names)) + b"".join(struct.pack(">I", offsets[n]) for n in names) + pack[-20:]
    (directory / "pack").mkdir(parents=True)
    (directory / "pack" / "pack-x.pack").write_bytes(pack)
    (directory / "pack" / "pack-x.idx").write_bytes(idx + hashlib.sha1(idx).digest())


def _entry_header(kind: int, size: int) -> bytes:
    out = bytearray([(kind << 4) | (size & 0x0F)])
    size >>= 4
    while size:
        out[-1] |= 0x80
        out.append(size & 0x7F)
        size >>= 7
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        if n <= 0x7F:
            return bytes(out)
        n >>= 7


def _ofs(distance: int) -> bytes:
    out = [distance & 0x7F]
    distance >>= 7
    while distance:
        distance -= 1
        out.insert(0, 0x80 | (distance & 0x7F))
        distance >>= 7
    return bytes(out)


def test_delta_chains_are_bounded(tmp_path: Path) -> None:
    """A hand-made pack: a chain of OFS_DELTAs deeper than the bound, and a REF_DELTA based on itself."""
    contents = [b"x"]
    entries = [(object_id("blob", b"x", "sha1"), _entry_header(3, 1) + zlib.compress(b"x"))]
    position = 12 + len(entries[0][1])
    positions = [12]
    for _ in range(MAX_DELTA_DEPTH + 5):
        base = contents[-1]
        delta = _varint(len(base)) + _varint(len(base) + 1) + b"\x90" + bytes([len(base)]) + b"\x01y"
        raw = _entry_header(6, len(delta)) + _ofs(position - positions[-1]) + zlib.compress(delta)
        contents.append(base + b"y")
        entries.append((object_id("blob", contents[-1], "sha1"), raw))
        positions.append(position)
        position += len(raw)
    loop = object_id("blob", b"loop", "sha1")
    delta = _varint(4) + _varint(4) + b"\x04loop"
    entries.append((loop, _entry_header(7, len(delta)) + loop + zlib.compress(delta)))
    _pack_and_index(tmp_path / "objects", entries)
    with ObjectStore(tmp_path / "objects", "sha1") as store:
        assert store.read(entries[MAX_DELTA_DEPTH][0]) == ("blob", contents[MAX_DELTA_DEPTH])
        assert store.read(entries[MAX_DELTA_DEPTH + 2][0]) is None
        assert store.read(loop) is None
        assert store.read(entries[3][0]) == ("blob", b"xyyy")


def test_never_imports_subprocess() -> None:
    for module in (merger.report.git_state, merger.report.git_objects):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {str(n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"subprocess", "multiprocessing", "pty", "shlex"}, module.__name__
        assert "subprocess" not in Path(str(module.__file__)).read_text()
        assert "os.system" not in Path(str(module.__file__)).read_text()


# --- corrupt repositories (property) --------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[Path, Path, dict[str, object]]]]:
    """(file to corrupt, recipe, right answer): a fully packed repository and a loose one."""
    root = tmp_path_factory.mktemp("corpus")
    (root / ".home").mkdir()
    packed = init(root / "packed")
    _write_history(packed, commits=4)
    git(packed, "gc", "-q", "--aggressive")
    git(packed, "pack-refs", "--all")
    loose = init(root / "loose")
    _write_history(loose, commits=2)
    cases = []
    for repo in (packed, loose):
        recipe = repo / "sub" / "recipe.yaml"
        answer = expected(repo, recipe)
        head = str(answer["commit"])
        dot = repo / ".git"
        targets = [dot / "HEAD", dot / "packed-refs", *dot.glob("objects/pack/*.idx"), *dot.glob("objects/pack/*.pack")]
        if repo is loose:
            tree = git(repo, "rev-parse", "HEAD^{tree}")
            sub = git(repo, "rev-parse", "HEAD:sub")
            targets = [dot / "HEAD", dot / "refs" / "heads" / "main"]
            targets += [dot / "objects" / h[:2] / h[2:] for h in (head, tree, sub)]
        for target in targets:
            assert target.is_file(), target
            target.chmod(0o644)
            cases.append((target, recipe, answer))
    yield cases


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    choice=st.integers(min_value=0),
    edits=st.lists(st.tuples(st.floats(min_value=0, max_value=1), st.integers(0, 255)), min_size=1, max_size=4),
    truncate=st.one_of(st.none(), st.floats(min_value=0, max_value=1)),
)
def test_corrupt_repository_never_raises_or_hangs(
    corpus: list[tuple[Path, Path, dict[str, object]]],
    choice: int,
    edits: list[tuple[float, int]],
    truncate: float | None,
) -> None:
    target, recipe, answer = corpus[choice % len(corpus)]
    original = target.read_bytes()
    data = bytearray(original)
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    if truncate is not None:
        del data[int(truncate * len(data)) :]
    try:
        target.write_bytes(bytes(data))
        start = time.monotonic()
        state = git_state(recipe)
        assert time.monotonic() - start < 2
    finally:
        target.write_bytes(original)
    assert state is not None and state["repository"] == answer["repository"]
    assert state["commit"] is None or isinstance(state["commit"], str)
    assert state["dirty"] in (None, True, False)
    if state["commit"] == answer["commit"] and state["dirty"] is not None:
        assert state["dirty"] == answer["dirty"]  # objects are checked against their ids: never a wrong answer


def test_delta_bases_that_fan_out_are_cut_off(tmp_path: Path) -> None:
    """Four packs whose REF_DELTA bases alternate between two pairs of packs: every level doubles the
    paths a naive search follows (2**80 here), and the deltas are empty, so no inflate budget is spent."""
    levels = 80
    ids = [hashlib.sha1(b"L%d" % i).digest() for i in range(levels + 1)]
    git = tmp_path / ".git"
    (git / "objects" / "pack").mkdir(parents=True)
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(ids[0].hex() + "\n")
    for p in range(4):
        objects = sorted((ids[level], level) for level in range(levels) if level % 2 == p // 2)
        body = b"PACK" + struct.pack(">II", 2, len(objects))
        offsets = {}
        for oid, level in sorted(objects, key=lambda item: item[1]):
            offsets[oid] = len(body)
            body += bytes([0x70]) + ids[level + 1] + zlib.compress(b"")  # REF_DELTA on the next level's object
        body += hashlib.sha1(body).digest()
        fan = [0] * 256
        for oid, _ in objects:
            fan[oid[0]] += 1
        cumulative = [sum(fan[: i + 1]) for i in range(256)]
        idx = b"\xfftOc" + struct.pack(">I", 2) + struct.pack(">256I", *cumulative)
        idx += b"".join(oid for oid, _ in objects) + b"\0\0\0\0" * len(objects)
        idx += b"".join(struct.pack(">I", offsets[oid]) for oid, _ in objects) + hashlib.sha1(body).digest()
        idx += hashlib.sha1(idx).digest()
        (git / "objects" / "pack" / f"pack-{p:040x}.pack").write_bytes(body)
        (git / "objects" / "pack" / f"pack-{p:040x}.idx").write_bytes(idx)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("x: 1\n")
    start = time.perf_counter()
    state = git_state(recipe)
    assert time.perf_counter() - start < 5
    assert state is not None and state["commit"] == ids[0].hex() and state["dirty"] is None
