"""Seconds per GB of each merge method, and agreement with mergekit (issue 5).

    python benchmarks/bench_methods.py --mergekit-yaml ~/mk/bin/mergekit-yaml
    python benchmarks/bench_methods.py --hidden 256 --layers 2        # quick and small

Builds a base Llama (hidden 1024, 8 layers, vocabulary 32000, float32, the
performance benchmark's size) with transformers from a config with random
init, and two "fine-tunes" of it (base + small noise), as Hugging Face
folders. For each method, runs merger (first run, empty cache) and, where it
has the method, mergekit on the same inputs, and prints seconds per GB read
(merge time minus start-up, over the bytes of all inputs), the largest
absolute difference between the two outputs, and the share of elements that
differ by more than 1e-5. DARE draws its random drops differently in each
tool, so its comparison runs at density 1 (no drop); TIES differs only where
deltas tie at its cut (each tool breaks such ties its own way).

    python benchmarks/bench_methods.py --memory                       # issue 13, part 2
    PYTHONPATH=/tmp/before python benchmarks/bench_methods.py --memory  # another checkout's merger

`--memory` needs no mergekit: it writes a Stable Diffusion-sized base (about
`--gb` GB of float16 in UNet-like conv, attention and feed-forward tensors) and
two fine-tunes of it (base + small noise, rounded to float16), and prints, per
method, the wall time, seconds per GB read (wall minus the start-up of the same
merge of tiny models, over the bytes of all inputs), peak RSS, and both against
the weighted sum's on the same three inputs (the figures of "TIES within 2x of a
lerp" in issue 13). The merger that runs is whichever `python -m merger` imports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_mergekit import python_of
from common import MERGER, measure, run_python, size_mb

FAMILY = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
root, hidden, layers = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                     vocab_size=32000 if hidden >= 512 else 1024, tie_word_embeddings=False)
model = LlamaForCausalLM(config).to(torch.float32)
model.save_pretrained(f"{root}/base", safe_serialization=True)
base = {k: v.clone() for k, v in model.state_dict().items()}
for i, name in enumerate(("ft1", "ft2")):
    g = torch.Generator().manual_seed(i + 1)
    model.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    model.save_pretrained(f"{root}/{name}", safe_serialization=True)
"""

#: name -> (merger node, mergekit config or None, inputs used)
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "lerp": ({"op": "lerp", "inputs": ["ft1", "ft2"], "alpha": 0.3}, None),
    "weighted_sum": (
        {"op": "weighted_sum", "inputs": ["ft1", "ft2"], "weights": [0.7, 0.3], "normalize": True},
        {"merge_method": "linear", "models": [["ft1", {"weight": 0.7}], ["ft2", {"weight": 0.3}]]},
    ),
    "slerp": (
        {"op": "slerp", "inputs": ["ft1", "ft2"], "t": 0.3},
        {"merge_method": "slerp", "base_model": "ft1", "models": [["ft1", {}], ["ft2", {}]], "parameters": {"t": 0.3}},
    ),
    "task_arithmetic": (
        {"op": "task_arithmetic", "base": "base", "inputs": ["ft1", "ft2"], "weights": [0.6, 0.4]},
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [["ft1", {"weight": 0.6}], ["ft2", {"weight": 0.4}]],
        },
    ),
    "ties": (
        {"op": "ties", "base": "base", "inputs": ["ft1", "ft2"], "weights": [1.0, 0.5], "density": 0.5},
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [["ft1", {"weight": 1.0, "density": 0.5}], ["ft2", {"weight": 0.5, "density": 0.5}]],
        },
    ),
    "dare_linear": (
        {"op": "dare_linear", "base": "base", "inputs": ["ft1", "ft2"], "weights": 0.5, "density": 1.0},
        {
            "merge_method": "dare_linear",
            "base_model": "base",
            "models": [["ft1", {"weight": 0.5, "density": 1.0}], ["ft2", {"weight": 0.5, "density": 1.0}]],
        },
    ),
    "dare_ties (density 0.5)": (
        {"op": "dare_ties", "base": "base", "inputs": ["ft1", "ft2"], "weights": 0.5, "density": 0.5},
        None,
    ),
    "model_stock": (
        {"op": "model_stock", "base": "base", "inputs": ["ft1", "ft2"]},
        {"merge_method": "model_stock", "base_model": "base", "models": [["ft1", {}], ["ft2", {}]]},
    ),
}


