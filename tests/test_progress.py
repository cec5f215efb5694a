"""The per-node progress bar: tensors (not pieces) and bytes, drawn only on a terminal."""

from __future__ import annotations

import io

from merger.engine.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_counts_tensors_not_pieces_and_bytes() -> None:
    out = Terminal()
    progress = Progress("blend", tensors=2, nbytes=3_000_000, enabled=True, stream=out)
    progress.advance("a", 1_000_000)
    progress.advance("a", 1_000_000)  # a second piece of the same tensor
    progress.advance("b", 1_000_000)
    assert progress.tensors == 2 and progress.bytes == 3_000_000
    assert "2/2 tensors, 3.0 MB/3.0 MB" in out.getvalue()
    progress.close()
    assert out.getvalue().endswith("\r\033[K")


def test_silent_when_disabled_or_not_a_terminal() -> None:
    for stream, enabled in ((Terminal(), False), (io.StringIO(), True)):
        progress = Progress("blend", tensors=1, nbytes=10, enabled=enabled, stream=stream)
        progress.advance("a", 10)
        progress.close()
        assert stream.getvalue() == ""
