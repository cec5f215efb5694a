"""Metric records: what an evaluation measured of an output, kept by a key of (the output's content,
the evaluation's settings, the data's hashes), so a re-run or a sweep job whose output is unchanged
measures nothing again (merger.report.evaluate makes the keys).

One small JSON file per key under `<cache>/metrics/`, written atomically. A record that cannot be
read, or is not a mapping of metric values, counts as absent; the record is measured again.
"""

from __future__ import annotations

import json
import re
from contextlib import suppress
from pathlib import Path
from typing import Any

from merger.cache.atomic import write_text_atomic
from merger.core.regular_file import read_bounded
from merger.core.strict_json import loads_strict

MAX_RECORD_BYTES = 16 * 1024 * 1024
_KEY = re.compile(r"^[0-9a-f]{16,128}$")


class MetricRecords:
    def __init__(self, root: Path) -> None:
        self.root = root  # <cache>/metrics

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a metric record key: {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        if path.parent.is_symlink() or path.is_symlink() or self.root.is_symlink():
            return None
        try:
            data, _ = read_bounded(path, MAX_RECORD_BYTES)
            record = loads_strict(data, what="a metric record") if data else None
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("metrics"), dict):
            return None
        return record

    def put(self, key: str, metrics: dict[str, Any]) -> None:
        """Keep `metrics` (plain JSON data) under `key`; a cache that cannot be written only means the
        next run measures again."""
        path = self._path(key)
        if self.root.is_symlink():
            return
        with suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"key": key, "metrics": metrics}, allow_nan=False))
