"""merger.cache.listing, .collect, .verify and `merger-cache`: listing, usage, collection, verification, removal."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from merger.cache.atomic import TMP_MARK, tmp_path_for
from merger.cache.collect import collect
from merger.cache.listing import PARTS, entries, max_size_setting, strays, usage
from merger.cache.memo import MemoEntry
from merger.cache.record import record_path
from merger.cache.store import Cache
from merger.cache.verify import remove, verify
from merger.core.sizes import parse_size
from merger.core.specs import TensorSpec
from tests.conftest import RunRecipe, expect_error, run_cli

DAY = 24 * 3600.0
NODE_MADE = {"kind": "node", "node": "blend", "op": "lerp", "recipe": "test.yaml"}


def key_of(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def put(cache: Cache, key: str, data: bytes, suffix: str = ".safetensors", made: dict[str, Any] | None = None) -> Path:
    tmp = cache.new_tmp(key, suffix)
    tmp.write_bytes(data)
    return cache.commit(tmp, key, hashlib.sha256(data).hexdigest(), suffix, made=made or NODE_MADE).path


def used_at(path: Path, when: float) -> None:
    """Set an entry's last use (its record's mtime)."""
    os.utime(record_path(path), (when, when))


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def tmp_for_pid(target: Path, pid: int) -> Path:
    """A temporary name as `tmp_path_for` makes it, for another process id on this host."""
    ours = tmp_path_for(target)
    prefix, mark, rest = ours.name.partition(TMP_MARK)
    host, _, token = rest.rsplit("-", 2)
    return target.parent / f"{prefix}{mark}{host}-{pid}-{token}"


def keys_in(cache: Cache) -> set[str]:
    return {e.key for e in entries(cache)}


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


# --- entries and usage ------------------------------------------------------------------------------


def test_entries_and_usage_are_what_is_on_disk(cache: Cache) -> None:
    a = put(cache, key_of(1), b"a" * 1000)
    b = put(cache, key_of(2), b"b" * 300, ".pth", made={"kind": "artifact", "of": key_of(1), "node": "blend"})
    used_at(a, 1_000_000)
    cache.memo.put(key_of("memo"), MemoEntry("c" * 64, {"w": TensorSpec("F32", (2,))}))
    with cache.lock(key_of(1)):
        pass
    cache.new_tmp(key_of(3)).write_bytes(b"partial")
    put(cache, key_of(4), b"d" * 50)
    cache.quarantine(cache.path(key_of(4)), "a test")

    listed = {e.key: e for e in entries(cache)}
    assert set(listed) == {key_of(1), key_of(2)}
    for e, path in ((listed[key_of(1)], a), (listed[key_of(2)], b)):
        assert e.path == path
        assert e.bytes == path.stat().st_size + record_path(path).stat().st_size
        assert e.object_bytes == path.stat().st_size
        assert e.last_used == record_path(path).stat().st_mtime
        assert e.created == path.stat().st_mtime
    assert listed[key_of(1)].last_used == 1_000_000
    assert (listed[key_of(1)].suffix, listed[key_of(2)].suffix) == (".safetensors", ".pth")
    assert (listed[key_of(1)].kind, listed[key_of(1)].node, listed[key_of(1)].op) == ("node", "blend", "lerp")
    assert listed[key_of(1)].recipe == "test.yaml"
    assert (listed[key_of(2)].kind, listed[key_of(2)].of) == ("artifact", key_of(1))
    assert strays(cache) == []

    used = usage(cache)
    for part in PARTS:
        on_disk = files_under(cache.root / part)
        assert used.parts[part].files == len(on_disk), part
        assert used.parts[part].bytes == sum(p.stat().st_size for p in on_disk), part
    assert [used.parts[p].files for p in PARTS] == [4, 1, 1, 1, 2]
    assert used.bytes == sum(p.stat().st_size for p in files_under(cache.root))
    assert used.files == len(files_under(cache.root))


def test_missing_cache_is_empty_and_not_created(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "nowhere")
    assert entries(cache) == []
    assert usage(cache).bytes == 0
    assert collect(cache, max_size=0, older_than_days=0).removed == []
    assert verify(cache).checked == 0
    assert not cache.root.exists()


def test_real_merge_records_what_made_each_entry(
    models: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    report = run_recipe(
        {
            "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.3}},
            "outputs": {"blend": {}, "half": {"node": "blend", "dtype": "float16"}},
        }
    )
    node_key = report["nodes"]["blend"]["key"]
    listed = {e.key: e for e in entries(Cache(launch_dir / "cache"))}
    assert len(listed) == 2
    node = listed[node_key]
    assert (node.kind, node.node, node.op) == ("node", "blend", "lerp")
    (artifact,) = (e for k, e in listed.items() if k != node_key)
    assert (artifact.kind, artifact.of, artifact.node) == ("artifact", node_key, "blend")
    assert artifact.made["dtype"] == "float16"
    assert node.links == 2  # the output is a hard link of the entry

    done = run_cli(["ls", "--cache-dir", "cache"], launch_dir, command="merger-cache")
    assert done.returncode == 0, done.stderr
    assert node_key[:16] in done.stdout and node_key not in done.stdout
    assert "node blend (lerp)" in done.stdout
    assert f"output of node blend as float16 safetensors (from {node_key[:16]})" in done.stdout

    result = collect(Cache(launch_dir / "cache"), max_size=0)
    assert result.count("object") == 2
    assert result.linked_bytes == node.object_bytes + artifact.object_bytes  # the outputs still link them
    assert (launch_dir / "out" / "blend.safetensors").is_file()


# --- collection -------------------------------------------------------------------------------------


def test_gc_by_size_removes_least_recently_used_first_and_stops_at_the_bound(cache: Cache) -> None:
    now = time.time()
    paths = [put(cache, key_of(i), bytes([i]) * 1000) for i in range(5)]
    order = [3, 0, 4, 1, 2]  # least recently used first
    for rank, i in enumerate(order):
        used_at(paths[i], now - 1000 + rank)
    each = entries(cache)[0].bytes
    bound = usage(cache).bytes - 2 * each - 1  # needs three removals
    result = collect(cache, max_size=bound)
    assert [r.key for r in result.removed] == [key_of(i) for i in order[:3]]
    assert {r.kind for r in result.removed} == {"object"}
    assert keys_in(cache) == {key_of(1), key_of(2)}
    assert result.bytes_after == usage(cache).bytes <= bound
    assert result.freed == result.bytes_before - result.bytes_after == 3 * each
    assert not any(p.exists() or record_path(p).exists() for p in (paths[3], paths[0], paths[4]))
    assert collect(cache, max_size=bound).removed == []  # already within the bound


def test_gc_by_age_removes_only_the_old(cache: Cache) -> None:
    now = time.time()
    old, mid, new = (put(cache, key_of(i), b"x" * 100) for i in range(3))
    used_at(old, now - 40 * DAY)
    used_at(mid, now - 10 * DAY)
    result = collect(cache, older_than_days=30)
    assert [r.key for r in result.removed] == [key_of(0)]
    assert keys_in(cache) == {key_of(1), key_of(2)}
    assert [r.key for r in collect(cache, older_than_days=5).removed] == [key_of(1)]
    assert new.exists()


def test_gc_removes_memo_entries_by_age_only_when_asked(cache: Cache) -> None:
    spec = {"w": TensorSpec("F32", (2,))}
    cache.memo.put(key_of("old"), MemoEntry("c" * 64, spec))
    cache.memo.put(key_of("new"), MemoEntry("d" * 64, spec))
    old = cache.root / "memo" / key_of("old")[:2] / f"{key_of('old')}.json"
    os.utime(old, (time.time() - 9 * DAY,) * 2)
    assert collect(cache, max_size=0).removed == []
    result = collect(cache, older_than_days=7)
    assert [(r.kind, r.path) for r in result.removed] == [("memo", old)]
    assert cache.memo.get(key_of("old")) is None
    assert cache.memo.get(key_of("new")) is not None


def test_gc_never_removes_kept_keys(cache: Cache) -> None:
    for i in range(4):
        used_at(put(cache, key_of(i), b"k" * 100), 1000 + i)
    result = collect(cache, max_size=0, older_than_days=0, keep={key_of(0), key_of(2)})
    assert keys_in(cache) == {key_of(0), key_of(2)}
    assert {r.key for r in result.removed} == {key_of(1), key_of(3)}


HOLDER = """
import sys, time
from pathlib import Path
from merger.cache.store import Cache
with Cache(Path(sys.argv[1])).lock(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_gc_skips_entries_and_locks_held_by_another_process_or_thread(cache: Cache) -> None:
    held, threaded, free = key_of("held"), key_of("thread"), key_of("free")
    for key in (held, threaded, free):
        put(cache, key, b"z" * 100)
    with cache.lock("provisional-" + free):  # a lock file left behind, that nobody holds
        pass
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache.root), held], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with cache.lock(threaded):  # a thread of this very process (the run's own executor)
            result = collect(cache, max_size=0)
            assert (cache.root / "locks" / f"{threaded}.lock").exists()
        assert set(result.skipped) == {held, threaded}
        assert keys_in(cache) == {held, threaded}
        assert {r.key for r in result.removed if r.kind == "object"} == {free}
        locks = {p.name for p in (cache.root / "locks").iterdir()}
        assert f"{held}.lock" in locks  # held: never removed
        assert f"provisional-{free}.lock" not in locks and f"{free}.lock" not in locks
        assert child.poll() is None  # still holding its lock
        again = collect(cache, max_size=0)
        assert keys_in(cache) == {held}
        assert again.skipped == [held]
        assert f"{threaded}.lock" not in {p.name for p in (cache.root / "locks").iterdir()}  # free now: collected
    finally:
        child.kill()
        child.wait()
    collect(cache, max_size=0)
    assert keys_in(cache) == set()
    assert list((cache.root / "locks").iterdir()) == []


