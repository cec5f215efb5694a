"""Many keys, and hits that cost nothing (issue 13, part 4): a run plans once (the pre-flight's plan is
handed to the job), a cache hit of an image model imports neither spandrel nor torch (what spandrel
found is remembered in the cache), and the per-key writers (headers, content hashes, the source memo)
give exactly the bytes and digests they gave before, faster. The timings are benchmarks/bench_many_keys.py's.
"""

from __future__ import annotations

import json
import random
import struct
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from hydra.core.plugins import Plugins

from merger.archs import image_models
from merger.archs.detection import Detection, ImageModel, detection_data, detection_from_data
from merger.cache import hashing
from merger.cache.hashing import KEY_SCHEME, digest_json, source_content_hash, spec_content_hash
from merger.cache.memo import MemoEntry, SourceMemo
from merger.cli.app import Job, PreflightCallback
from merger.cli.job_config import recipe_data, same_data
from merger.cli.recipe_source import RecipeDirSource
from merger.core.specs import TensorSpec
from merger.io.safetensors_file import build_header
from merger.io.safetensors_header import read_header
from tests.conftest import REPO, run_script_json

BLEND = """# @package _global_
sources:
  a: models/a.safetensors
  b: models/b.safetensors
nodes:
  blend: {op: lerp, inputs: [a, b], alpha: 0.25}
outputs:
  blend: {path: "blend${suffix}.safetensors"}
suffix: ""
"""

# --- the same bytes and digests as json.dumps / digest_json give ---------------------------------------------------


