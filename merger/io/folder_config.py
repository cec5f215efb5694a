"""The JSON files beside a model folder's weights: `config.json` of a Hugging Face model,
`adapter_config.json` of a PEFT adapter. Read strictly and bounded (they come from anywhere),
as plain data for the planner and the ops (an adapter's `lora_alpha`, a model's
`tie_word_embeddings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merger.core.regular_file import read_bounded
from merger.core.strict_json import JSONError, kind, loads_strict
from merger.errors import MergerError, Where, shown

MODEL_CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
#: a config is a few kilobytes; a tokenizer's is larger but is not read here
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def config_file(folder: Path) -> Path | None:
    """The folder's config: an adapter's, else a model's; None when it has neither."""
    for name in (ADAPTER_CONFIG, MODEL_CONFIG):
        if (folder / name).is_file():
            return folder / name
    return None


def read_config(path: Path, *, where: Where) -> dict[str, Any]:
    """A config file as a JSON object, or a MergerError that names it."""

    def bad(why: str) -> MergerError:
        return MergerError(
            f"'{shown(path)}' is not a valid {path.name}: {why}",
            where=where,
            fix="re-save the model (save_pretrained) or repair the file: it must be a JSON object",
        )

    try:
        data, size = read_bounded(path, MAX_CONFIG_BYTES)
    except OSError as e:
        raise MergerError(f"cannot read '{shown(path)}': {e.strerror}", where=where) from None
    if size > MAX_CONFIG_BYTES:
        raise bad(f"it is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    try:
        parsed = loads_strict(data, what="it")
    except JSONError as e:
        raise bad(str(e)) from None
    if not isinstance(parsed, dict):
        raise bad(f"it is {kind(parsed)}, not an object")
    return parsed
