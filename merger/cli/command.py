"""The console scripts' entry points: light to import, so that Ctrl-C or SIGTERM at any moment
ends in merger's message rather than a traceback (the heavy modules load inside `command`)."""

from __future__ import annotations

import sys

from merger.cli.failure import command


def _merger(argv: list[str]) -> None:
    from merger.cli.app import run

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