def _reference_header(specs: dict[str, TensorSpec], metadata: dict[str, str], min_length: int = 0) -> bytes:
    """build_header as it was: json.dumps of the whole header."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, spec in specs.items():
        header[key] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    length = max(len(text), min_length)
    length += -(8 + length) % 8
    return struct.pack("<Q", length) + text.ljust(length, b" ")


def _random_key(rng: random.Random) -> str:
    return "".join(rng.choice('ab."\\\u00e9\U0001f600\n\t_0') for _ in range(rng.randint(0, 8)))


def _random_specs(rng: random.Random, n: int) -> dict[str, TensorSpec]:
    return {
        _random_key(rng): TensorSpec(
            rng.choice(["F32", "F16", "BF16", "I64", "U8"]), tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 4)))
        )
        for _ in range(n)
    }


def test_headers_are_the_bytes_json_dumps_writes() -> None:
    rng = random.Random(0)
    cases: list[tuple[dict[str, TensorSpec], dict[str, str]]] = [
        ({}, {}),
        ({}, {"a": "b"}),
        ({"x": TensorSpec("F16", ())}, {}),
        ({"__metadata__": TensorSpec("F32", (2,)), "y": TensorSpec("I8", (0, 3))}, {"m": "\u00e9"}),
        ({"y": TensorSpec("I8", (0, 3)), "__metadata__": TensorSpec("F32", (2,))}, {"m": "x"}),
        ({"y": TensorSpec("I8", (0, 3)), "__metadata__": TensorSpec("F32", (2,))}, {}),
    ]
    for _ in range(300):
        metadata = {f"k{i}": rng.choice(["", 'v"', "\u2603", "x" * 40]) for i in range(rng.randint(0, 3))}
        cases.append((_random_specs(rng, rng.randint(0, 40)), metadata))
    for specs, metadata in cases:
        for min_length in (0, 700):
            assert build_header(specs, metadata, min_length=min_length) == _reference_header(
                specs, metadata, min_length
            )


def _reference_content_hash(tensors: list[tuple[str, str, tuple[int, ...], str]]) -> str:
    rows = sorted([key, dtype, list(shape), digest] for key, dtype, shape, digest in tensors)
    return digest_json({"scheme": KEY_SCHEME, "kind": "tensors", "tensors": rows})


def test_source_content_hashes_are_the_digests_they_were() -> None:
    """Cache keys depend on them: the digest of the canonical JSON of the sorted rows, exactly."""
    rng = random.Random(1)
    for _ in range(300):
        rows = [
            (_random_key(rng), rng.choice(["F32", "JSON", "I8"]), spec.shape, rng.choice(["ab" * 16, "cd", ""]))
            for spec in _random_specs(rng, 30).values()
            for _ in range(rng.randint(1, 2))  # equal keys too: the rows' other fields break the tie
        ]
        assert source_content_hash(rows) == _reference_content_hash(rows)
        assert source_content_hash(iter(rows)) == _reference_content_hash(rows)
    golden = [("a.weight", "F32", (2, 3), "0" * 32), ("\u00e9", "F16", (), "1" * 32)]
    assert source_content_hash(golden) == "9ee6fa2041d7a73a9cd93263036edbc142efc05ab8f0e99262e077d8faf370a9"


@pytest.mark.skipif(hashing.CONTENT_ROWS is None, reason="merger.cache._content_rows is not built")
def test_the_compiled_rows_give_the_content_hash_python_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """spec_content_hash's compiled writer against the reference, on keys and digests that need escaping,
    specs shared and not, and dtype codes that need it."""
    rng = random.Random(2)
    shared = TensorSpec("F32", (1,))
    for case in range(300):
        spec = _random_specs(rng, rng.randint(0, 40))
        if case % 3 == 0:
            spec = {key: shared for key in spec}  # one object, as equal specs of a header are
        if case % 7 == 0:
            spec = {**spec, "odd dtype": TensorSpec('F"\\\u00e9', (2,))}
        digests = {key: rng.choice(["ab" * 16, "", 'a"\\\n\u00e9']) for key in spec}
        rows = [(key, s.dtype, s.shape, digests[key]) for key, s in spec.items()]
        assert spec_content_hash(spec, digests) == _reference_content_hash(rows)
    monkeypatch.setattr(hashing, "CONTENT_ROWS", None)
    assert spec_content_hash(spec, digests) == _reference_content_hash(rows)


@pytest.mark.skipif(hashing.CONTENT_ROWS is None, reason="merger.cache._content_rows is not built")
def test_the_compiled_rows_refuse_what_they_cannot_write() -> None:
    rows = hashing.CONTENT_ROWS
    assert rows is not None
    spec = {"a": TensorSpec("F32", (1,))}
    with pytest.raises(KeyError):
        rows.rows(["a"], spec, {}, hashing._row_middle, hashing._string)  # no digest
    with pytest.raises(KeyError):
        rows.rows(["b"], spec, {"b": "x"}, hashing._row_middle, hashing._string)  # no spec
    with pytest.raises(TypeError):
        rows.rows(["a"], spec, {"a": 3}, hashing._row_middle, hashing._string)  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        rows.rows(["a"], spec, {"a": "x"}, lambda s: "\u00e9", hashing._string)  # a middle not ASCII
    with pytest.raises(ZeroDivisionError):
        rows.rows(["a"], spec, {"a": "x"}, lambda s: 1 / 0, hashing._string)  # the middle's own error
    assert rows.rows([], {}, {}, hashing._row_middle, hashing._string) == b""


@pytest.mark.skipif(hashing.CONTENT_ROWS is None, reason="merger.cache._content_rows is not built")
def test_the_compiled_rows_hold_what_they_use_while_a_callback_runs() -> None:
    """A `middle` that changes the dicts (merger's never does) gets an error or the objects' own rows: no
    freed digest written, no middle of a freed spec served for a new one at its address."""
    rows = hashing.CONTENT_ROWS
    assert rows is not None
    spec = {"k": TensorSpec("F32", (1,)), "k1": TensorSpec("F32", (2,))}
    digests = {"k": "digest-" + "x" * 40, "k1": "y"}

    def clearing(tensor: TensorSpec) -> str:
        digests.clear()
        return hashing._row_middle(tensor)

    with pytest.raises(KeyError):  # the first row is written from what it held; then k1 has no digest
        rows.rows(["k", "k1"], spec, digests, clearing, hashing._string)
    for _ in range(100):
        spec = {"a": TensorSpec("F32", (0,)), "b": TensorSpec("F32", (1,)), "c": TensorSpec("F32", (2,))}
        digests = {k: "d" for k in spec}

        def replacing(tensor: TensorSpec, spec: dict[str, TensorSpec] = spec) -> str:
            if tensor is spec["b"]:
                del spec["a"]  # a's spec, whose middle was made, is freed
                spec["c"] = TensorSpec("BF16", (7, 7))  # a new spec, perhaps where a's was
            return hashing._row_middle(tensor)

        written = json.loads("[" + rows.rows(["a", "b", "c"], spec, digests, replacing, hashing._string).decode() + "]")
        assert written[2] == ["c", "BF16", [7, 7], "d"]


# --- the source memo ---------------------------------------------------------------------------------------------


def test_the_memo_keeps_each_distinct_spec_once_and_reads_the_earlier_form(tmp_path: Path) -> None:
    memo = SourceMemo(tmp_path / "memo")
    spec = {f"layers.{i}.w": TensorSpec("F32", (4,)) for i in range(1000)} | {"head": TensorSpec("BF16", (2, 4))}
    identity = "ab" + "0" * 62
    memo.put(identity, MemoEntry("c" * 64, spec))
    path = tmp_path / "memo" / "ab" / f"{identity}.json"
    written = json.loads(path.read_text())
    assert written["specs"] == [["F32", [4]], ["BF16", [2, 4]]]
    entry = memo.get(identity)
    assert entry is not None and entry.spec == spec and list(entry.spec) == list(spec)
    path.write_text(json.dumps({"hash": "d" * 64, "spec": [[k, s.dtype, list(s.shape)] for k, s in spec.items()]}))
    earlier = memo.get(identity)
    assert earlier is not None and earlier.content_hash == "d" * 64 and list(earlier.spec.items()) == list(spec.items())


@pytest.mark.parametrize(
    "data",
    [
        {"hash": "h", "keys": ["a"], "specs": [["F32", [1]]], "spec_of": [1]},  # no such spec
        {"hash": "h", "keys": ["a"], "specs": [["F32", [1]]], "spec_of": [-1]},
        {"hash": "h", "keys": ["a"], "specs": [["F32", [1]]], "spec_of": [True]},
        {"hash": "h", "keys": ["a", "a"], "specs": [["F32", [1]]], "spec_of": [0, 0]},  # a key twice
        {"hash": "h", "keys": ["a"], "specs": [["F32", [1]]], "spec_of": []},
        {"hash": "h", "keys": [1], "specs": [["F32", [1]]], "spec_of": [0]},
        {"hash": "h", "keys": ["a"], "specs": [["F99", [1]]], "spec_of": [0]},
        {"hash": "h", "keys": ["a"], "specs": [["F32", [-1]]], "spec_of": [0]},
        {"hash": "h", "keys": ["a"], "specs": [["F32", 1]], "spec_of": [0]},
        {"hash": 5, "keys": ["a"], "specs": [["F32", [1]]], "spec_of": [0]},
        {"keys": ["a"], "specs": [["F32", [1]]], "spec_of": [0]},
        {"hash": "h", "keys": "a", "specs": [["F32", [1]]], "spec_of": [0]},
    ],
)
def test_a_damaged_memo_entry_is_none(tmp_path: Path, data: Any) -> None:
    memo = SourceMemo(tmp_path / "memo")
    identity = "cd" + "1" * 62
    path = tmp_path / "memo" / "cd" / f"{identity}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    assert memo.get(identity) is None
    path.write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's parser goes
    assert memo.get(identity) is None


# --- image-model detections, remembered ----------------------------------------------------------------------------


class DictStore:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get_detection(self, key: str) -> Any:
        return self.data.get(key)

    def put_detection(self, key: str, data: Any) -> None:
        self.data[key] = json.loads(json.dumps(data))  # as a file holds it


def test_detection_data_round_trips_and_refuses_anything_else() -> None:
    model = ImageModel("Compact", "RealESRGAN Compact", "SRVGGNetCompact", 4, 3, 3, {"num_feat": 8, "k": [1, "x"]})
    for found in (
        Detection(model),
        Detection(None, "why", True),
        Detection(ImageModel("A", "B", "C", None, None, None)),
    ):
        assert detection_from_data(json.loads(json.dumps(detection_data(found)))) == found
    good = detection_data(Detection(model))
    for broken in (
        None,
        [],
        {**good, "extra": 1},
        {**good, "why": 1},
        {**good, "model": {**good["model"], "scale": "4"}},
        {**good, "model": {**good["model"], "scale": True}},
        {**good, "model": {**good["model"], "tags": [1]}},
        {**good, "model": {**good["model"], "min_size": None}},
        {**good, "model": {k: v for k, v in good["model"].items() if k != "note"}},
    ):
        assert detection_from_data(broken) is None, broken


def test_a_detection_made_once_is_answered_from_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("spandrel")
    spec = dict(read_header(REPO / "merger" / "demo" / "psnr.safetensors").tensors)
    store = DictStore()
    monkeypatch.setattr(image_models, "_MEMO", {})
    first = image_models.detect(spec, store=store)
    assert first.model is not None and len(store.data) == 1

    def fail(*args: object) -> Detection:
        raise AssertionError("spandrel was asked again")

    monkeypatch.setattr(image_models, "_run_spandrel", fail)
    monkeypatch.setattr(image_models, "_MEMO", {})  # a new process
    assert image_models.detect(spec, store=store) == first
    monkeypatch.setattr(image_models, "_MEMO", {})
    monkeypatch.setattr(image_models, "DETECTION_VERSION", image_models.DETECTION_VERSION + 1)
    with pytest.raises(AssertionError, match="asked again"):  # another detector: what was stored is not its answer
        image_models.detect(spec, store=store)


# --- the pre-flight's plan, handed to the job ----------------------------------------------------------------------


def test_same_data_tells_types_and_order_apart() -> None:
    assert same_data({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]})
    assert not same_data({"a": 1}, {"a": True})
    assert not same_data({"a": 1}, {"a": 1.0})
    assert not same_data({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert not same_data({"a": [1]}, {"a": [1, 2]})


def _composed(launch_dir: Path, overrides: list[str]) -> Any:
    Plugins.instance().register(RecipeDirSource)
    with initialize_config_module(config_module="merger.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_the_preflight_hands_its_plan_to_the_job_once(launch_dir: Path, models: dict[str, Path]) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "blend.yaml").write_text(BLEND)
    overrides = ["recipe=blend", f"cache_dir={launch_dir / 'cache'}"]
    config = _composed(launch_dir, overrides)
    callback, job = PreflightCallback(), Job()
    callback.on_run_start(config)
    callback.on_job_start(config, task_function=job)
    data, label, _ = recipe_data(config, "blend", launch_dir, overrides)
    prepared = job.take(data, label, launch_dir)
    assert prepared is not None and list(prepared.plan.nodes) == ["blend"]
    assert job.take(data, label, launch_dir) is None  # once
    prepared.catalog.close()

    callback.on_run_start(config)
    callback.on_job_start(config, task_function=job)
    other = {**data, "outputs": {"blend": {"path": "elsewhere.safetensors"}}}
    assert job.take(other, label, launch_dir) is None  # not what was checked: the job plans for itself


def test_a_preflight_problem_is_the_block_and_exit_2(
    launch_dir: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "blend.yaml").write_text(BLEND.replace("models/b.safetensors", "models/nope.safetensors"))
    config = _composed(launch_dir, ["recipe=blend"])
    with pytest.raises(SystemExit) as info:
        PreflightCallback().on_run_start(config)
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("merger: error: model file not found")


#: runs `merger` in this process, counting the plans made, and says which heavy modules were imported
COUNTING = textwrap.dedent(
    """
    import json, sys
    import merger.cli.job as job
    from merger.cli.command import merger
    plans = []
    build_plan = job.build_plan
    job.build_plan = lambda *a, **k: plans.append(1) or build_plan(*a, **k)
    sys.argv = ["merger", *sys.argv[1:]]
    try:
        merger()
    except SystemExit as e:
        status = e.code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "spandrel"))
    print(json.dumps({"status": status, "plans": len(plans), "heavy": heavy}))
    """
)


def _count(launch_dir: Path, *args: str) -> dict[str, Any]:
    return run_script_json(COUNTING, launch_dir, *args)


def test_a_run_plans_once_and_an_image_model_hit_imports_neither_spandrel_nor_torch(launch_dir: Path) -> None:
    pytest.importorskip("spandrel")
    demo = ["progress=false", "preview=null", "evaluate=null", "objective=null", "sanity=off"]
    first = _count(launch_dir, *demo)
    assert first["plans"] == 1
    assert "spandrel" in first["heavy"]  # the demo models are image models spandrel detects
    hit = _count(launch_dir, *demo)
    assert hit == {"status": 0, "plans": 1, "heavy": []}
    reports = sorted(launch_dir.glob("outputs/*/*/merge_report.json"))
    assert [json.loads(p.read_text())["nodes"]["blend"]["status"] for p in reports] == ["computed", "cached"]


def test_a_job_whose_data_is_not_what_was_checked_plans_for_itself(launch_dir: Path, models: dict[str, Path]) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "blend.yaml").write_text(BLEND.replace('suffix: ""', 'suffix: "${now:%f}"'))
    result = _count(launch_dir, "recipe=blend", "progress=false")
    assert result["plans"] == 2  # the pre-flight's, and the job's own (its ${now:...} is another moment)


def test_the_plan_writes_no_detection_until_the_job_runs(launch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-flight that fails writes nothing: what the image-model checks found is written by the job."""
    pytest.importorskip("spandrel")
    from merger.cli.job import prepare
    from merger.ops import builtin_registry

    demo = REPO / "merger" / "demo"
    data = {
        "sources": {"a": str(demo / "psnr.safetensors"), "b": str(demo / "sharp.safetensors")},
        "nodes": {"m": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"m": {"path": "m.safetensors"}},
        "cache_dir": str(launch_dir / "cache"),
    }
    monkeypatch.setattr(image_models, "_MEMO", {})
    prepared = prepare(data, builtin_registry(), file="test", launch_dir=launch_dir)
    prepared.catalog.close()
    assert not list(launch_dir.rglob("*.detection.json"))
    prepared.cache.memo.write_detections()
    (written,) = launch_dir.rglob("*.detection.json")
    assert detection_from_data(json.loads(written.read_text())) is not None


