"""The documented limits on untrusted input: each refusal names the limit it hit.

Recipes and model files may come from anyone. Work and memory must stay
bounded by the bytes an input really holds, whatever its header or pickle
claims; these are the bounds (the README lists them).
"""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB

#: tensors one model file (or folder) may declare
MAX_TENSORS = 1_000_000
#: dimensions of one tensor (torch allows at most 64; a long shape makes its size a huge product)
MAX_DIMS = 64
#: a safetensors header's JSON (the safetensors library's own limit)
MAX_HEADER_BYTES = 100_000_000
#: a sharded folder's model.safetensors.index.json
MAX_INDEX_BYTES = 64 * MIB
#: nesting of any JSON merger reads (headers, metadata, indexes, provenance, reports)
MAX_JSON_DEPTH = 64
#: a recipe file
MAX_RECIPE_BYTES = 1 * MIB
#: YAML alias expansions (`*anchor`) in one recipe file: a few thousand; more is a "billion laughs"
MAX_ALIAS_EXPANSIONS = 4096
#: YAML nodes in one recipe file once its aliases are expanded
MAX_YAML_NODES = 200_000
#: nodes in one recipe's graph
MAX_RECIPE_NODES = 2000
#: files one glob source may match, and files and folders its walk may look at
MAX_GLOB_FILES = 10_000
MAX_GLOB_ENTRIES = 200_000
#: a pickle inside a PyTorch checkpoint: this much, plus PICKLE_BYTES_PER_STORAGE per storage it holds
PICKLE_BASE_BYTES = 16 * MIB
PICKLE_BYTES_PER_STORAGE = 4 * KIB
#: pixels of one preview image (each output upscales every one of them)
MAX_PREVIEW_PIXELS = 1024 * 1024
#: pixels of one preview once upscaled (4096x4096: 192 MiB as float32 RGB, stitched on the CPU)
MAX_PREVIEW_OUTPUT_PIXELS = 4096 * 4096
#: images one run previews (a folder's and the list's together): every image-model node upscales each
MAX_PREVIEW_IMAGES = 16
#: jobs of one sweep (the basic sweeper lists them all before the first runs)
MAX_SWEEP_JOBS = 10_000
