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
    args = parser.parse_args()
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