SD_LIKE = """
import sys
from pathlib import Path
import numpy as np
from merger.core.arrays import NumpyBackend
from merger.core.specs import TensorSpec
from merger.io.safetensors_file import SafetensorsWriter
root, n_bytes, dtype = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
root.mkdir(parents=True, exist_ok=True)
shapes, total, block = {}, 0, 0
while total < n_bytes // (4 if dtype == "F32" else 2):
    w = (320, 640, 1280)[block % 3]
    p = f"unet.block{block}."
    for name, shape in (("conv1", (w, w, 3, 3)), ("conv2", (w, w, 3, 3)), ("attn.q", (w, w)), ("attn.k", (w, w)),
                        ("attn.v", (w, w)), ("attn.out", (w, w)), ("ff.proj", (8 * w, w)), ("ff.out", (w, 4 * w)),
                        ("norm.weight", (w,)), ("norm.bias", (w,))):
        shapes[p + name] = shape
        total += int(np.prod(shape))
    block += 1
specs = {k: TensorSpec(dtype, s) for k, s in shapes.items()}
xp = NumpyBackend()
for name, seed in (("base", 0), ("ft1", 1), ("ft2", 2)):
    base_rng, noise = np.random.default_rng(0), np.random.default_rng(seed)
    writer = SafetensorsWriter(root / f"{name}.safetensors", specs, {})
    for key, spec in specs.items():
        for start in range(0, spec.numel, 1 << 22):
            n = min(1 << 22, spec.numel - start)
            values = base_rng.standard_normal(n, dtype=np.float32) * 0.02
            if seed:
                values += noise.standard_normal(n, dtype=np.float32) * 0.002
            writer.write_chunk(key, xp.store(values, dtype))
    writer.finish()
"""

#: --memory: name -> node (base, ft1, ft2 are the inputs)
MEMORY_METHODS: dict[str, dict[str, Any]] = {
    "weighted_sum": {"op": "weighted_sum", "inputs": ["base", "ft1", "ft2"], "weights": [0.4, 0.3, 0.3]},
    "ties": {"op": "ties", "base": "base", "inputs": ["ft1", "ft2"], "density": 0.3},
    "dare_ties": {"op": "dare_ties", "base": "base", "inputs": ["ft1", "ft2"], "density": 0.3},
    "dare_linear (l1)": {
        "op": "dare_linear",
        "base": "base",
        "inputs": ["ft1", "ft2"],
        "density": 0.3,
        "rescale": "l1",
    },
    "model_stock": {"op": "model_stock", "base": "base", "inputs": ["ft1", "ft2"]},
    "slerp": {"op": "slerp", "inputs": ["ft1", "ft2"], "t": 0.4},
}


def run_memory(root: Path, node: dict[str, Any]) -> Any:
    """One first run (empty cache) of `node` over root's base/ft1/ft2: its Measure."""
    recipe = {
        "sources": {name: str(root / f"{name}.safetensors") for name in ("base", "ft1", "ft2")},
        "nodes": {"merged": node},
        "outputs": {"merged": {"path": str(root / "out.safetensors")}},
    }
    (root / "recipes").mkdir(exist_ok=True)
    (root / "recipes" / "m.yaml").write_text("# @package _global_\n" + json.dumps(recipe) + "\n")
    settings = ["progress=false", "preview=null", "sanity=off", "family=off", "device=cpu", "cache_dir=cache_m"]
    shutil.rmtree(root / "cache_m", ignore_errors=True)
    (root / "out.safetensors").unlink(missing_ok=True)
    result = measure([*MERGER, "recipe=m", *settings], root)
    shutil.rmtree(root / "cache_m", ignore_errors=True)
    return result


def memory_table(work: Path, gb: float, dtype: str, repeat: int, methods: list[str]) -> None:
    """The --memory figures (see the module docstring); inputs already in `work` are used again."""
    tiny = work / "tiny"
    if not (work / "ft2.safetensors").exists():
        run_python(SD_LIKE, work, int(gb * 1e9), dtype)
        run_python(SD_LIKE, tiny, 1, dtype)
    read_gb = 3 * size_mb(work / "base.safetensors") / 1000
    print(f"inputs: base + 2 fine-tunes, {read_gb / 3 * 1000:.0f} MB {dtype} each (Stable Diffusion-like tensors)")
    print(f"{'method':<18} {'wall s':>7} {'s/GB':>6} {'RSS MB':>7} {'x time/GB':>10} {'x RSS':>6}")
    reference: tuple[float, float] | None = None
    for name in ["weighted_sum", *(m for m in methods if m != "weighted_sum")]:
        node = MEMORY_METHODS[name]
        startup = min(run_memory(tiny, node).wall for _ in range(repeat))
        runs = [run_memory(work, node) for _ in range(repeat)]
        wall, rss = min(r.wall for r in runs), max(r.rss for r in runs)
        per_gb = (wall - startup) / read_gb
        reference = reference or (per_gb, rss)
        ratios = f"{per_gb / reference[0]:10.2f} {rss / reference[1]:6.2f}"
        print(f"{name:<18} {wall:7.2f} {per_gb:6.2f} {rss:7.0f} {ratios}")


