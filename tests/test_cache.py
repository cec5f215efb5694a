"""merger.cache.store, merger.cache.memo, merger.cache.atomic: the store, its locks, temporary files, the source memo.

This module imports no torch at module level, so the spawned lock holders start quickly.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import multiprocessing.sharedctypes
import multiprocessing.synchronize
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from merger.cache.atomic import TMP_MARK, is_stale_tmp, tmp_path_for, write_text_atomic
from merger.cache.memo import MemoEntry, SourceMemo, source_identity
from merger.cache.store import Cache
from merger.core.specs import TensorSpec
from merger.io.sources import SourceLocation

KEY = "ab" + "0123456789abcdef" * 3 + "cdef0123456789"
OTHER_KEY = "cd" + "f" * 62

CTX = multiprocessing.get_context("spawn")


def _tmp_with(cache: Cache, data: bytes, hint: str = KEY) -> Path:
    tmp = cache.new_tmp(hint)
    tmp.write_bytes(data)
    return tmp


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- commit / lookup --------------------------------------------------------------------------------


def test_commit_then_lookup(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    data = b"first entry contents"
    tmp = _tmp_with(cache, data)
    assert tmp.parent == cache.root / "tmp"
    info = cache.commit(tmp, KEY, _sha(data))
    assert not tmp.exists()
    assert info.path == cache.root / "objects" / KEY[:2] / f"{KEY}.safetensors"
    assert info.path.read_bytes() == data
    assert info.sha256 == _sha(data)
    assert info.bytes == len(data)
    found = cache.lookup(KEY)
    assert found is not None
    assert (found.key, found.path, found.sha256, found.bytes) == (KEY, info.path, _sha(data), len(data))
    record = json.loads(info.path.with_name(info.path.name + ".json").read_text())
    st = info.path.stat()
    assert (record["sha256"], record["bytes"]) == (_sha(data), len(data))
    assert record["head"] == [len(data), _sha(data)]  # a short file is pinned whole
    assert record["pin"] == [st.st_size, st.st_ino, st.st_ctime_ns, st.st_mtime_ns]
    assert st.st_mode & 0o777 == 0o444  # entries are read-only
    assert list((cache.root / "tmp").iterdir()) == []


def test_lookup_missing_key_is_none(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    assert cache.lookup(OTHER_KEY) is None
    assert cache.lookup(OTHER_KEY, ".pth") is None


def test_commit_with_suffix(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    data = b"pth bytes"
    info = cache.commit(_tmp_with(cache, data, OTHER_KEY), OTHER_KEY, _sha(data), ".pth")
    assert info.path.name == f"{OTHER_KEY}.pth"
    assert cache.lookup(OTHER_KEY) is None
    found = cache.lookup(OTHER_KEY, ".pth")
    assert found is not None
    assert found.sha256 == _sha(data)


def test_commit_same_key_twice_keeps_first(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    first, second = b"the first writer's bytes", b"a second, later writer"
    info1 = cache.commit(_tmp_with(cache, first), KEY, _sha(first))
    tmp2 = _tmp_with(cache, second)
    info2 = cache.commit(tmp2, KEY, _sha(second))
    assert not tmp2.exists()
    assert info2.path == info1.path
    assert info1.path.read_bytes() == first
    assert info2.sha256 == _sha(first)
    assert info2.bytes == len(first)
    found = cache.lookup(KEY)
    assert found is not None
    assert found.sha256 == _sha(first)
    assert list((cache.root / "tmp").iterdir()) == []


def test_object_without_record_is_moved_aside_never_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("merger.cache.store.COMMIT_GRACE_SECONDS", -1.0)
    cache = Cache(tmp_path / "cache")
    data = b"some entry"
    info = cache.commit(_tmp_with(cache, data), KEY, _sha(data))
    info.path.with_name(info.path.name + ".json").unlink()
    assert cache.lookup(KEY) is None
    assert not info.path.exists()
    assert [p.name.split(".")[0] for p in (cache.root / "quarantine").iterdir()] == [KEY]


def test_young_object_without_record_is_not_served_nor_moved(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    path = cache.path(KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"another run is committing this")
    assert cache.lookup(KEY) is None
    assert path.exists()


@pytest.mark.parametrize("damage", ["{not json", '{"version": 2}', "[]", '{"version": 1, "sha256": "x"}'])
def test_object_with_a_bad_record_is_moved_aside(tmp_path: Path, damage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("merger.cache.store.COMMIT_GRACE_SECONDS", -1.0)
    cache = Cache(tmp_path / "cache")
    data = b"another entry"
    info = cache.commit(_tmp_with(cache, data), KEY, _sha(data))
    os.chmod(info.path.with_name(info.path.name + ".json"), 0o644)
    info.path.with_name(info.path.name + ".json").write_text(damage)
    assert cache.lookup(KEY) is None
    assert not info.path.exists()


def _write_in_place(path: Path, offset: int, data: bytes, *, keep_mtime: bool) -> None:
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.chmod(path, st.st_mode & 0o777)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_object_altered_in_place_is_never_served(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    data = b"h" * 5000 + b"tail of the entry"
    info = cache.commit(_tmp_with(cache, data), KEY, _sha(data))
    _write_in_place(info.path, 4990, b"XX", keep_mtime=True)  # same size, mtime restored, past the pinned head
    assert info.path.stat().st_size == len(data)
    assert cache.lookup(KEY) is None
    assert not info.path.exists()
    assert len(list((cache.root / "quarantine").iterdir())) == 2  # the object and its record


def test_object_whose_head_changed_is_never_served(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    data = b"entry bytes " * 10
    info = cache.commit(_tmp_with(cache, data), KEY, _sha(data))
    _write_in_place(info.path, 0, b"Z", keep_mtime=True)
    assert cache.lookup(KEY) is None


def test_object_truncated_is_never_served(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    data = b"entry bytes " * 10
    info = cache.commit(_tmp_with(cache, data), KEY, _sha(data))
    os.chmod(info.path, 0o644)
    os.truncate(info.path, 20)
    assert cache.lookup(KEY) is None


def test_object_whose_inode_times_moved_is_rehashed_and_served(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    data = b"entry bytes " * 10
    info = cache.commit(_tmp_with(cache, data), KEY, _sha(data))
    before = json.loads(info.path.with_name(info.path.name + ".json").read_text())["pin"]
    os.link(info.path, tmp_path / "an output")  # moves the object's ctime, as placing an output does
    found = cache.lookup(KEY)
    assert found is not None and found.sha256 == _sha(data)
    after = json.loads(info.path.with_name(info.path.name + ".json").read_text())["pin"]
    assert after != before and after[2] == info.path.stat().st_ctime_ns  # re-pinned after the full check


def test_cache_verify_rehashes_every_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"entry bytes " * 10
    cache = Cache(tmp_path / "cache")
    cache.commit(_tmp_with(cache, data), KEY, _sha(data))
    hashed: list[Path] = []
    import merger.cache.store

    real = merger.cache.store.file_sha256
    monkeypatch.setattr("merger.cache.store.file_sha256", lambda p: hashed.append(p) or real(p))
    assert cache.lookup(KEY) is not None and hashed == []  # the cheap pins hold: no full hash
    assert Cache(tmp_path / "cache", verify=True).lookup(KEY) is not None and len(hashed) == 1


def test_lookup_records_last_use(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    data = b"entry"
    info = cache.commit(_tmp_with(cache, data), KEY, _sha(data))
    record = info.path.with_name(info.path.name + ".json")
    os.utime(record, (1000, 1000))
    assert cache.lookup(KEY) is not None
    assert record.stat().st_mtime > 1000


def test_cache_creates_nothing_until_written(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = Cache(root)
    assert cache.lookup(KEY) is None
    assert cache.remove_stale_tmp() == 0
    assert not root.exists()
    tmp = cache.new_tmp(KEY)
    assert tmp.parent == root / "tmp"
    assert tmp.parent.is_dir()


def test_cache_dir_not_creatable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = Cache(blocker / "cache")
    from tests.conftest import expect_error  # imported here: spawned lock holders need not load torch

    error = expect_error(lambda: cache.new_tmp(KEY))
    assert str(blocker / "cache") in error.what
    assert error.fix is not None
    assert "cache_dir" in error.fix


# --- locks ------------------------------------------------------------------------------------------


def _hold_lock(
    root: str,
    name: str,
    locked: multiprocessing.synchronize.Event,
    seconds: float,
    released_at: multiprocessing.sharedctypes.Synchronized[float] | None = None,
) -> None:
    cache = Cache(Path(root))
    with cache.lock(name):
        locked.set()
        time.sleep(seconds)
        if released_at is not None:
            released_at.value = time.time()  # just before the lock is released


def _acquire_in_thread(cache: Cache, name: str, timeout: float) -> tuple[float, float] | None:
    """(wall time the attempt started, wall time the lock was taken), or None if not taken within `timeout`."""
    done = threading.Event()
    times: list[float] = []

    def worker() -> None:
        times.append(time.time())
        with cache.lock(name):
            times.append(time.time())
        done.set()

    threading.Thread(target=worker, daemon=True).start()
    return (times[0], times[1]) if done.wait(timeout) else None


def test_lock_excludes_another_process(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    locked = CTX.Event()
    released_at = CTX.Value("d", 0.0)
    child = CTX.Process(target=_hold_lock, args=(str(cache.root), KEY, locked, 0.8, released_at))
    child.start()
    try:
        assert locked.wait(30), "the child never took the lock"
        times = _acquire_in_thread(cache, KEY, timeout=30)
        assert times is not None
        attempted, acquired = times
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert attempted < released_at.value, "the test tried too late to show anything"
    assert acquired >= released_at.value, "took the lock while another process held it"
    assert acquired - attempted >= 0.1


def test_lock_with_another_name_does_not_wait(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    locked = CTX.Event()
    child = CTX.Process(target=_hold_lock, args=(str(cache.root), KEY, locked, 5.0))
    child.start()
    try:
        assert locked.wait(30)
        times = _acquire_in_thread(cache, OTHER_KEY, timeout=3.0)
        assert times is not None, "a lock of another name waited for the held one"
        assert child.is_alive()  # the other lock was still held meanwhile
    finally:
        child.kill()
        child.join(30)


def test_lock_of_killed_process_is_free(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    locked = CTX.Event()
    child = CTX.Process(target=_hold_lock, args=(str(cache.root), KEY, locked, 60.0))
    child.start()
    try:
        assert locked.wait(30)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        times = _acquire_in_thread(cache, KEY, timeout=5.0)
        assert times is not None, "the lock of a killed process was not released"
        assert (cache.root / "locks" / f"{KEY}.lock").exists()  # the file stays; nobody holds it
    finally:
        if child.is_alive():
            child.kill()
            child.join(30)


# --- stale temporary files --------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tmp_for_pid(directory: Path, name: str, pid: int) -> Path:
    """A temporary name as `tmp_path_for` makes it, but for another process id."""
    ours = tmp_path_for(directory / name)
    prefix, mark, rest = ours.name.partition(TMP_MARK)
    host, own_pid, token = rest.rsplit("-", 2)
    assert int(own_pid) == os.getpid()
    return directory / f"{prefix}{mark}{host}-{pid}-{token}"


def test_tmp_path_for_names_host_and_pid(tmp_path: Path) -> None:
    target = tmp_path / "entry.safetensors"
    a, b = tmp_path_for(target), tmp_path_for(target)
    assert a != b
    assert a.parent == tmp_path
    assert a.name.startswith(f"entry.safetensors{TMP_MARK}")
    assert f"-{os.getpid()}-" in a.name


def test_remove_stale_tmp(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    tmp_dir = cache.root / "tmp"
    tmp_dir.mkdir(parents=True)
    dead = _tmp_for_pid(tmp_dir, "dead.safetensors", _dead_pid())
    live = _tmp_for_pid(tmp_dir, "live.safetensors", os.getpid())
    other_host = tmp_dir / f"x.safetensors{TMP_MARK}some_other_host-{_dead_pid()}-abcd1234"
    unrelated = tmp_dir / "notes.txt"
    for path in (dead, live, other_host, unrelated):
        path.write_bytes(b"partial")
    assert is_stale_tmp(dead)
    assert not is_stale_tmp(live)
    assert not is_stale_tmp(other_host)
    assert not is_stale_tmp(unrelated)
    assert cache.remove_stale_tmp() == 1
    assert not dead.exists()
    assert live.exists()
    assert other_host.exists()
    assert unrelated.exists()


def test_is_stale_tmp_malformed_names(tmp_path: Path) -> None:
    assert not is_stale_tmp(tmp_path / f"a{TMP_MARK}nohyphens")
    assert not is_stale_tmp(tmp_path / f"a{TMP_MARK}host-notapid-token")


def test_write_text_atomic_replaces_and_leaves_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "record.json"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


# --- source memo ------------------------------------------------------------------------------------


def test_memo_round_trip(tmp_path: Path) -> None:
    memo = SourceMemo(tmp_path / "memo")
    spec = {
        "conv.weight": TensorSpec("F16", (8, 3, 3, 3)),
        "bn.num_batches_tracked": TensorSpec("I64", ()),
        "empty": TensorSpec("F32", (0, 4)),
    }
    identity = "ef" + "1" * 62
    assert memo.get(identity) is None
    memo.put(identity, MemoEntry("c" * 64, spec))
    entry = memo.get(identity)
    assert entry is not None
    assert entry.content_hash == "c" * 64
    assert entry.spec == spec
    assert list(entry.spec) == list(spec)


@pytest.mark.parametrize("content", ["{broken json", "[]", json.dumps({"hash": "x"}), json.dumps({"spec": [[1]]}), ""])
def test_memo_corrupt_file_is_none(tmp_path: Path, content: str) -> None:
    memo = SourceMemo(tmp_path / "memo")
    identity = "aa" + "2" * 62
    memo.put(identity, MemoEntry("d" * 64, {"w": TensorSpec("F32", (2,))}))
    path = tmp_path / "memo" / identity[:2] / f"{identity}.json"
    assert path.is_file()
    path.write_text(content)
    assert memo.get(identity) is None


@pytest.mark.parametrize(
    "data",
    [
        {"hash": "c" * 64, "spec": [["w", "NOT_A_DTYPE", [2]]]},
        {"hash": "c" * 64, "spec": [["w", "F32", "ab"]]},
    ],
    ids=["unknown-dtype", "shape-not-ints"],
)
def test_memo_entry_with_invalid_spec_is_none(tmp_path: Path, data: dict[str, object]) -> None:
    """A memo whose spec cannot describe real tensors is as good as corrupt: re-read the file instead."""
    memo = SourceMemo(tmp_path / "memo")
    identity = "bb" + "3" * 62
    path = tmp_path / "memo" / identity[:2] / f"{identity}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    assert memo.get(identity) is None


def test_source_identity_changes_with_mtime_and_size(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x" * 100)
    os.utime(model, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    location = SourceLocation(model, "safetensors", (model,))
    first = source_identity(location)
    assert source_identity(location) == first  # stable while nothing changes

    os.utime(model, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_001))
    touched = source_identity(location)
    assert touched != first

    model.write_bytes(b"x" * 101)
    os.utime(model, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_001))
    assert source_identity(location) not in (first, touched)


def test_source_identity_depends_on_key_and_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    os.utime(a, ns=(10**18, 10**18))
    os.utime(b, ns=(10**18, 10**18))
    ids = {
        source_identity(SourceLocation(a, "pth", (a,))),
        source_identity(SourceLocation(a, "pth", (a,), "params_ema")),
        source_identity(SourceLocation(b, "pth", (b,))),
    }
    assert len(ids) == 3


def test_source_identity_of_a_symlink_is_its_target(tmp_path: Path) -> None:
    target = tmp_path / "real.safetensors"
    target.write_bytes(b"data")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    assert source_identity(SourceLocation(link, "safetensors", (link,))) == source_identity(
        SourceLocation(target, "safetensors", (target,))
    )


def test_day_old_tmp_of_any_host_is_stale(tmp_path: Path) -> None:
    """A shared cache sees other machines' leftovers: a day-old one goes, a fresh one stays."""
    old = tmp_path / f"x.safetensors{TMP_MARK}some_other_host-{os.getpid()}-abcd1234"
    fresh = tmp_path / f"y.safetensors{TMP_MARK}some_other_host-{os.getpid()}-abcd1234"
    for path in (old, fresh):
        path.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    assert is_stale_tmp(old)
    assert not is_stale_tmp(fresh)


def test_entry_written_into_through_a_hard_link_is_dropped(tmp_path: Path) -> None:
    """An output is a hard link of its entry: writing into it must not leave a wrong entry in the cache."""
    cache = Cache(tmp_path / "cache")
    info = cache.commit(_tmp_with(cache, b"original"), KEY, _sha(b"original"))
    output = tmp_path / "output.safetensors"
    os.link(info.path, output)
    os.chmod(output, 0o644)  # as root may, or a user who changes the mode
    output.write_bytes(b"overwritten in place")
    assert cache.lookup(KEY) is None
    assert not info.path.exists()