def test_gc_collects_stale_tmp_quarantine_and_strays(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = put(cache, key_of("kept"), b"kept entry")
    stale = tmp_for_pid(cache.new_tmp(key_of(1)).parent / "entry.safetensors", dead_pid())
    stale.write_bytes(b"crashed writer")
    live = cache.new_tmp(key_of(2))
    live.write_bytes(b"being written")
    stale_record = tmp_for_pid(record_path(kept), dead_pid())
    stale_record.write_text("{")
    put(cache, key_of("bad"), b"failed a check")
    cache.quarantine(cache.path(key_of("bad")), "a test")
    no_record = put(cache, key_of("stray"), b"no record")
    record_path(no_record).unlink()
    orphan_record = record_path(put(cache, key_of("orphan"), b"object deleted by hand"))
    cache.path(key_of("orphan")).unlink()
    (kept.parent / "notes.txt").write_bytes(b"not merger's")
    assert {s.why for s in strays(cache)} == {
        "an object without a valid record",
        "a record without its object",
        "not a file merger writes here",
    }

    young = collect(cache, max_size=10**9)  # strays are younger than the commit grace: left alone
    assert {r.kind for r in young.removed} == {"tmp", "quarantine"}
    assert {r.path for r in young.removed if r.kind == "tmp"} == {stale, stale_record}
    assert young.count("quarantine") == 2  # the object and its record
    assert live.exists()
    assert len(strays(cache)) == 3

    monkeypatch.setattr("merger.cache.store.COMMIT_GRACE_SECONDS", -1.0)
    old = collect(cache, max_size=10**9)
    assert old.count("stray") == 2  # merger's own names only: notes.txt is not merger's to remove
    assert [s.path.name for s in strays(cache)] == ["notes.txt"]
    assert (kept.parent / "notes.txt").read_bytes() == b"not merger's"
    assert not no_record.exists() and not orphan_record.exists()
    assert keys_in(cache) == {key_of("kept")}
    assert live.exists()
    assert list((cache.root / "quarantine").iterdir()) == []


def test_gc_bounds_are_checked(cache: Cache) -> None:
    assert "negative" in expect_error(lambda: collect(cache, max_size=-1)).what
    assert "negative" in expect_error(lambda: collect(cache, older_than_days=-2)).what


# --- verification -----------------------------------------------------------------------------------


def test_verify_passes_a_clean_cache(cache: Cache) -> None:
    paths = [put(cache, key_of(i), bytes([i]) * (1000 * (i + 1))) for i in range(3)]
    result = verify(cache, workers=2)
    assert (result.checked, result.bad, result.strays) == (3, [], 0)
    assert result.bytes == sum(p.stat().st_size for p in paths)
    assert result.seconds >= 0
    assert keys_in(cache) == {key_of(i) for i in range(3)}


def test_verify_quarantines_an_object_altered_in_place(cache: Cache) -> None:
    good = put(cache, key_of("good"), b"g" * 5000)
    path = put(cache, key_of("bad"), b"h" * 5000 + b"tail")
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(4990)
        f.write(b"XX")  # same size, past the pinned head
    os.chmod(path, 0o444)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = verify(cache)
    assert result.checked == 2
    assert result.bad == [key_of("bad")]
    assert not path.exists() and not record_path(path).exists()
    assert len(list((cache.root / "quarantine").iterdir())) == 2
    assert cache.lookup(key_of("bad")) is None
    assert cache.lookup(key_of("good")) is not None and good.exists()


def test_verify_repins_a_linked_entry_and_keeps_its_last_use(cache: Cache, tmp_path: Path) -> None:
    path = put(cache, key_of(1), b"entry bytes" * 100)
    used_at(path, 5000)
    os.link(path, tmp_path / "an output")  # moves the object's ctime: a lookup would hash it in full
    assert verify(cache).bad == []
    assert record_path(path).stat().st_mtime == 5000
    import merger.cache.store

    hashed: list[Path] = []
    real = merger.cache.store.file_sha256  # type: ignore[attr-defined]

    def counting(p: Path) -> str:
        hashed.append(p)
        return real(p)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("merger.cache.store.file_sha256", counting)
        assert cache.lookup(key_of(1)) is not None
    assert hashed == []  # re-pinned by verify: the cheap pins hold


# --- removal ----------------------------------------------------------------------------------------


def test_rm_by_key_and_by_prefix(cache: Cache) -> None:
    a = put(cache, key_of("a"), b"a")
    b = put(cache, key_of("b"), b"b", ".pth")
    assert remove(cache, key_of("a")) == [a, record_path(a)]
    assert remove(cache, key_of("b")[:8].upper()) == [b, record_path(b)]
    assert keys_in(cache) == set()


def test_rm_refuses_ambiguous_unknown_and_short(cache: Cache) -> None:
    first, second = "deadbeef" + "0" * 56, "deadbeef" + "1" * 56
    put(cache, first, b"1")
    put(cache, second, b"2")
    ambiguous = expect_error(lambda: remove(cache, "deadbeef"))
    assert "start of 2 keys" in ambiguous.what
    assert ambiguous.fix is not None and first in ambiguous.fix and second in ambiguous.fix
    unknown = expect_error(lambda: remove(cache, "deadbeee"))
    assert "no cache entry" in unknown.what and unknown.fix is not None and first in unknown.fix
    assert "not a cache key" in expect_error(lambda: remove(cache, "dead")).what
    assert "not a cache key" in expect_error(lambda: remove(cache, "../../etc/passwd")).what
    assert keys_in(cache) == {first, second}
    assert remove(cache, "deadbeef1")[0] == cache.path(second)
    stray = put(cache, key_of("stray"), b"s")
    record_path(stray).unlink()
    assert remove(cache, key_of("stray")[:10]) == [stray]  # a stray too


# --- sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("123", 123),
        (123, 123),
        ("5GB", 5 * 10**9),
        ("5GiB", 5 * 2**30),
        ("5 gb", 5 * 10**9),
        ("1.5GB", 1_500_000_000),
        (".5 MiB", 2**19),
        ("20kib", 20 * 1024),
        ("7KB", 7000),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        ("3MB", 3_000_000),
        (" 10 B ", 10),
        ("0.1GB", 100_000_000),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "5 G", "-5GB", "1.5", "5GB5", "five", "5e9", -1, True, 1.5])
