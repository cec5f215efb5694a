"""How a failure reaches the user: one short block and a non-zero exit, never a traceback.

A user error is a MergerError already (exit 2). Errors the environment raises
(a full disk, a file-size limit, too many open files, a read-only or vanished
directory) arrive as OSError and get a block with a fix for their errno; any
other exception is a bug in merger, told in a block that asks for a report
(exit 1). `-v` (`--verbose`) on merger's command line, or HYDRA_FULL_ERROR=1,
shows the traceback instead, for bug reports.

Signals: SIGTERM (a scheduler's stop) is turned into an orderly exit, so
temporary files are removed on the way out as for Ctrl-C; SIGKILL cannot be,
and the next run removes what a killed one left. A stop that lands inside a
library which turns it into another error (Hydra's config composition, say)
still ends as that stop: once a stop signal was received, any failure is told
as the stop, with its exit status.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

from merger.errors import EXIT_USER_ERROR, MergerError, os_error_block, shown

EXIT_BUG = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
VERBOSE_FLAGS = ("-v", "--verbose")
INTERRUPTED = "merger: interrupted; no partial output or cache entry was kept"


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that clean-up code runs."""


VERBOSE_VARIABLE = "MERGER_VERBOSE"


def wants_traceback(argv: list[str]) -> bool:
    """-v on the command line, or (in this process and the jobs it starts) MERGER_VERBOSE=1, which
    `command` sets for -v or for the user's own HYDRA_FULL_ERROR=1 (merger sets that one for itself)."""
    return any(a in VERBOSE_FLAGS for a in argv) or os.environ.get(VERBOSE_VARIABLE) == "1"


def without_verbose(argv: list[str]) -> list[str]:
    return [a for a in argv if a not in VERBOSE_FLAGS]


def explain(error: BaseException) -> tuple[MergerError, int]:
    """The block for any exception, and the exit status."""
    if isinstance(error, MergerError):
        return error, EXIT_USER_ERROR
    if isinstance(error, OSError):
        return os_error_block(error), EXIT_USER_ERROR
    if isinstance(error, MemoryError):
        block = MergerError(
            "out of memory", fix="merge smaller models, close other programs, or use a machine with more memory"
        )
        return block, EXIT_USER_ERROR
    text = str(error).strip().splitlines()
    block = MergerError(
        f"unexpected {type(error).__name__}: {shown(text[0]) if text else ''}".rstrip(": "),
        fix="this is a bug in merger: run again with -v to see the traceback, and report it",
    )
    return block, EXIT_BUG


#: the stop signals this process received (its handlers add them): the process's own record of a
#: process-wide event, read by `fail`
_RECEIVED: list[int] = []


def stop_received() -> tuple[str, int] | None:
    """(the message, the exit status) of the last stop signal received, if any."""
    if not _RECEIVED:
        return None
    if _RECEIVED[-1] == signal.SIGTERM:
        return INTERRUPTED.replace("interrupted", "terminated"), EXIT_TERMINATED
    return INTERRUPTED, EXIT_INTERRUPTED


def fail(error: BaseException, *, traceback: bool) -> int:
    """Print the block (or re-raise for the traceback); returns the exit status. After a stop
    signal, the failure is that stop's doing: its message and status."""
    stopped = stop_received()
    if stopped is not None:
        print(stopped[0], file=sys.stderr)
        return stopped[1]
    if traceback and not isinstance(error, MergerError):
        raise error
    block, status = explain(error)
    print(block.render(), file=sys.stderr)
    return status


def _terminate(signum: int, frame: FrameType | None) -> None:
    _RECEIVED.append(signum)
    raise Terminated


def _interrupt(signum: int, frame: FrameType | None) -> None:
    _RECEIVED.append(signum)
    raise KeyboardInterrupt


def _redeliver(args: Any) -> None:
    """Python swallows an exception raised where it cannot propagate (a weakref callback inside an
    import, say) and prints a traceback: a stop signal landing there is sent again instead, so that
    it ends the run where it can, with merger's message."""
    stops = {Terminated: signal.SIGTERM, KeyboardInterrupt: signal.SIGINT}
    signum = next(
        (n for kind, n in stops.items() if args.exc_type is not None and issubclass(args.exc_type, kind)), None
    )
    if signum is None:
        sys.__unraisablehook__(args)
        return
    import threading

    # from another thread, a moment later: the handler then runs once this hook has returned
    threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()


def prepare_process() -> None:
    """Process-wide set-up for the command: SIGTERM cleans up; Python warnings (torch's among them)
    go to the job's log file, not the terminal; the open-files limit is raised to its maximum."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    sys.unraisablehook = _redeliver
    logging.captureWarnings(True)
    captured = logging.getLogger("py.warnings")
    captured.addHandler(logging.NullHandler())  # until Hydra's logging config gives it the log file
    captured.propagate = False
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def command(body: Callable[[list[str]], None], argv: list[str]) -> NoReturn:
    """Run a console command's `body(argv)` (argv without -v) with merger's failure rules; exits."""
    traceback = wants_traceback(argv) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    if traceback:
        os.environ[VERBOSE_VARIABLE] = "1"  # jobs in other processes (Hydra's launchers) show tracebacks too
    prepare_process()
    try:
        _run(body, argv, traceback=traceback)
    finally:
        ignore_stops()


def ignore_stops() -> None:
    """From here the run's outcome is decided and its temporary files are gone: a stop signal is ignored
    (raised during the interpreter's exit, inside a library's own clean-up code, torch's, it aborted the
    process instead of ending it)."""
    for signum, ours in ((signal.SIGTERM, _terminate), (signal.SIGINT, _interrupt)):
        if signal.getsignal(signum) is ours:
            signal.signal(signum, signal.SIG_IGN)


def _run(body: Callable[[list[str]], None], argv: list[str], *, traceback: bool) -> NoReturn:
    try:
        body(without_verbose(argv))
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        print(INTERRUPTED.replace("interrupted", "terminated"), file=sys.stderr)
        sys.exit(EXIT_TERMINATED)
    except SystemExit as e:
        stopped = stop_received()
        if stopped is not None and e.code not in (0, None, stopped[1]):  # a stop that became another exit
            print(stopped[0], file=sys.stderr)
            sys.exit(stopped[1])
        raise
    except Exception as e:
        sys.exit(fail(e, traceback=traceback))
    sys.exit(0)
