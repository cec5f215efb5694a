"""The files a folder output takes from its `config_from` source folder, besides the weights.

Only what loading needs: the model's `config.json` (its dtype set to the dtype written), its
generation config, and tokenizer and processor files, chosen by name and kind (`.json`, `.txt`,
`.model`, `.jinja`, `.tiktoken`, `.vocab`): never code (`.py`, which a folder placed where Python
looks would run), never weights, their indexes or the source's own card. A file a link takes out
of the folder is never read (a downloaded folder could link to a secret of this machine), and
files are bounded in size and number. Every file left out is named, with why, once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from merger.core.regular_file import open_regular
from merger.errors import shown
from merger.io.folder_config import ADAPTER_CONFIG, MODEL_CONFIG

#: the kinds of files copied; anything else is left out (and named)
COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab")
#: files never copied: merger writes its own weights, indexes, card and reports
OWN_NAMES = ("readme.md", "merge_report.json", ADAPTER_CONFIG)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".pkl")
MAX_COPIED_FILE = 128 * 1024 * 1024  # a large tokenizer.json is ~30 MB
MAX_COPIED_FILES = 64
MAX_COPIED_BYTES = 512 * 1024 * 1024


@dataclass
class Chosen:
    """The files to copy, and those left out with why (name -> reason)."""

    names: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)


def inside(folder: Path, path: Path) -> bool:
    """A file of the folder: a link followed only within it (or into a Hugging Face cache's blobs)."""
    root = folder.resolve()
    real = path.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    return real.is_relative_to(root) or (blobs is not None and real.is_relative_to(blobs))


def choose_files(folder: Path) -> Chosen:
    """What a folder output gets from `folder` (see the module docstring)."""
    chosen = Chosen()
    total = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name, lowered = entry.name, entry.name.lower()
        if name.startswith(".") or lowered in OWN_NAMES or lowered.endswith((*WEIGHT_SUFFIXES, ".index.json")):
            continue  # weights, indexes, cards: merger writes its own; hidden files: not the model's
        why = None
        if entry.is_dir():
            why = "a folder"
        elif not lowered.endswith(COPIED_SUFFIXES):
            why = "not a config or tokenizer file"
        elif not inside(folder, Path(entry.path)):
            why = "a link to a file outside the folder"
        elif not entry.is_file():
            why = "not a regular file"
        else:
            size = entry.stat().st_size
            if size > MAX_COPIED_FILE:
                why = f"larger than {MAX_COPIED_FILE // 2**20} MiB"
            elif len(chosen.names) >= MAX_COPIED_FILES or total + size > MAX_COPIED_BYTES:
                why = f"beyond {MAX_COPIED_FILES} files or {MAX_COPIED_BYTES // 2**20} MiB in all"
            else:
                total += size
        if why is None:
            chosen.names.append(name)
        else:
            chosen.left_out[name] = why
    return chosen


def config_inside(folder: Path) -> bool:
    """Whether the folder has a config.json of its own (not a link out of it)."""
    path = folder / MODEL_CONFIG
    return path.is_file() and inside(folder, path)


def check_regular(path: Path) -> None:
    """Refuse a FIFO or device (opening it would block) before copying."""
    with open_regular(path):
        pass


def describe_left_out(left_out: dict[str, str]) -> str:
    return ", ".join(f"{shown(name)} ({why})" for name, why in list(left_out.items())[:8]) + (
        f" and {len(left_out) - 8} more" if len(left_out) > 8 else ""
    )