def test_parse_size_refuses(text: Any) -> None:
    error = expect_error(lambda: parse_size(text))
    assert error.fix is not None and "5GB" in error.fix and "GiB" in error.fix


def test_max_size_setting() -> None:
    assert max_size_setting(None) is None
    assert max_size_setting(1000) == 1000
    assert max_size_setting("2GB") == 2 * 10**9
    error = expect_error(lambda: max_size_setting("lots"))
    assert error.where == "cache_max_size" and "'lots'" in error.what


# --- the command ------------------------------------------------------------------------------------


def assert_one_block(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("merger: error:"), done.stderr
    assert done.stderr.count("merger: error:") == 1
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


def test_cli_end_to_end(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    now = time.time()
    old = put(cache, "deadbeef" + "0" * 56, b"o" * 2000)
    new = put(cache, "deadbeef" + "1" * 56, b"n" * 1000, made={**NODE_MADE, "node": "new\x1b[2Jnode"})
    used_at(old, now - 3600)
    used_at(new, now)

    ls = run_cli(["--cache-dir", "cache", "ls"], tmp_path, command="merger-cache")
    assert ls.returncode == 0, ls.stderr
    lines = ls.stdout.splitlines()
    assert "2 entries" in lines[0]
    rows = [line for line in lines if line.startswith("deadbeef")]
    assert [r.split()[0] for r in rows] == ["deadbeef11111111", "deadbeef00000000"]  # newest first
    assert "\x1b" not in ls.stdout and "new\\x1b[2Jnode" in ls.stdout  # names from records are made safe
    full = run_cli(["ls", "--all", "--cache-dir", str(cache.root)], tmp_path, command="merger-cache")
    assert "deadbeef" + "1" * 56 in full.stdout

    du = run_cli(["du"], tmp_path, command="merger-cache", env={"MERGER_CACHE_DIR": str(cache.root)})
    assert du.returncode == 0, du.stderr
    total = usage(cache)
    objects = next(line for line in du.stdout.splitlines() if line.split()[0] == "objects")
    assert objects.split()[-2] == str(total.parts["objects"].files)
    assert f"{total.bytes / 1000:.1f} KB" in du.stdout

    check = run_cli(["verify", "--cache-dir", "cache"], tmp_path, command="merger-cache")
    assert check.returncode == 0, check.stderr
    assert "checked 2 entries" in check.stdout and "GB/s" in check.stdout

    gc = run_cli(["gc", "--max-size", "2.5KB", "--cache-dir", "cache"], tmp_path, command="merger-cache")
    assert gc.returncode == 0, gc.stderr
    assert "removed 1 cache entries" in gc.stdout
    assert keys_in(cache) == {"deadbeef" + "1" * 56}

    ambiguous = put(cache, "deadbeef" + "2" * 56, b"a")
    assert_one_block(
        run_cli(["rm", "deadbeef", "--cache-dir", "cache"], tmp_path, command="merger-cache"), "start of 2 keys"
    )
    rm = run_cli(["rm", "deadbeef2", "--cache-dir", "cache"], tmp_path, command="merger-cache")
    assert rm.returncode == 0, rm.stderr
    assert f"removed {ambiguous}" in rm.stdout and not ambiguous.exists()

    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "cache").symlink_to(cache.root)  # the default: outputs/cache here
    default = run_cli(["ls"], tmp_path, command="merger-cache")
    assert "1 entries" in default.stdout and "deadbeef11111111" in default.stdout


def test_cli_errors_are_one_block(tmp_path: Path) -> None:
    assert_one_block(run_cli(["gc"], tmp_path, command="merger-cache"), "gc needs a bound", "--max-size")
    assert_one_block(
        run_cli(["gc", "--max-size", "lots"], tmp_path, command="merger-cache"), "'lots' is not a size", "--max-size"
    )
    (tmp_path / "afile").write_text("not a directory")
    assert_one_block(run_cli(["--cache-dir", "afile", "ls"], tmp_path, command="merger-cache"), "cannot read the cache")
    assert_one_block(run_cli(["frobnicate"], tmp_path, command="merger-cache"), "invalid choice")


def test_cli_verify_reports_a_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from merger.cli.cache_command import main

    cache = Cache(tmp_path / "cache")
    path = put(cache, key_of(1), b"v" * 100)
    os.chmod(path, 0o644)
    path.write_bytes(b"w" * 100)
    with pytest.raises(SystemExit) as done:
        main(["verify", "--cache-dir", str(cache.root)])
    assert done.value.code == 1
    out = capsys.readouterr().out
    assert f"mismatch: {key_of(1)} (node blend (lerp), recipe test.yaml): moved to quarantine" in out
    assert keys_in(cache) == set()
    with pytest.raises(SystemExit) as done:
        main(["gc", "--older-than", "0", "--cache-dir", str(cache.root)])
    assert done.value.code == 0
    assert "quarantined files" in capsys.readouterr().out
    assert not (cache.root / "quarantine").exists() or list((cache.root / "quarantine").iterdir()) == []


def test_commands_import_no_torch() -> None:
    code = "import sys, merger.cli.cache_command; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_cache_max_size_collects_at_the_end_of_a_run(
    models: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    """Each run keeps what it used and collects the rest down to cache_max_size."""

    def lerp(alpha: float) -> dict[str, object]:
        return {
            "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": alpha}},
            "outputs": {"blend": {"dtype": "float16"}},
        }

    first = run_recipe(lerp(0.1))
    second = run_recipe({**lerp(0.2), "cache_max_size": "1KB"}, output_dir=launch_dir / "out2")
    cache = Cache(launch_dir / "cache")
    kept = {e.key for e in entries(cache)}
    assert second["nodes"]["blend"]["key"] in kept and first["nodes"]["blend"]["key"] not in kept
    assert len(kept) == 2  # the node and its float16 artifact
    error = expect_error(lambda: run_recipe({**lerp(0.3), "cache_max_size": "lots"}))
    assert "cache_max_size" in (error.where or "")


