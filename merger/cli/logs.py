"""Console log format: plain messages, with a 'warning:' or 'error:' prefix where it matters."""

from __future__ import annotations

import logging


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"merger: error: {message}"
        if record.levelno >= logging.WARNING:
            return f"merger: warning: {message}"
        return message


class BelowWarning(logging.Filter):
    """Passes records under WARNING (they go to stdout; warnings go to stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING
