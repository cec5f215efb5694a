"""Folder outputs and LoRA extraction on ~650 MB Llama-shaped folders.

    python benchmarks/bench_folders.py            # two ~670 MB float32 folders (8 layers, hidden 1024)
    python benchmarks/bench_folders.py --layers 2 # smaller

Writes two random Llama-shaped Hugging Face folders (model.safetensors + config.json), then
measures, each as a whole `merger` process with an empty cache (wall seconds, peak RSS):
- a lerp written as one `.safetensors` file;
- the same lerp written as a model folder with 200 MB shards (`shard_size: 200MB`);
- `extract_lora` at rank 16 from the pair (when the op is registered), and `mergekit-extract-lora`
  at rank 16 on the same folders, when it is installed and runs here;
and prints the figures and the folder/file ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MERGER, Measure, measure, write_llama_like

HIDDEN, VOCAB = 1024, 32000


def write_folder(folder: Path, seed: int, layers: int) -> None:
    write_llama_like(folder / "model.safetensors", seed=seed, hidden=HIDDEN, vocab=VOCAB, layers=layers)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": HIDDEN * 11 // 4,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def run_recipe(work: Path, name: str, body: str) -> Measure:
    recipes = work / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / f"{name}.yaml").write_text("# @package _global_\nsources: {a: a, b: b}\n" + body)
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    return measure([*MERGER, f"recipe={name}", f"cache_dir={cache}", "progress=false"], work)


def registered(op: str) -> bool:
    from merger.ops import builtin_registry

    try:
        builtin_registry().get(op)
    except Exception:
        return False
    return True


def mergekit_extract(work: Path) -> Measure | str:
    tool = Path(sys.executable).parent / "mergekit-extract-lora"
    if not tool.exists():
        return "not installed"
    out = work / "mergekit-lora"
    shutil.rmtree(out, ignore_errors=True)
    command = [str(tool), "--model", str(work / "b"), "--base-model", str(work / "a"), "--out-path", str(out)]
    command += ["--max-rank", "16"]
    done = subprocess.run([*command, "--help"], cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        return f"does not run here: {done.stderr.strip().splitlines()[-1:]}"
    try:
        return measure(command, work, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    except SystemExit as e:
        return f"failed: {str(e).strip().splitlines()[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers per model (default 8: ~670 MB)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="merger-bench-folders-"))
    try:
        for name, seed in (("a", 1), ("b", 2)):
            write_folder(work / name, seed, args.layers)
        mb = (work / "a" / "model.safetensors").stat().st_size / 1e6
        print(f"two Llama-shaped folders of {mb:.0f} MB (float32, {args.layers} layers, hidden {HIDDEN})")
        node = "nodes:\n  m: {op: lerp, inputs: [a, b], alpha: 0.5}\n"
        file = run_recipe(work, "file", node + "outputs:\n  m: {path: m.safetensors}\n")
        folder = run_recipe(work, "folder", node + "outputs:\n  m: {path: m, shard_size: 200MB}\n")
        print(f"{'':34} {'wall s':>8} {'peak RSS MB':>12}")
        print(f"{'lerp -> one .safetensors':34} {file.wall:8.2f} {file.rss:12.0f}")
        print(f"{'lerp -> folder, 200 MB shards':34} {folder.wall:8.2f} {folder.rss:12.0f}")
        print(f"folder / file: time {folder.wall / file.wall:.2f}x, peak RSS {folder.rss / file.rss:.2f}x")
        if registered("extract_lora"):
            lora = run_recipe(
                work, "lora", "nodes:\n  l: {op: extract_lora, inputs: [a, b], rank: 16}\noutputs:\n  l: {path: lora}\n"
            )
            print(f"{'extract_lora rank 16 -> adapter':34} {lora.wall:8.2f} {lora.rss:12.0f}")
        else:
            print("extract_lora: not registered in this version")
        peer = mergekit_extract(work)
        if isinstance(peer, str):
            print(f"mergekit-extract-lora rank 16: {peer}")
        else:
            print(f"{'mergekit-extract-lora rank 16':34} {peer.wall:8.2f} {peer.rss:12.0f}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