def test_gc_removes_only_what_merger_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache_dir pointed at another directory (a git repository, say) loses nothing to gc."""
    monkeypatch.setattr("merger.cache.store.COMMIT_GRACE_SECONDS", -1.0)
    repo = tmp_path / "repo"
    (repo / "objects" / "ab").mkdir(parents=True)
    (repo / "objects" / "pack").mkdir()
    files = [
        repo / "objects" / "ab" / ("c" * 38),  # a git loose object
        repo / "objects" / "pack" / "pack-1.pack",
        repo / "locks" / "mine.lock",
        repo / "memo" / "notes.json",
        repo / "quarantine" / "thesis.tex",
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"user data")
    result = collect(Cache(repo), max_size=0, older_than_days=0)
    assert result.removed == []
    assert all(p.read_bytes() == b"user data" for p in files)


def test_gc_never_follows_a_link_out_of_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("merger.cache.store.COMMIT_GRACE_SECONDS", -1.0)
    victim = tmp_path / "victim"
    (victim / "deep").mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work")
    root = tmp_path / "cache"
    root.mkdir()
    for part in ("quarantine", "objects", "memo", "locks", "tmp"):
        (root / part).symlink_to(victim, target_is_directory=True)
    collect(Cache(root), max_size=0, older_than_days=0)
    assert (victim / "thesis.tex").read_text() == "years of work"
    error = expect_error(lambda: Cache(root).new_tmp(key_of(1)))
    assert "is a symbolic link" in error.what


def test_a_copied_cache_is_not_trusted(tmp_path: Path) -> None:
    """An object is served only as the file merger wrote (its inode): a copy, with a record forged to
    match, is moved aside."""
    import shutil

    cache = Cache(tmp_path / "a")
    put(cache, key_of("x"), b"the entry")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = Cache(tmp_path / "b")
    assert copy.lookup(key_of("x")) is None
    assert cache.lookup(key_of("x")) is not None
