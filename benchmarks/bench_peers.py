"""merger against mergekit and sd-mecha, and the I/O floor, on the same inputs in one run.

    python benchmarks/bench_peers.py                      # 3 x ~1 GB float16 models
    python benchmarks/bench_peers.py --quick              # 3 x ~100 MB: a smoke run
    python benchmarks/bench_peers.py --tmpfs --repeat 3 --markdown

Inputs: three random Llama-shaped Hugging Face folders (`config.json` +
`model.safetensors`, written by common.write_llama_like, no transformers
needed): `base`, `ft1`, `ft2`. merger and mergekit get the folders, sd-mecha
the `model.safetensors` inside them, so all tools merge the same bytes. The
merges, each on the CPU, inputs' dtype out, computed in float32:

- weighted sum 0.7 ft1 + 0.3 ft2: merger `weighted_sum`, mergekit `linear`,
  sd-mecha `weighted_sum` (alpha 0.3);
- add difference ft1 + 0.5 (ft2 - base): merger `add_difference`, mergekit
  `task_arithmetic` (base + 1 (ft1 - base) + 0.5 (ft2 - base), the same sum),
  sd-mecha `add_difference`;
- TIES of ft1 and ft2 over base, density 0.5, weights 1: merger `ties`,
  mergekit `ties`, sd-mecha `add_difference(base, ties_sum(ft1 - base,
  ft2 - base, k=0.5, vote_sgn=True))`.

Every figure is a whole child process (common.measure: wall time, peak RSS
from wait4), warm page cache; merger starts each run with an empty cache.
"merge phase" is merger's wall time minus its start-up (the same merge of
three tiny models); the floor reads each input once and writes one output of
the same size with fsync, as merger does (mergekit and sd-mecha do not
fsync). The markdown table (--markdown) is the README's performance table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import MERGER, Measure, measure, size_mb
from peers_inputs import COMPARE, DTYPES, FLOOR, SD_MECHA, shape_for, write_model


@dataclass(frozen=True)
class Method:
    name: str
    merger: dict[str, Any]  # the recipe's node
    mergekit: dict[str, Any]  # mergekit's config (models as [name, parameters])
    exact: bool  # the tools compute the same thing (else their differences are information only)

    @property
    def inputs(self) -> list[str]:
        return ([self.merger["base"]] if "base" in self.merger else []) + list(self.merger["inputs"])


METHODS = [
    Method(
        "weighted_sum",
        {"op": "weighted_sum", "inputs": ["ft1", "ft2"], "weights": [0.7, 0.3]},
        {"merge_method": "linear", "models": [["ft1", {"weight": 0.7}], ["ft2", {"weight": 0.3}]]},
        True,
    ),
    Method(
        "add_difference",
        {"op": "add_difference", "inputs": ["ft1", "ft2", "base"], "multiplier": 0.5},
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [["ft1", {"weight": 1.0}], ["ft2", {"weight": 0.5}]],
        },
        True,
    ),
    Method(
        "ties",
        {"op": "ties", "base": "base", "inputs": ["ft1", "ft2"], "weights": [1.0, 1.0], "density": 0.5},
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [["ft1", {"weight": 1.0, "density": 0.5}], ["ft2", {"weight": 1.0, "density": 0.5}]],
        },
        False,
    ),
]
#: what each tool calls each merge
NAMES = {
    "merger": {"weighted_sum": "weighted_sum", "add_difference": "add_difference", "ties": "ties"},
    "mergekit": {"weighted_sum": "linear", "add_difference": "task_arithmetic", "ties": "ties"},
    "sd-mecha": {"weighted_sum": "weighted_sum", "add_difference": "add_difference", "ties": "ties_sum"},
}


@dataclass
class Row:
    method: str
    tool: str
    m: Measure
    startup: Measure | None = None  # the same merge of the tiny models
    diff: str = ""  # max |tool - merger| on the compared tensors


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 300MB, 1000000)")
    return int(float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match[2]])


def best_of(repeat: int, run: Callable[..., Measure], *args: Any) -> Measure:
    """The least wall time of `repeat` runs of run(*args), with the largest peak RSS among them."""
    runs = [run(*args) for _ in range(repeat)]
    return Measure(min(r.wall for r in runs), max(r.rss for r in runs))


def child_env(work: Path) -> dict[str, str]:
    """Caches and temporary files under the work directory (so under /dev/shm with --tmpfs)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TMPDIR=str(work / "tmp"))
    env.update(HF_HOME=str(work / "hf"), XDG_CACHE_HOME=str(work / "xdg"), MERGER_CACHE_DIR=str(work / "cache"))
    for name in ("tmp", "hf", "xdg"):
        (work / name).mkdir(exist_ok=True)
    return env


