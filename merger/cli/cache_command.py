"""`merger-cache ls|du|gc|verify|rm`: look after merger's cache.

    merger-cache ls [--all]                       the entries, last used first, and what made each
    merger-cache du                               bytes and files per part of the cache
    merger-cache gc --max-size 50GB               remove least recently used entries down to 50 GB
    merger-cache gc --older-than 30               remove entries not used for 30 days
    merger-cache verify                           re-hash every entry; mismatches go to quarantine
    merger-cache rm KEY                           remove one entry (a key, or 8+ of its first characters)

The cache is `--cache-dir DIR`, else $MERGER_CACHE_DIR, else outputs/cache in the
current directory: where `merger` run here would put it. Collecting next to
running merges is safe: an entry being computed or placed is skipped. Exit
status: 0, 1 when `verify` found mismatches, 2 on an error (one message, what,
where and fix).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from merger.cache.collect import GcResult, collect
from merger.cache.listing import PARTS, CacheEntry, entries, strays, usage
from merger.cache.store import CACHE_DIR_VARIABLE, COMMIT_GRACE_SECONDS, DEFAULT_CACHE_DIR, Cache, cache_location
from merger.cache.verify import remove, verify
from merger.core.sizes import SIZE_FORMS, parse_size
from merger.engine.progress import human_size
from merger.errors import EXIT_USER_ERROR, MergerError, os_error_block, shown

SHORT_KEY = 16
EXIT_MISMATCH = 1

GC_KINDS = (
    ("object", "cache entries"),
    ("stray", "objects without a valid record"),
    ("quarantine", "quarantined files"),
    ("tmp", "stale temporary files"),
    ("lock", "lock files nobody held"),
    ("memo", "source memo entries"),
)


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one merger error block, as every other failure."""

    def error(self, message: str) -> NoReturn:
        block = MergerError(message, where="merger-cache command line", fix=f"see {self.prog} --help")
        print(block.render(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def made_by(entry: CacheEntry) -> str:
    """What made an entry, in words (names from the record are made safe to print)."""
    if entry.kind == "node":
        text = f"node {entry.node or '?'} ({entry.op or '?'})"
        return shown(text + (f", recipe {entry.recipe}" if entry.recipe else ""))
    if entry.kind == "artifact":
        form = " ".join(str(entry.made[k]) for k in ("dtype", "format", "layout") if entry.made.get(k))
        of = (entry.of or "?")[:SHORT_KEY]
        return shown(f"output of node {entry.node or '?'}{f' as {form}' if form else ''} (from {of})")
    return shown(f"{entry.kind or 'unknown'}")


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds is not None else "?"


def cmd_ls(cache: Cache, args: argparse.Namespace) -> int:
    listed = sorted(entries(cache), key=lambda e: (e.last_used, e.key), reverse=True)
    loose = strays(cache)
    total = sum(e.bytes for e in listed)
    print(f"cache: {shown(cache.root)} ({len(listed)} entries, {human_size(total)})")
    if listed:
        width = max(len(e.key) for e in listed) if args.all else SHORT_KEY
        print(f"{'KEY':<{width}}  {'SIZE':>9}  {'LAST USED':<16}  MADE BY")
        for e in listed:
            key = shown(e.key if args.all else e.key[:SHORT_KEY])
            print(f"{key:<{width}}  {human_size(e.bytes):>9}  {_when(e.last_used):<16}  {made_by(e)}")
    if loose:
        grace = f"{COMMIT_GRACE_SECONDS:.0f} s"
        print(f"{len(loose)} files under objects/ are no valid entry (gc removes them once {grace} old):")
        for s in loose:
            print(f"  {shown(s.path.relative_to(cache.root))}  {human_size(s.bytes)}  {s.why}")
    return 0


def cmd_du(cache: Cache, args: argparse.Namespace) -> int:
    used = usage(cache)
    print(f"cache: {shown(cache.root)}")
    for part in PARTS:
        figures = used.parts[part]
        print(f"  {part:<11} {human_size(figures.bytes):>9}  {figures.files:>7} files")
    print(f"  {'total':<11} {human_size(used.bytes):>9}  {used.files:>7} files")
    return 0


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not days >= 0 or days == float("inf"):
        raise MergerError(
            f"'{shown(text)}' is not a number of days", where="--older-than", fix="give a number of days: 30, or 0.5"
        )
    return days


def describe_gc(result: GcResult) -> list[str]:
    parts = [
        f"{result.count(kind)} {what} ({human_size(result.freed_by(kind))})"
        for kind, what in GC_KINDS
        if result.count(kind)
    ]
    lines = ["removed " + ", ".join(parts) if parts else "nothing to remove"]
    lines.append(
        f"freed {human_size(result.freed)}: the cache takes {human_size(result.bytes_after)}"
        f" (was {human_size(result.bytes_before)})"
    )
    if result.skipped:
        keys = ", ".join(shown(k[:SHORT_KEY]) for k in sorted(set(result.skipped)))
        lines.append(f"left {len(set(result.skipped))} in use by another run: {keys}")
    if result.linked_bytes:
        lines.append(
            f"{human_size(result.linked_bytes)} of that is still linked by outputs:"
            " the disk space returns when those outputs are deleted"
        )
    return lines


def cmd_gc(cache: Cache, args: argparse.Namespace) -> int:
    if args.max_size is None and args.older_than is None:
        raise MergerError(
            "gc needs a bound",
            where="merger-cache gc",
            fix="give --max-size SIZE (e.g. 50GB), --older-than DAYS, or both",
        )
    try:
        max_size = parse_size(args.max_size) if args.max_size is not None else None
    except MergerError as e:
        raise e.located("--max-size") from None
    older = _days(args.older_than) if args.older_than is not None else None
    if not cache.root.is_dir():
        print(f"cache: {shown(cache.root)}: no cache there, nothing to remove")
        return 0
    result = collect(cache, max_size=max_size, older_than_days=older)
    print(f"cache: {shown(cache.root)}")
    for line in describe_gc(result):
        print(line)
    return 0


def cmd_verify(cache: Cache, args: argparse.Namespace) -> int:
    made = {e.key: made_by(e) for e in entries(cache)}
    result = verify(cache, workers=args.workers)
    rate = result.bytes_per_second / 1e9
    print(
        f"checked {result.checked} entries, {human_size(result.bytes)} in {result.seconds:.2f} s ({rate:.2f} GB/s)"
        f" in {shown(cache.root)}"
    )
    for key in result.bad:
        print(f"mismatch: {shown(key)} ({made.get(key, '?')}): moved to quarantine, it will be computed again")
    if result.strays:
        print(f"{result.strays} objects without a valid record were not checked (gc removes them)")
    if result.bad:
        print(f"{len(result.bad)} of {result.checked} entries no longer matched their records")
        return EXIT_MISMATCH
    print("all entries match their records")
    return 0


def cmd_rm(cache: Cache, args: argparse.Namespace) -> int:
    for path in remove(cache, args.key):
        print(f"removed {shown(path)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --cache-dir is accepted before and after the subcommand: the subcommands' copy has no
    # default, so that it does not overwrite a value given before the subcommand
    where = f"the cache (default: ${CACHE_DIR_VARIABLE}, else {DEFAULT_CACHE_DIR} in the current directory)"
    common = _Parser(add_help=False)
    common.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS, help=where)
    parser = _Parser(
        prog="merger-cache",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[2:]),
    )
    parser.add_argument("--cache-dir", metavar="DIR", default=None, help=where)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{ls,du,gc,verify,rm}", parser_class=_Parser)
    ls = sub.add_parser("ls", parents=[common], help="list the entries, most recently used first")
    ls.add_argument("--all", action="store_true", help="show full keys")
    ls.set_defaults(run=cmd_ls)
    du = sub.add_parser("du", parents=[common], help="bytes and files per part of the cache")
    du.set_defaults(run=cmd_du)
    gc = sub.add_parser("gc", parents=[common], help="remove entries by size or age, and leftovers")
    gc.add_argument("--max-size", metavar="SIZE", help=f"collect down to this size: {SIZE_FORMS}")
    gc.add_argument("--older-than", metavar="DAYS", help="remove entries (and memo entries) unused for DAYS days")
    gc.set_defaults(run=cmd_gc)
    check = sub.add_parser("verify", parents=[common], help="re-hash every entry against its record")
    check.add_argument("--workers", type=int, default=None, metavar="N", help="files hashed at once (default: CPUs)")
    check.set_defaults(run=cmd_verify)
    rm = sub.add_parser("rm", parents=[common], help="remove one entry")
    rm.add_argument("key", metavar="KEY", help="a key, or at least its first 8 characters")
    rm.set_defaults(run=cmd_rm)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    log = logging.getLogger("merger")
    if not log.handlers:
        log.addHandler(logging.NullHandler())  # the commands say what they did (no "computing it again")
    try:
        cache = Cache(cache_location(args.cache_dir, Path.cwd()))
        status = args.run(cache, args)
    except MergerError as e:
        print(e.render(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as e:
        print(os_error_block(e).render(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("merger: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status)


if __name__ == "__main__":
    main()
