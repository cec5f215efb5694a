"""merger.io.pth: merger's own reader of PyTorch checkpoints: formats, unwrapping, bounds, refusals.

The checkpoints are written with torch (or built byte by byte); what PthSource
reads (its spec, then each tensor's bytes) is compared with what was saved.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from merger.core.limits import MIB, PICKLE_BASE_BYTES
from merger.core.tensor_bytes import DTYPE_CODES, tensor_from_buffer
from merger.errors import MergerError
from merger.io.pth import PthSource
from tests.conftest import REPO, expect_error, fine_tune, tiny_state_dict

StateDict = dict[str, torch.Tensor]


def read_all(path: Path, key: str | None = None) -> StateDict:
    """Every tensor of a PthSource, read through read_into and turned into torch tensors."""
    source = PthSource(path, key)
    try:
        tensors = {}
        for name, spec in source.spec().items():
            out = bytearray(spec.nbytes)
            data = bytearray(source.read_into(name, 0, spec.nbytes, memoryview(out)))
            tensors[name] = tensor_from_buffer(data, spec.dtype, spec.shape)
        return tensors
    finally:
        source.close()


def _bytes_of(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(got: StateDict, expected: StateDict) -> None:
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert _bytes_of(got[key]) == _bytes_of(tensor), key


def _save(path: Path, obj: object, **kwargs: object) -> Path:
    torch.save(obj, path, **kwargs)  # type: ignore[arg-type]
    return path


def _zip_with_pickle(path: Path, pickled: bytes, records: dict[str, bytes] | None = None, **kwargs: object) -> Path:
    """A torch-style zip archive built by hand: archive/data.pkl and archive/data/<key> records."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled, **kwargs)  # type: ignore[arg-type]
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def _rewrite_zip(src: Path, dst: Path, change: Callable[[str, bytes], tuple[bytes, int]]) -> Path:
    """A copy of a zip checkpoint whose records `change(name, data)` -> (data, compression) rewrote."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            data, method = change(info.filename, old.read(info))
            new.writestr(info.filename, data, compress_type=method)
    return dst


class _TouchOnLoad:
    """Unpickling this calls pathlib.Path.touch(marker): code execution if a loader allowed it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class _SystemOnLoad:
    """Unpickling this runs os.system('touch marker')."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch '{self.marker}'",))


# --- unwrapping -------------------------------------------------------------------------------------


def test_bare_state_dict(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    _assert_same(read_all(_save(tmp_path / "m.pth", sd)), sd)


def test_spec_lists_keys_dtypes_and_shapes_in_order(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    spec = PthSource(_save(tmp_path / "m.pth", sd), None).spec()
    assert list(spec) == list(sd)
    for key, tensor in sd.items():
        assert spec[key].dtype == DTYPE_CODES[tensor.dtype]
        assert spec[key].shape == tuple(tensor.shape)


def test_params_ema_preferred_over_params(tmp_path: Path) -> None:
    ema, params = tiny_state_dict(0), tiny_state_dict(1)
    path = _save(tmp_path / "m.pth", {"params": params, "params_ema": ema, "iter": 5})
    _assert_same(read_all(path), ema)


def test_params_used_when_no_ema(tmp_path: Path) -> None:
    params = tiny_state_dict(1)
    path = _save(tmp_path / "m.pth", {"params": params, "optimizer": {"lr": 1e-4}})
    _assert_same(read_all(path), params)


def test_state_dict_wrapper(tmp_path: Path) -> None:
    sd = tiny_state_dict(2)
    path = _save(tmp_path / "m.ckpt", {"state_dict": sd, "epoch": 3, "global_step": 100})
    _assert_same(read_all(path), sd)


def test_model_wrapper(tmp_path: Path) -> None:
    sd = tiny_state_dict(3)
    path = _save(tmp_path / "m.pt", {"model": sd, "args": "x"})
    _assert_same(read_all(path), sd)


def test_nested_wrappers(tmp_path: Path) -> None:
    sd = tiny_state_dict(4)
    path = _save(tmp_path / "m.pth", {"state_dict": {"model": {"params_ema": sd}}, "meta": 1})
    _assert_same(read_all(path), sd)


def test_wrapper_that_is_not_a_dict_is_not_followed(tmp_path: Path) -> None:
    sd = tiny_state_dict(5)
    # 'model' is a string here (a name), so the tensors at this level are the weights
    path = _save(tmp_path / "m.pth", {**sd, "model": "RRDBNet"})
    _assert_same(read_all(path), sd)


def test_module_state_dict_with_metadata(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sd = model.state_dict()
    assert hasattr(sd, "_metadata")  # pickled as a BUILD of the OrderedDict
    _assert_same(read_all(_save(tmp_path / "m.pth", sd)), dict(sd))


def test_module_prefix_stripped_when_every_key_has_it(tmp_path: Path) -> None:
    sd = tiny_state_dict(6)
    path = _save(tmp_path / "m.pth", {f"module.{k}": v for k, v in sd.items()})
    _assert_same(read_all(path), sd)


def test_module_prefix_kept_when_not_every_key_has_it(tmp_path: Path) -> None:
    sd = {"module.a": torch.ones(2), "b": torch.zeros(2)}
    assert sorted(read_all(_save(tmp_path / "m.pth", sd))) == ["b", "module.a"]


def test_module_prefix_stripped_only_once(tmp_path: Path) -> None:
    sd = {"module.module.a": torch.ones(2), "module.b": torch.zeros(2)}
    assert sorted(read_all(_save(tmp_path / "m.pth", sd))) == ["b", "module.a"]


def test_non_tensor_entries_dropped(tmp_path: Path) -> None:
    sd = tiny_state_dict(7)
    extra = {"iter": 1000, "name": "x", "extra": [1, 2], "opt": {"lr": 0.1}, "s": {1, 2}, "b": b"", "c": 1j}
    path = _save(tmp_path / "m.pth", {**sd, **extra, "dev": torch.device("cuda", 0), "size": torch.Size([2])})
    _assert_same(read_all(path), sd)


def test_int_keys_become_strings(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {0: torch.ones(2), 1: torch.zeros(3)})
    assert list(read_all(path)) == ["0", "1"]


def test_explicit_key_path(tmp_path: Path) -> None:
    gen, disc = tiny_state_dict(8), tiny_state_dict(9)
    path = _save(tmp_path / "m.pth", {"params_ema": disc, "nets": {"generator": gen, "discriminator": disc}})
    _assert_same(read_all(path, "nets.generator"), gen)
    # an explicit key overrides the params_ema preference
    _assert_same(read_all(path, "nets.discriminator"), disc)


def test_explicit_key_wrong_lists_available_keys(tmp_path: Path) -> None:
    gen = tiny_state_dict(8)
    path = _save(tmp_path / "m.pth", {"nets": {"generator": gen, "discriminator": gen}, "iter": 3})
    error = expect_error(lambda: read_all(path, "nets.generatr"))
    assert "'generatr'" in error.what
    assert "nets.generatr" in error.what
    assert error.fix is not None
    assert "generator" in error.fix
    assert "discriminator" in error.fix
    assert "key:" in error.fix


def test_explicit_key_wrong_at_top_level_lists_top_keys(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {"params_ema": tiny_state_dict(0), "iter": 3})
    error = expect_error(lambda: read_all(path, "params_emma"))
    assert "params_emma" in error.what
    assert error.fix is not None
    assert "params_ema" in error.fix
    assert "iter" in error.fix


def test_explicit_key_lists_at_most_twelve_entries(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {f"net{i}": {"w": torch.ones(1)} for i in range(20)})
    error = expect_error(lambda: read_all(path, "nope"))
    assert error.fix is not None
    assert "net11" in error.fix and "net12" not in error.fix and "8 more" in error.fix


def test_explicit_key_through_a_non_dict(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {"iter": 3, "w": torch.ones(1)})
    error = expect_error(lambda: read_all(path, "iter.x"))
    assert "'x'" in error.what
    assert error.fix is not None
    assert "int" in error.fix


def test_no_tensors_error_mentions_key(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {"generator": {"w": torch.ones(2)}, "epoch": 3})
    error = expect_error(lambda: read_all(path))
    assert "no tensors" in error.what
    assert "generator" in error.what
    assert error.fix is not None
    assert "key:" in error.fix


def test_empty_dict_errors(tmp_path: Path) -> None:
    error = expect_error(lambda: read_all(_save(tmp_path / "m.pth", {})))
    assert "no tensors" in error.what


def test_top_level_tensor_is_not_a_state_dict(tmp_path: Path) -> None:
    error = expect_error(lambda: read_all(_save(tmp_path / "m.pth", torch.ones(3))))
    assert "Tensor" in error.what
    assert "not a state dict" in error.what


def test_top_level_list_is_not_a_state_dict(tmp_path: Path) -> None:
    error = expect_error(lambda: read_all(_save(tmp_path / "m.pth", [torch.ones(3)])))
    assert "list" in error.what


def test_wrapper_cycle_ends(tmp_path: Path) -> None:
    # a dict whose 'model' is itself (a memo reference): unwrapping stops instead of looping
    pickled = b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01h\x00s."
    error = expect_error(lambda: read_all(_zip_with_pickle(tmp_path / "m.pth", pickled)))
    assert "no tensors" in error.what


# --- formats and dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_protocols_load(tmp_path: Path, protocol: int, legacy: bool) -> None:
    sd = tiny_state_dict(protocol)
    path = _save(
        tmp_path / "m.pth", {"params_ema": sd}, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy
    )
    assert zipfile.is_zipfile(path) is not legacy
    _assert_same(read_all(path), sd)


def test_legacy_non_zip_format_loads(tmp_path: Path) -> None:
    sd = fine_tune(tiny_state_dict(0), 1)
    path = _save(tmp_path / "legacy.pth", {"params_ema": sd}, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    _assert_same(read_all(path), sd)


_ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool,
]  # fmt: skip


@pytest.mark.parametrize("legacy", [False, True])
def test_every_dtype_round_trips(tmp_path: Path, legacy: bool) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {str(dtype): (torch.randn(3, 5, generator=g) * 50).to(dtype) for dtype in _ALL_DTYPES}
    path = _save(tmp_path / "m.pth", sd, _use_new_zipfile_serialization=not legacy)
    _assert_same(read_all(path), sd)
    spec = PthSource(path, None).spec()
    assert [spec[str(d)].dtype for d in _ALL_DTYPES] == [DTYPE_CODES[d] for d in _ALL_DTYPES]


def test_new_dtypes_use_rebuild_tensor_v3(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {"f8": torch.ones(2).to(torch.float8_e5m2), "u": torch.ones(2).to(torch.uint32)})
    with zipfile.ZipFile(path) as archive:
        assert b"_rebuild_tensor_v3" in archive.read("m/data.pkl")
    _assert_same(read_all(path), torch.load(path, weights_only=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dtypes_kept(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = tiny_state_dict(1, dtype=dtype)
    _assert_same(read_all(_save(tmp_path / "m.pth", sd)), sd)


def test_parameters_are_tensors(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    tagged = torch.ones(2)
    tagged.tag = "x"  # type: ignore[attr-defined]  # a tensor with attributes: _rebuild_from_type_v2
    path = _save(tmp_path / "m.pth", {"w": weight, "f": frozen, "t": tagged})
    _assert_same(read_all(path), {"w": weight, "f": frozen, "t": tagged})


@pytest.mark.parametrize("legacy", [False, True])
def test_strided_views_read_in_c_order(tmp_path: Path, legacy: bool) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    sd = {
        "transposed": base[0].t(),
        "permuted": base.permute(2, 0, 1),
        "sliced": base[1:],  # a storage offset, contiguous
        "strided": base[:, ::2, 1:4],
        "scalar": base[2, 3, 4],
        "empty": base[:, :0],
        "half_t": base[0].t().to(torch.float16).t().t(),
        "size_one_dim": base[0].t().as_strided((5, 1, 4), (1, 2**61, 5)),  # any stride on a size-1 dimension
    }
    path = _save(tmp_path / "m.pth", sd, _use_new_zipfile_serialization=not legacy)
    _assert_same(read_all(path), sd)


def test_partial_and_concurrent_reads_of_a_strided_view(tmp_path: Path) -> None:
    base = torch.arange(200, dtype=torch.int16).reshape(10, 20)
    sd = {"a": base.t(), "b": base[:, 3:].t(), "c": base}
    path = _save(tmp_path / "m.pth", sd)
    source = PthSource(path, None)
    expected = {k: _bytes_of(v) for k, v in sd.items()}
    errors: list[BaseException] = []

    def read_pieces(key: str) -> None:
        try:
            for _ in range(20):
                whole = expected[key]
                got = b"".join(
                    bytes(source.read_into(key, i, min(i + 17, len(whole)), memoryview(bytearray(17))))
                    for i in range(0, len(whole), 17)
                )
                assert got == whole
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=read_pieces, args=(k,)) for k in ("a", "b", "c") * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    source.close()
    assert not errors


@pytest.mark.parametrize("legacy", [False, True])
def test_tied_weights_share_a_storage(tmp_path: Path, legacy: bool) -> None:
    embed = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    sd = {"embed.weight": embed, "head.weight": embed, "head.t": embed.t()}
    path = _save(tmp_path / "m.pth", sd, _use_new_zipfile_serialization=not legacy)
    _assert_same(read_all(path), sd)


def test_archive_name_is_arbitrary(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    src = _save(tmp_path / "original.pth", sd)
    renamed = _rewrite_zip(src, tmp_path / "x.pth", lambda name, data: (data, zipfile.ZIP_STORED))
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(tmp_path / "y.pth", "w") as b:
        for info in a.infolist():
            b.writestr("some_other_prefix/" + info.filename.split("/", 1)[1], a.read(info))
    _assert_same(read_all(renamed), sd)
    _assert_same(read_all(tmp_path / "y.pth"), sd)


def test_deflated_data_pkl_within_the_limit_loads(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    src = _save(tmp_path / "m.pth", sd)
    deflated = _rewrite_zip(
        src,
        tmp_path / "d.pth",
        lambda name, data: (data, zipfile.ZIP_DEFLATED if name.endswith("data.pkl") else zipfile.ZIP_STORED),
    )
    _assert_same(read_all(deflated), sd)


def test_torch_warnings_never_appear(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    paths = [_save(tmp_path / f"m{p}.pth", sd, pickle_protocol=p) for p in (3, 4, 5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in paths:
            read_all(path)
    assert not caught, [str(w.message) for w in caught]


def test_reader_does_not_import_torch(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = _save(tmp_path / "m.pth", {"params_ema": {"w": base, "t": base.t(), "h": base.half()}})
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from merger.io.pth import PthSource\n"
        "source = PthSource(Path(sys.argv[1]), None)\n"
        "for key, spec in source.spec().items():\n"
        "    assert len(source.read_into(key, 0, spec.nbytes, memoryview(bytearray(spec.nbytes)))) == spec.nbytes\n"
        "assert 'torch' not in sys.modules, 'the reader imported torch'\n"
        "print(sorted(source.spec()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['h', 't', 'w']"


# --- refusals: code, non-dense tensors, amplification -----------------------------------------------


def test_malicious_pickle_os_system_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned_system"
    path = _save(tmp_path / "evil.pth", {"w": torch.ones(2), "payload": _SystemOnLoad(marker)})
    assert not marker.exists()
    error = expect_error(lambda: read_all(path))
    assert not marker.exists(), "the pickled code ran"
    assert error.what.startswith(f"refused to load '{path}': its pickle names the Python object '")
    assert "system" in error.what  # the offending global (posix.system / os.system)
    assert "merger never runs pickled code" in error.what
    assert error.fix is not None
    assert error.fix.startswith("if you trust the file, re-save just the weights in Python:\n")
    assert "state_dict()" in error.fix
    assert error.where == str(path)


def test_malicious_pickle_path_touch_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned_touch"
    path = _save(tmp_path / "evil.pth", {"params_ema": {"w": torch.ones(2)}, "payload": _TouchOnLoad(marker)})
    error = expect_error(lambda: read_all(path))
    assert not marker.exists(), "the pickled code ran"
    assert "refused" in error.what
    # Path.touch pickles as getattr(PosixPath, 'touch'): the first global the loader rejects
    assert "getattr" in error.what or "touch" in error.what or "Path" in error.what


def test_malicious_pickle_refused_also_with_explicit_key(tmp_path: Path) -> None:
    marker = tmp_path / "pwned_key"
    path = _save(tmp_path / "evil.pth", {"good": {"w": torch.ones(2)}, "payload": _SystemOnLoad(marker)})
    error = expect_error(lambda: read_all(path, "good"))
    assert not marker.exists()
    assert "refused" in error.what


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_legacy_pickle_refused(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned_legacy"
    path = _save(
        tmp_path / "evil_legacy.pth",
        {"w": torch.ones(2), "payload": _SystemOnLoad(marker)},
        _use_new_zipfile_serialization=False,
        pickle_protocol=protocol,
    )
    error = expect_error(lambda: read_all(path))
    assert not marker.exists()
    assert "refused" in error.what
    assert "system" in error.what


def test_pickled_module_refused(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    path = _save(tmp_path / "model.pth", model)
    error = expect_error(lambda: read_all(path))
    assert "refused" in error.what
    assert "torch.nn.modules" in error.what
    assert error.fix is not None
    assert "state_dict" in error.fix


def test_globals_that_stand_ins_do_not_cover_are_refused(tmp_path: Path) -> None:
    # builtins torch never needs, reached through every way a pickle names a global
    for i, pickled in enumerate(
        [
            b"cbuiltins\neval\n(X\x04\x00\x00\x001+1tR.",
            b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93.",
            b"\x80\x02c__builtin__\ngetattr\n.",
            b"\x80\x02ctorch\nload\n.",
            b"\x80\x02ccollections\ndefaultdict\n.",
        ]
    ):
        error = expect_error(lambda p=pickled, i=i: read_all(_zip_with_pickle(tmp_path / f"g{i}.pth", p)))
        assert "refused" in error.what and "merger never runs pickled code" in error.what


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: torch.eye(3).to_sparse(), "sparse"),
        (lambda: torch.empty(3, device="meta"), "meta"),
        (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), "quantized"),
    ],
)
def test_non_dense_tensors_refused(tmp_path: Path, make: Callable[[], torch.Tensor], words: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation warning for quantized tensors
        path = _save(tmp_path / "m.pth", {"w": make(), "b": torch.ones(1)})
    error = expect_error(lambda: read_all(path))
    assert "refused" in error.what
    assert words in error.what and "dense" in error.what
    assert error.fix is not None


def test_lazy_negation_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {"w": torch._neg_view(torch.ones(2))})
    error = expect_error(lambda: read_all(path))
    assert "negation" in error.what
    assert error.fix is not None and "resolve_neg" in error.fix


def test_unsupported_dtype_names_the_tensor(tmp_path: Path) -> None:
    path = _save(tmp_path / "c.pth", {"ok": torch.ones(1), "w": torch.zeros(2, dtype=torch.complex64)})
    error = expect_error(lambda: PthSource(path, None))
    assert "tensor 'w'" in error.what and "complex64" in error.what


def test_unsupported_dtype_outside_the_state_dict_is_ignored(tmp_path: Path) -> None:
    path = _save(tmp_path / "c.pth", {"params_ema": {"w": torch.ones(1)}, "stats": torch.zeros(2, dtype=torch.cfloat)})
    assert list(read_all(path)) == ["w"]


def _small_memory(fn: Callable[[], object], limit: int = 64 * MIB) -> float:
    """Run `fn` (which must raise MergerError); its Python allocations' peak must stay under `limit`."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        expect_error(fn)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, peak
    return time.perf_counter() - start


