"""Inputs and child-process snippets for bench_peers.py (kept apart so that it stays short).

The inputs are Hugging Face Llama folders (`config.json` + `model.safetensors`)
written by common.write_llama_like, so no tool's Python has to build them:
mergekit and merger read the folders, sd-mecha the `model.safetensors` inside
them, so every tool merges the very same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import write_llama_like

#: --dtype -> (safetensors code, bytes per element)
DTYPES = {"float16": ("F16", 2), "bfloat16": ("BF16", 2), "float32": ("F32", 4)}
VOCAB = 32000


def shape_for(n_bytes: int, dtype: str) -> tuple[int, int, int]:
    """(hidden, vocabulary, layers) of a Llama of about n_bytes: embeddings at most half of it."""
    itemsize = DTYPES[dtype][1]
    hidden = next((h for h in (1024, 512, 256, 128) if 2 * VOCAB * h * itemsize <= n_bytes / 2), 128)
    inter = hidden * 11 // 4
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * itemsize
    layers = max(1, (n_bytes - 2 * VOCAB * hidden * itemsize) // per_layer)
    return hidden, VOCAB, int(layers)


def write_model(folder: Path, *, seed: int, dtype: str, hidden: int, vocab: int, layers: int) -> Path:
    """A random Llama folder: model.safetensors (common.write_llama_like) and a matching config.json."""
    write_llama_like(
        folder / "model.safetensors", seed=seed, hidden=hidden, vocab=vocab, layers=layers, dtype=DTYPES[dtype][0]
    )
    heads = max(1, hidden // 64)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


#: the floor: read every input once (argv[3:]), write one file of the first one's size (argv[2]), fsync
FLOOR = """
import os, sys
out, inputs = sys.argv[2], sys.argv[3:]
buf = bytearray(8 << 20); view = memoryview(buf)
for path in inputs:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf): pass
with open(out, "wb", buffering=0) as f:
    left = os.path.getsize(inputs[0])
    while left:
        left -= f.write(view[: min(left, len(buf))])
    os.fsync(f.fileno())
"""

#: sd-mecha's merges: argv = method, output file, dtype, base, ft1, ft2 (safetensors files)
SD_MECHA = """
import functools, sys, torch, sd_mecha
from tqdm import tqdm
from sd_mecha.extensions.builtin.merge_methods import linear
method, out, dtype = sys.argv[2:5]
base, ft1, ft2 = (sd_mecha.model(p) for p in sys.argv[5:8])  # no config: sd-mecha infers a structural one
if method == "weighted_sum":
    recipe = sd_mecha.weighted_sum(ft1, ft2, alpha=0.3)  # lerp: 0.7 ft1 + 0.3 ft2
elif method == "add_difference":
    recipe = sd_mecha.add_difference(ft1, ft2, base, alpha=0.5)  # ft1 + 0.5 (ft2 - base)
else:  # TIES: top-k trim, sign elected by the sum of the deltas (as mergekit and merger), mean of agreeing
    deltas = [sd_mecha.subtract(m, base) for m in (ft1, ft2)]
    ties = sd_mecha.ties_sum(*deltas, k=0.5, vote_sgn=True)
    # the merge method itself: the add_difference wrapper (and add_difference_ties) fail in 1.1.8 on a
    # delta whose merge space is still open (AttributeError: 'NoneType' object has no attribute 'identifier')
    recipe = linear.add_difference(base, ties, alpha=1.0)
sd_mecha.merge(recipe, output=out, merge_device="cpu", merge_dtype=torch.float32,
               output_device="cpu", output_dtype=getattr(torch, dtype), tqdm=functools.partial(tqdm, disable=True))
"""

#: compare a few tensors of two outputs (files or folders): prints JSON {max: largest |a - b|,
#: relative: the same over the largest |a| of its tensor, differing: elements that differ, elements}
COMPARE = """
import json, sys
from pathlib import Path
import numpy as np
from merger.core.arrays import NumpyBackend
from merger.io.sources import locate, open_source
xp = NumpyBackend()
a, b = (open_source(locate(Path(p), None, where=p), where=p) for p in sys.argv[2:4])
if set(a.spec()) != set(b.spec()):
    sys.exit(f"outputs differ in keys: {sorted(set(a.spec()) ^ set(b.spec()))[:5]}")
keys = [k for k in a.spec() if "layers." not in k or ".layers.0." in k]
def values(source, key):
    spec = source.spec()[key]
    raw = source.read_into(key, 0, spec.nbytes, memoryview(bytearray(spec.nbytes)))
    return np.asarray(xp.load(raw, spec.dtype, spec.shape), dtype=np.float32)
worst, relative, differing, elements = 0.0, 0.0, 0, 0
for key in keys:
    x, y = values(a, key), values(b, key)
    gap = np.abs(x - y)
    if not gap.size:
        continue
    worst, scale = max(worst, float(gap.max())), float(np.abs(x).max())
    relative = max(relative, float(gap.max()) / scale if scale else float(gap.max()))
    differing, elements = differing + int((gap > 0).sum()), elements + gap.size
print(json.dumps({"max": worst, "relative": relative, "differing": differing, "elements": elements}))
"""
