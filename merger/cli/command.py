"""The console scripts' entry points: light to import, so that Ctrl-C or SIGTERM at any moment
ends in merger's message rather than a traceback (the heavy modules load inside `command`)."""

from __future__ import annotations

import gc
import os
import sys

from merger.cli.failure import command


def _merger(argv: list[str]) -> None:
    # A run makes few cycles and many short-lived objects: the collector's default of a pass per 700
    # allocations costs a short run ~40 ms; a pass per 100,000 bounds the garbage cycles hold to a few MB
    gc.set_threshold(100_000, 10, 10)
    # pydantic looks for its plugins (observers of validation) by reading every installed package's
    # entry points at the first model it builds, ~15 ms a run; merger's recipe models have none
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    # numpy's OpenBLAS starts a thread per core that spins 2^28 cycles (~0.1 s of a core) waiting for work
    # before it sleeps, at import and after each call: on a first run that core is the merge's; 2^4 is its least
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    from merger.cli.app import run
    from merger.cli.job import prepare  # noqa: F401  (every run's job needs it: loaded before the freeze)

    # What the imports made lives as long as the process: kept out of the collector's passes (a full
    # pass over Hydra's, pydantic's and merger's objects costs ~40 ms, twice in a short run)
    gc.freeze()
    run(argv)


def _inspect(argv: list[str]) -> None:
    from merger.cli.inspect import main

    main(argv[1:])


def _cache(argv: list[str]) -> None:
    from merger.cli.cache_command import main

    main(argv[1:])


def merger() -> None:
    """`merger`: the Hydra app."""
    command(_merger, sys.argv)


def merger_inspect() -> None:
    command(_inspect, sys.argv)


def merger_cache() -> None:
    command(_cache, sys.argv)