# --- headers read by regular expressions, exactly as the strict reading reads them ---------------------------------


def _header_file(path: Path, text: str, data_bytes: int) -> Path:
    raw = text.encode("utf-8", errors="surrogatepass")
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)
    return path


def _read_both(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """read_header's answer (or its error's text) with the plain-header reading, and without it."""
    from merger.errors import MergerError
    from merger.io import safetensors_header

    def answer() -> object:
        try:
            return read_header(path)
        except MergerError as e:
            return e.render()

    fast = answer()
    with monkeypatch.context() as m:
        m.setattr(safetensors_header, "_plain_header", lambda raw: None)
        strict = answer()
    return fast, strict


#: what keys as writers write them (no escapes, ASCII here: json.dumps escapes the rest) have instead
PLAIN_KEYS = str.maketrans({'"': "q", "\\": "s", "\n": "n", "\t": "t"})


def test_plain_headers_read_as_the_strict_reading_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from merger.io import safetensors_header

    rng = random.Random(2)
    fast_ones = 0
    for case in range(600):
        specs = _random_specs(rng, rng.randint(0, 12))
        if case % 3:  # keys as writers write them (no escapes): the plain reading's own
            specs = {k.translate(PLAIN_KEYS).encode("ascii", "ignore").decode(): s for k, s in specs.items()}
        metadata = {_random_key(rng): _random_key(rng) for _ in range(rng.randint(0, 2))} if rng.random() < 0.6 else {}
        raw = build_header(specs, metadata)[8:].decode().rstrip(" ")
        if case % 5 == 0:  # UTF-8 as it is, as the safetensors library writes it
            raw = json.dumps(json.loads(raw), ensure_ascii=False, separators=(",", ":"))
        fast_ones += safetensors_header._plain_header(raw.encode()) is not None
        data_bytes = sum(s.nbytes for s in specs.values())
        if case % 2:  # a damaged one: a character dropped, doubled or replaced
            i = rng.randrange(len(raw))
            raw = rng.choice(
                [
                    raw[:i] + raw[i + 1 :],
                    raw[:i] + raw[i] + raw[i:],
                    raw[:i] + rng.choice('{}[],:"0\\ 9a_') + raw[i + 1 :],
                ]
            )
            data_bytes += rng.choice([0, 0, 4, -1]) if data_bytes else 0
        path = _header_file(tmp_path / f"{case}.safetensors", raw, max(data_bytes, 0))
        fast, strict = _read_both(path, monkeypatch)
        assert fast == strict, (raw, fast, strict)
    assert fast_ones > 100
    plain = build_header({"a": TensorSpec("F32", (2,)), "b": TensorSpec("I8", ())}, {"m": "x"})[8:]
    assert safetensors_header._plain_header(plain) is not None  # the usual header is read the fast way