def run_merger(root: Path, method: Method, out: Path, env: dict[str, str]) -> Measure:
    recipe = {
        "sources": {name: str(root / name) for name in method.inputs},
        "nodes": {"merged": method.merger},
        "outputs": {"merged": {"path": str(out)}},
    }
    (root / "recipes").mkdir(exist_ok=True)
    (root / "recipes" / "peers.yaml").write_text("# @package _global_\n" + json.dumps(recipe) + "\n")
    cache = root / "merger_cache"
    shutil.rmtree(cache, ignore_errors=True)
    out.unlink(missing_ok=True)
    settings = ["progress=false", "preview=null", "sanity=off", "family=off", "device=cpu", f"cache_dir={cache}"]
    result = measure([*MERGER, "recipe=peers", *settings], root, env=env)
    shutil.rmtree(cache, ignore_errors=True)
    return result


def run_mergekit(root: Path, method: Method, out: Path, mergekit: str, dtype: str, env: dict[str, str]) -> Measure:
    config = dict(method.mergekit, dtype="float32", out_dtype=dtype)
    config["models"] = [{"model": str(root / name), "parameters": params} for name, params in config["models"]]
    if "base_model" in config:
        config["base_model"] = str(root / config["base_model"])
    (root / "mergekit.yaml").write_text(json.dumps(config))
    shutil.rmtree(out, ignore_errors=True)
    return measure([mergekit, str(root / "mergekit.yaml"), str(out), "--quiet"], root, env=env)


def run_sd_mecha(root: Path, method: Method, out: Path, dtype: str, env: dict[str, str]) -> Measure:
    out.unlink(missing_ok=True)
    files = [str(root / name / "model.safetensors") for name in ("base", "ft1", "ft2")]
    return measure([sys.executable, "-c", SD_MECHA, ".", method.name, str(out), dtype, *files], root, env=env)