def differences(ours: Path, theirs: Path) -> tuple[float, int, int]:
    """(largest |ours - theirs|, elements differing by more than 1e-5, elements in all)."""
    import numpy as np

    from merger.io.sources import locate, open_source

    a = open_source(locate(ours, None, where="ours"), where="ours")
    b = open_source(locate(theirs, None, where="mergekit"), where="mergekit")
    worst, differing, total = 0.0, 0, 0
    for key, spec in a.spec().items():
        x = np.frombuffer(a.read_into(key, 0, spec.nbytes, memoryview(bytearray(spec.nbytes))), np.float32)
        y = np.frombuffer(b.read_into(key, 0, spec.nbytes, memoryview(bytearray(spec.nbytes))), np.float32)
        gap = np.abs(x - y)
        worst = max(worst, float(gap.max()) if gap.size else 0.0)
        differing += int((gap > 1e-5).sum())
        total += gap.size
    return worst, differing, total


def inputs_of(node: dict[str, Any]) -> list[str]:
    return ([node["base"]] if "base" in node else []) + list(node["inputs"])


def run_merger(root: Path, node: dict[str, Any]) -> tuple[float, Path]:
    recipe = {
        "sources": {name: str(root / name) for name in ("base", "ft1", "ft2")},
        "nodes": {"merged": node},
        "outputs": {"merged": {}},
    }
    (root / "recipes").mkdir(exist_ok=True)
    (root / "recipes" / "m.yaml").write_text("# @package _global_\n" + json.dumps(recipe) + "\n")
    shutil.rmtree(root / "outputs", ignore_errors=True)
    wall = measure([*MERGER, "recipe=m", "progress=false", "cache_dir=cache_m"], root).wall
    shutil.rmtree(root / "cache_m", ignore_errors=True)
    report = json.loads(next(root.glob("outputs/*/*/merge_report.json")).read_text())
    return wall, Path(report["outputs"]["merged"]["path"])


def run_mergekit(root: Path, mergekit: str, config: dict[str, Any]) -> tuple[float, Path]:
    config = json.loads(json.dumps(config))
    config["dtype"] = "float32"
    config["models"] = [{"model": str(root / name), "parameters": params} for name, params in config["models"]]
    if "base_model" in config:
        config["base_model"] = str(root / config["base_model"])
    (root / "mk.yaml").write_text(json.dumps(config))
    shutil.rmtree(root / "mk_out", ignore_errors=True)
    wall = measure([mergekit, str(root / "mk.yaml"), str(root / "mk_out"), "--quiet"], root).wall
    return wall, root / "mk_out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"), help="mergekit's CLI")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--memory", action="store_true", help="peak RSS and s/GB against a weighted sum (no mergekit)")
    parser.add_argument("--gb", type=float, default=1.0, help="--memory: GB of each input")
    parser.add_argument("--dtype", default="F16", choices=["F16", "BF16", "F32"], help="--memory: the inputs' dtype")
    parser.add_argument("--repeat", type=int, default=1, help="--memory: runs per figure (least time, most RSS)")
    parser.add_argument("--methods", default=",".join(MEMORY_METHODS), help="--memory: which, comma-separated")
    args = parser.parse_args()
    if args.memory:
        work = args.dir or Path(tempfile.mkdtemp(prefix="merger-memory-"))
        try:
            memory_table(work, args.gb, args.dtype, args.repeat, args.methods.split(","))
        finally:
            if args.dir is None:
                shutil.rmtree(work, ignore_errors=True)
        return
    if args.mergekit_yaml is None:
        sys.exit("this benchmark builds its models with mergekit's transformers: pass --mergekit-yaml PATH")
    work = args.dir or Path(tempfile.mkdtemp(prefix="merger-methods-"))
    try:
        run_python(FAMILY, work, args.hidden, args.layers, python=python_of(args.mergekit_yaml))
        tiny = work / "tiny"
        run_python(FAMILY, tiny, 64, 1, python=python_of(args.mergekit_yaml))
        gb = size_mb(work / "base") / 1000
        print(
            f"inputs: base + 2 fine-tunes, {gb * 1000:.0f} MB float32 each (hidden {args.hidden}, {args.layers} layers)"
        )
        print(f"{'method':<24} {'merger s':>9} {'s/GB':>6} {'mergekit s':>11} {'max |diff|':>11} {'differing':>10}")
        for name, (node, config) in METHODS.items():
            startup, _ = run_merger(tiny, node)
            wall, ours = run_merger(work, node)
            per_gb = (wall - startup) / (gb * len(inputs_of(node)))
            theirs_wall, diff, share = "-", "-", "-"
            if config is not None:
                seconds, theirs = run_mergekit(work, args.mergekit_yaml, config)
                worst, differing, total = differences(ours, theirs)
                theirs_wall, diff, share = f"{seconds:.2f}", f"{worst:.1e}", f"{differing / total:.1e}"
            print(f"{name:<24} {wall:9.2f} {per_gb:6.2f} {theirs_wall:>11} {diff:>11} {share:>10}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
