"""Per-key overhead: a lerp of two models of many tiny tensors, and a full cache hit against a bare
Hydra app (issue 13, part 4).

    python benchmarks/bench_many_keys.py [--keys 200000]

Writes two safetensors files of N float32 tensors of one element each (4 bytes each: the merge's
data is nothing, so the time is merger's per-key cost), runs `merger` on a lerp of them (first
run, empty cache), again (a full cache hit), and times a bare Hydra app that composes one config
and exits. Prints wall times, microseconds per key, and the hit's ratio to the bare app.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from common import MERGER, measure

BARE_APP = """
import hydra
from omegaconf import DictConfig

@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    pass

main()
"""


def write_many(path: Path, keys: int, value: float) -> None:
    """A safetensors file of `keys` float32 tensors of shape [1], all `value`."""
    header = {
        f"layers.{i // 8}.w{i % 8}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(keys)
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.write(struct.pack("<f", value) * keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merger-keys-"))
    try:
        write_many(work / "a.safetensors", args.keys, 1.0)
        write_many(work / "b.safetensors", args.keys, 3.0)
        (work / "recipes").mkdir()
        (work / "recipes" / "many.yaml").write_text(
            "# @package _global_\n"
            "sources: {a: a.safetensors, b: b.safetensors}\n"
            "nodes: {m: {op: lerp, inputs: [a, b], alpha: 0.25}}\n"
            "outputs: {m: {path: m.safetensors}}\n"
        )
        common = ["recipe=many", "progress=false", "family=off", "sanity=off", "cache_dir=cache"]
        first = measure([*MERGER, *common], work)
        hit = measure([*MERGER, *common], work)
        (work / "bare.py").write_text(BARE_APP)
        bare = measure([sys.executable, "bare.py", "hydra.run.dir=bare"], work)
        reports = sorted(work.glob("outputs/*/*/merge_report.json"))
        statuses = [json.loads(p.read_text())["nodes"]["m"]["status"] for p in reports]
        print(f"{args.keys} keys of 4 bytes; reports say {statuses}")
        print(
            f"first run (empty cache): {first.wall:.2f} s, {first.rss:.0f} MB peak RSS,"
            f" {first.wall / args.keys * 1e6:.1f} us a key (start-up included)"
        )
        print(
            f"full cache hit: {hit.wall:.2f} s, {hit.rss:.0f} MB; a bare Hydra app: {bare.wall:.2f} s;"
            f" ratio {hit.wall / bare.wall:.2f}x"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