def compare(ours: Path, theirs: Path, exact: bool) -> str:
    """max |theirs - ours| over a few tensors (embeddings, layer 0, norm, head), in a child process."""
    command = [sys.executable, "-c", COMPARE, ".", ours, theirs]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return f"(compare failed: {(done.stderr.strip().splitlines() or ['?'])[-1]})"
    got = json.loads(done.stdout)
    share = got["differing"] / max(1, got["elements"])
    return f"{got['max']:.1e} (rel {got['relative']:.1e}; {share:.1e} differ)" + ("" if exact else " info")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def pick_work_dir(args: argparse.Namespace, need: int) -> tuple[Path, str]:
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
        return args.dir, f"in {args.dir}"
    if args.tmpfs:
        shm = Path("/dev/shm")
        free = shutil.disk_usage(shm).free if shm.is_dir() else 0
        if free >= need:
            return Path(tempfile.mkdtemp(prefix="merger-peers-", dir=shm)), "on tmpfs (/dev/shm)"
        print(f"--tmpfs: /dev/shm has {free / 1e9:.1f} GB free, the run needs {need / 1e9:.1f} GB: on disk instead")
    work = Path(tempfile.mkdtemp(prefix="merger-peers-"))
    return work, f"on disk ({work.parent})"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def table(rows: list[Row], ours: dict[str, Measure], markdown: bool) -> list[str]:
    head = ["method", "tool", "start-up s", "wall s", "merge s", "peak RSS MB", "wall / merger", "RSS / merger"]
    head.append("max abs diff vs merger")
    body = []
    for r in rows:
        base = ours.get(r.method) if not r.tool.startswith("merger") else None
        start = f"{r.startup.wall:.2f}" if r.startup else ""
        phase = f"{r.m.wall - r.startup.wall:.2f}" if r.startup else ""
        ratios = [f"{r.m.wall / base.wall:.2f}x", f"{r.m.rss / base.rss:.2f}x"] if base else ["", ""]
        body.append([r.method, r.tool, start, f"{r.m.wall:.2f}", phase, f"{r.m.rss:.0f}", *ratios, r.diff])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * 6 + "---|"]
        return lines + ["| " + " | ".join(cells) + " |" for cells in body]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    align = [str.ljust] * 2 + [str.rjust] * 6 + [str.ljust]
    return [
        "  ".join(a(c, w) for a, c, w in zip(align, cells, widths, strict=True)).rstrip() for cells in [head, *body]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=10**9, help="bytes per input model (default 1GB)")
    parser.add_argument("--quick", action="store_true", help="~100 MB per input: a smoke run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--tmpfs", action="store_true", help="inputs, outputs and caches under /dev/shm")
    parser.add_argument("--repeat", type=int, default=1, help="take the least wall time of N runs")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    default_mk = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    parser.add_argument("--mergekit-yaml", default=default_mk, help="mergekit's CLI")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--tools", default="merger,mergekit,sd-mecha", help="which tools to run (comma-separated)")
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS), help="which merges (comma-separated)")
    args = parser.parse_args()
    chosen = set(args.tools.split(","))
    methods = [m for m in METHODS if m.name in args.methods.split(",")]
    size = 100 * 10**6 if args.quick else args.size
    mergekit = args.mergekit_yaml if args.mergekit_yaml and Path(args.mergekit_yaml).is_file() else None
    mergekit = mergekit if "mergekit" in chosen else None
    has_mecha = importlib.util.find_spec("sd_mecha") is not None and "sd-mecha" in chosen
    work, where = pick_work_dir(args, 6 * size + (64 << 20))
    try:
        env = child_env(work)
        hidden, vocab, layers = shape_for(size, args.dtype)
        tiny = work / "tiny"
        for seed, name in enumerate(("base", "ft1", "ft2"), start=1):
            write_model(work / name, seed=seed, dtype=args.dtype, hidden=hidden, vocab=vocab, layers=layers)
            write_model(tiny / name, seed=seed, dtype=args.dtype, hidden=64, vocab=256, layers=1)
        os.sync()  # the inputs' write-back is done before the first timing
        mb = size_mb(work / "base" / "model.safetensors")
        notes = [
            f"inputs: 3 random Llama folders (base, ft1, ft2), {mb:.0f} MB {args.dtype} each (hidden {hidden},"
            f" {layers} layers, vocabulary {vocab}), {where}; {os.cpu_count()} CPUs; warm page cache;"
            f" best of {args.repeat}",
            f"merger {version('merger')}, mergekit {version('mergekit')}, sd-mecha {version('sd-mecha')},"
            f" torch {version('torch')}; merger and mergekit read the folders, sd-mecha their model.safetensors",
        ]
        print("\n".join(notes))
        if mergekit is None and "mergekit" in chosen:
            print("mergekit not installed (pip install mergekit==0.1.5, or --mergekit-yaml PATH): its rows skipped")
        if not has_mecha and "sd-mecha" in chosen:
            print("sd-mecha not installed: pip install sd-mecha==1.1.8")
        tools: list[tuple[str, Callable[..., Measure], tuple[Any, ...], str]] = [
            ("merger", run_merger, (env,), "merger_out.safetensors")
        ]
        if mergekit:
            tools.append(("mergekit", run_mergekit, (mergekit, args.dtype, env), "mergekit_out"))
        if has_mecha:
            tools.append(("sd-mecha", run_sd_mecha, (args.dtype, env), "sd_mecha_out.safetensors"))
        rows: list[Row] = []
        ours: dict[str, Measure] = {}
        floors: dict[int, Measure] = {}
        phases: list[str] = []
        for method in methods:
            n = len(method.inputs)
            if n not in floors:
                files = [str(work / name / "model.safetensors") for name in method.inputs]
                command = [sys.executable, "-c", FLOOR, ".", str(work / "floor.bin"), *files]
                floors[n] = best_of(args.repeat, measure, command, work)
                (work / "floor.bin").unlink()
            for tool, run, extra, name in tools:  # start-up first: it also warms the page cache for the tool's code
                print(f"{method.name}: {tool} ...", file=sys.stderr, flush=True)
                startup = best_of(args.repeat, run, tiny, method, tiny / name, *extra)
                real = best_of(args.repeat, run, work, method, work / name, *extra)
                ours_out = work / tools[0][3]
                diff = "" if tool == "merger" else compare(ours_out, work / name, method.exact)
                rows.append(Row(method.name, f"{tool} {NAMES[tool][method.name]}", real, startup, diff))
                if tool == "merger":
                    ours[method.name], phase = real, real.wall - startup.wall
                    phases.append(
                        f"{method.name}: merger's merge phase {phase:.2f} s"
                        f" = {phase / floors[n].wall:.2f}x the floor for {n} inputs ({floors[n].wall:.2f} s)"
                    )
                else:
                    remove(work / name)
            remove(work / tools[0][3])
        for n, floor in sorted(floors.items()):
            rows.append(Row("floor", f"read {n} inputs, write 1, fsync", floor))
        print()
        print("\n".join(table(rows, ours, markdown=False)))
        print()
        print("\n".join(phases))
        print(
            "start-up: the same merge of three tiny models; merge = wall - start-up; ratios: the tool's wall"
            " time (peak RSS) over merger's on the same merge; max abs diff over embeddings, layer 0, final norm"
            " and head; rel: over the largest |value| of its tensor (float16's epsilon is 9.8e-4, bfloat16's"
            " 7.8e-3, float32's 1.2e-7); differ: the share of elements that differ; TIES (info): the tools"
            " break ties at the density cut differently, so its differences are information only."
            " merger fsyncs its output, mergekit and sd-mecha do not."
        )
        if args.markdown:
            print()
            print("\n".join(table(rows, ours, markdown=True)))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