def test_stride_zero_expand_refused_quickly(tmp_path: Path) -> None:
    huge = torch.ones(1000).expand(10**7, 1000)  # 40 GB as a tensor, 4 kB on disk
    path = _save(tmp_path / "m.pth", {"w": torch.ones(2), "huge": huge})
    assert path.stat().st_size < 100_000
    assert _small_memory(lambda: PthSource(path, None)) < 2
    error = expect_error(lambda: PthSource(path, None))
    assert "refused" in error.what and "'huge'" in error.what
    assert "[10000000, 1000]" in error.what and "4000 bytes" in error.what
    assert error.fix is not None and ".contiguous()" in error.fix


def test_overlapping_view_larger_than_its_storage_refused(tmp_path: Path) -> None:
    base = torch.arange(16, dtype=torch.float32)
    path = _save(tmp_path / "m.pth", {"w": base.as_strided((8, 8), (1, 1))})
    error = expect_error(lambda: PthSource(path, None))
    assert "refused" in error.what and "[8, 8]" in error.what and "64 bytes" in error.what


def test_many_keys_aliasing_one_storage_refused(tmp_path: Path) -> None:
    shared = torch.zeros(2**20, dtype=torch.uint8)  # 1 MiB, saved once
    path = _save(tmp_path / "m.pth", {f"k{i}": shared for i in range(80)})
    assert path.stat().st_size < 2 * MIB
    error = expect_error(lambda: PthSource(path, None))
    assert "refused" in error.what and "add up to" in error.what


def test_tensor_outside_its_storage_is_corrupt(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {"w": torch.ones(4)})
    # the pickle says the tensor starts at element 3 of its 4-element storage
    bad = _rewrite_zip(
        path,
        tmp_path / "bad.pth",
        lambda name, data: (data.replace(b"K\x00K\x04\x85", b"K\x03K\x04\x85"), zipfile.ZIP_STORED),
    )
    error = expect_error(lambda: PthSource(bad, None))
    assert "cannot read" in error.what and "reaches past" in error.what


def test_deflate_bomb_data_pkl_refused_without_unpacking(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pth"
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("archive/data.pkl", "w", force_zip64=True) as member,
    ):
        member.write(b"\x80\x02](")  # a list, then tens of millions of items for one APPENDS
        for _ in range(40):
            member.write(b"N" * 2**20)
        member.write(b"e.")
    assert path.stat().st_size < 200_000
    assert _small_memory(lambda: PthSource(path, None), limit=PICKLE_BASE_BYTES + 16 * MIB) < 2
    error = expect_error(lambda: PthSource(path, None))
    assert "refused" in error.what and "data.pkl" in error.what


@pytest.mark.parametrize("declared", [1000, PICKLE_BASE_BYTES - 1])
def test_deflate_bomb_with_a_lying_size_stays_bounded(tmp_path: Path, declared: int) -> None:
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02](" + b"N" * (40 * MIB) + b"e.")
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory's entry: its uncompressed size at +24
    data[entry + 24 : entry + 28] = declared.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert _small_memory(lambda: PthSource(path, None), limit=PICKLE_BASE_BYTES + 16 * MIB) < 2


def test_compressed_storage_record_refused(tmp_path: Path) -> None:
    src = _save(tmp_path / "m.pth", tiny_state_dict(0))
    compressed = _rewrite_zip(src, tmp_path / "z.pth", lambda name, data: (data, zipfile.ZIP_DEFLATED))
    error = expect_error(lambda: PthSource(compressed, None))
    assert "compressed" in error.what
    assert error.fix is not None and "torch.save" in error.fix


def test_big_endian_refused(tmp_path: Path) -> None:
    src = _save(tmp_path / "m.pth", tiny_state_dict(0))
    big = _rewrite_zip(
        src,
        tmp_path / "big.pth",
        lambda name, data: (b"big" if name.endswith("/byteorder") else data, zipfile.ZIP_STORED),
    )
    error = expect_error(lambda: PthSource(big, None))
    assert "big-endian" in error.what
    legacy = _save(tmp_path / "legacy.pth", tiny_state_dict(0), _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    at = data.index(b"little_endian")
    flag = data.index(b"\x88", at)  # NEWTRUE, right after the key and its memo entry
    legacy.write_bytes(data[:flag] + b"\x89" + data[flag + 1 :])
    error = expect_error(lambda: PthSource(legacy, None))
    assert "big-endian" in error.what


# --- damaged and foreign files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["hello this is not a checkpoint\n", "these are not weights\njust some text\n", "<html>404</html>", "cat\nmeow\n"],
)
def test_text_file_named_pth(tmp_path: Path, text: str) -> None:
    path = tmp_path / "notes.pth"
    path.write_text(text)
    error = expect_error(lambda: read_all(path))
    assert str(path) in error.what
    assert "refused" not in error.what  # not a security refusal: just not a checkpoint
    assert "checkpoint" in error.what


def test_empty_file_named_pth(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    error = expect_error(lambda: read_all(path))
    assert str(path) in error.what
    assert "checkpoint" in error.what


def test_missing_file(tmp_path: Path) -> None:
    error = expect_error(lambda: PthSource(tmp_path / "gone.pth", None))
    assert "cannot read" in error.what and "No such file" in error.what


def test_plain_pickle_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    error = expect_error(lambda: read_all(path))
    assert "not a PyTorch checkpoint" in error.what


def test_old_tar_format_named(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("pickle")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    error = expect_error(lambda: read_all(path))
    assert "tar format" in error.what
    assert error.fix is not None and "re-save" in error.fix


def test_torchscript_archive_named(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    error = expect_error(lambda: read_all(path))
    assert "TorchScript" in error.what


def test_truncated_zip_checkpoint(tmp_path: Path) -> None:
    path = _save(tmp_path / "cut.pth", tiny_state_dict(0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    error = expect_error(lambda: read_all(path))
    assert str(path) in error.what
    assert "refused" not in error.what


@pytest.mark.parametrize("cut", [1, 100, 1000])
def test_truncated_legacy_checkpoint(tmp_path: Path, cut: int) -> None:
    path = _save(tmp_path / "cut.pth", tiny_state_dict(0), _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    error = expect_error(lambda: PthSource(path, None))
    assert str(path) in error.what and "truncated" in error.what
    assert "refused" not in error.what


def test_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "archive.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    error = expect_error(lambda: read_all(path))
    assert "cannot read" in error.what
    assert str(path) in error.what
    assert "refused" not in error.what


def test_storage_missing_from_the_archive(tmp_path: Path) -> None:
    src = _save(tmp_path / "m.pth", {"w": torch.ones(2)})
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(tmp_path / "x.pth", "w") as b:
        for info in a.infolist():
            if "/data/" not in info.filename:
                b.writestr(info.filename, a.read(info))
    error = expect_error(lambda: read_all(tmp_path / "x.pth"))
    assert "lacks" in error.what


def test_numpy_file_named_pth_is_not_called_unsafe(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "array.pth"
    with open(path, "wb") as f:
        np.save(f, np.ones(3))
    error = expect_error(lambda: read_all(path))
    assert str(path) in error.what
    # a .npy holds no pickled globals at all: calling it a code-execution risk misleads the user
    assert "never runs pickled code" not in error.what


# --- pickles built to exhaust time or memory --------------------------------------------------------


def _loads_quickly(path: Path, seconds: float = 3.0) -> MergerError | None:
    start = time.perf_counter()
    try:
        read_all(path)
        error = None
    except MergerError as e:
        error = e
    assert time.perf_counter() - start < seconds
    return error


def test_tuple_dag_as_a_key_is_never_hashed(tmp_path: Path) -> None:
    # t_i = (t_{i-1}, t_{i-1}) through the memo: hashing t_60 would visit 2**60 tuples
    pickled = bytearray(b"\x80\x02}q\x00)q\x01")
    pickled += b"h\x01h\x01\x86q\x010" * 60
    pickled += b"0h\x01ctorch\nfloat32\ns."
    assert _loads_quickly(_zip_with_pickle(tmp_path / "dag.pth", bytes(pickled))) is not None


def test_deep_tuple_key_does_not_crash(tmp_path: Path) -> None:
    # hashing a million nested tuples overflows the C stack in Python's own unpickler
    pickled = b"\x80\x02})" + b"\x85" * 1_000_000 + b"K\x01s."
    assert _loads_quickly(_zip_with_pickle(tmp_path / "deep.pth", pickled)) is not None


def test_colliding_int_keys_stay_linear(tmp_path: Path) -> None:
    modulus = (1 << 61) - 1  # hash(k * modulus) == 0 for every k: a quadratic dict
    items = b"".join(b"\x8a\x10" + (k * modulus).to_bytes(16, "little") + b"N" for k in range(1, 100_000))
    assert _loads_quickly(_zip_with_pickle(tmp_path / "c.pth", b"\x80\x02}(" + items + b"u.")) is not None


def test_memo_amplification_refused(tmp_path: Path) -> None:
    # one list of a million pairs, then OrderedDict(that list) called again and again through the memo
    pickled = b"\x80\x02K\x01K\x02\x86q\x000ccollections\nOrderedDict\nq\x01](" + b"h\x00" * 1_000_000
    pickled += b"e\x85q\x020" + b"h\x01h\x02R0" * 10_000 + b"N."
    error = _loads_quickly(_zip_with_pickle(tmp_path / "amp.pth", pickled), seconds=10)
    assert error is not None and "refused" in error.what


def test_many_empty_containers_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1-byte opcodes that each make a ~60-byte object: charged, so memory stays proportional to the file
    monkeypatch.setattr("merger.io.pth_archive.WORK_PER_BYTE", 1)  # the same bound, reached in fewer opcodes
    pickled = b"\x80\x02" + b"}" * 3_000_000 + b"."
    error = _loads_quickly(_zip_with_pickle(tmp_path / "d.pth", pickled), seconds=10)
    assert error is not None and "refused" in error.what


@pytest.mark.parametrize("opcode", [b"\x8e", b"\x96", b"\x8d", b"\x95"])  # BINBYTES8 BYTEARRAY8 BINUNICODE8 FRAME
def test_huge_declared_lengths_allocate_nothing(tmp_path: Path, opcode: bytes) -> None:
    path = _zip_with_pickle(tmp_path / "m.pth", b"\x80\x05" + opcode + (1 << 40).to_bytes(8, "little") + b"abc.")
    assert _small_memory(lambda: read_all(path), limit=8 * MIB) < 2


@pytest.mark.parametrize(
    "pickled",
    [
        b"\x80\x02ccollections\nOrderedDict\n)\x81.",  # NEWOBJ
        b"\x80\x02(ccollections\nOrderedDict\no.",  # OBJ
        b"\x80\x02\x82\x01.",  # EXT1
        b"\x80\x02]N\x85b.",  # BUILD of a list
        b"\x80\x02\x8c\x03abc(Ne.",  # APPENDS to a str
        b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R.",  # bytearray(1 GiB)
        b"\x80\x02ctorch\nfloat32\nb.",  # BUILD of a stand-in
        b"\x80\x02X\x03\x00\x00\x00abc)R.",  # calling a str
    ],
)
def test_opcodes_that_build_or_call_arbitrary_objects_refused(tmp_path: Path, pickled: bytes) -> None:
    error = _loads_quickly(_zip_with_pickle(tmp_path / "m.pth", pickled))
    assert error is not None and "cannot read" in error.what


def test_a_small_limit_breach_is_reported_with_the_limit(tmp_path: Path) -> None:
    pickled = b"\x80\x02(" + b"N" * (PICKLE_BASE_BYTES + 10) + b"l."
    error = expect_error(lambda: PthSource(_zip_with_pickle(tmp_path / "m.pth", pickled), None))
    assert "refused" in error.what and str(PICKLE_BASE_BYTES) in error.what


def test_the_unpickler_runs_once_per_file_per_run(tmp_path: Path) -> None:
    """The pre-flight parses a .pth source; the job (and the next run) read it through its remembered layout."""
    import subprocess
    import sys

    torch.save({"params_ema": tiny_state_dict(0)}, tmp_path / "a.pth")
    torch.save(fine_tune(tiny_state_dict(0), 1), tmp_path / "b.pth")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(
        "# @package _global_\nalpha: 0.5\nsources:\n  a: a.pth\n  b: b.pth\n"
        "nodes:\n  blend: {op: lerp, inputs: [a, b], alpha: '${alpha}'}\noutputs:\n  blend: {}\n"
    )
    script = (
        "import atexit, sys\nimport merger.io.pth as pth\ncalls = []\nreal = pth.load_archive\n"
        "pth.load_archive = lambda *a: calls.append(a[0].name) or real(*a)\n"
        "atexit.register(lambda: print('UNPICKLED', sorted(calls)))\n"
        "from merger.cli.command import merger\nsys.argv = ['merger', *sys.argv[1:]]\nmerger()\n"
    )

    def unpickled(*overrides: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, "recipe=r", f"cache_dir={tmp_path / 'cache'}", *overrides],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert unpickled() == "UNPICKLED ['a.pth', 'b.pth']"  # once each: the pre-flight's parse serves the job
    assert unpickled("alpha=0.25") == "UNPICKLED []"  # a new node: read through the remembered layout
