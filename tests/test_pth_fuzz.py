"""merger.io.pth on damaged and hostile bytes: a loaded source whose reads succeed, or a MergerError, fast.

Property-based (hypothesis, derandomized): valid zip and legacy checkpoints
with bytes flipped, cut, inserted or overwritten; valid zips whose data.pkl is
mutated or replaced by random opcode streams (with arguments, spliced with
pieces of real pickles). Any other exception, or a case slower than
SECONDS_PER_CASE, fails. MERGER_FUZZ_EXAMPLES=5000 runs a longer campaign.
"""

from __future__ import annotations

import io
import os
import pickletools
import time
import zipfile
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merger.errors import MergerError
from merger.io.pth import PthSource

SECONDS_PER_CASE = 2.0
SETTINGS = settings(
    max_examples=int(os.environ.get("MERGER_FUZZ_EXAMPLES", "150")),  # raise it for a longer campaign
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _state_dict() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "params_ema": {
            "conv.weight": base,
            "conv.t": base.t(),
            "bias": torch.randn(6, generator=g).half(),
            "f8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
            "steps": torch.tensor(7),
        },
        "iter": 3,
        "names": ["a", "b"],
    }


@cache
def _checkpoints() -> dict[str, bytes]:
    made = {}
    for name, kwargs in {
        "zip2": {},
        "zip4": {"pickle_protocol": 4},
        "legacy2": {"_use_new_zipfile_serialization": False},
        "legacy5": {"_use_new_zipfile_serialization": False, "pickle_protocol": 5},
    }.items():
        buffer = io.BytesIO()
        torch.save(_state_dict(), buffer, **kwargs)  # type: ignore[arg-type]
        made[name] = buffer.getvalue()
    return made


@cache
def _zip_parts() -> tuple[bytes, dict[str, bytes]]:
    """The data.pkl of a real zip checkpoint and its other records."""
    with zipfile.ZipFile(io.BytesIO(_checkpoints()["zip2"])) as archive:
        records = {info.filename.split("/", 1)[1]: archive.read(info) for info in archive.infolist()}
    return records.pop("data.pkl"), records


def _zip_around(pickled: bytes) -> bytes:
    _, records = _zip_parts()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        for name, data in records.items():
            archive.writestr(f"archive/{name}", data)
    return buffer.getvalue()


def _check(directory: Path, data: bytes) -> None:
    """Open and read everything: success or MergerError, within the time bound."""
    path = directory / "case.pth"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        source = PthSource(path, None)
        try:
            for key, spec in source.spec().items():
                out = memoryview(bytearray(spec.nbytes))
                assert len(source.read_into(key, 0, spec.nbytes, out)) == spec.nbytes
        finally:
            source.close()
    except MergerError as error:
        assert error.what and error.where == str(path) and error.fix
    assert time.perf_counter() - start < SECONDS_PER_CASE


def _mutate(data: bytes, edits: list[tuple[int, int, int, bytes]]) -> bytes:
    """Apply (kind, position, count, payload) edits: flip a bit, truncate, insert, overwrite a range."""
    buf = bytearray(data)
    for kind, position, count, payload in edits:
        at = position % (len(buf) + 1)
        if kind == 0 and at < len(buf):
            buf[at] ^= 1 << (count % 8)
        elif kind == 1:
            del buf[at:]
        elif kind == 2:
            buf[at:at] = payload
        else:
            buf[at : at + len(payload)] = payload
    return bytes(buf)


_EDITS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255), st.binary(min_size=1, max_size=16)),
    min_size=1,
    max_size=4,
)


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_unmutated_checkpoints_load(directory: Path) -> None:
    for data in _checkpoints().values():
        path = directory / "ok.pth"
        path.write_bytes(data)
        assert sorted(PthSource(path, None).spec()) == ["bias", "conv.t", "conv.weight", "f8", "steps"]


@SETTINGS
@given(name=st.sampled_from(["zip2", "zip4", "legacy2", "legacy5"]), edits=_EDITS)
def test_mutated_files(directory: Path, name: str, edits: list[tuple[int, int, int, bytes]]) -> None:
    data = _checkpoints()[name]
    if name.startswith("zip"):
        # aim most edits at the pickle and the headers, not at tensor data
        edits = [(kind, position % 1200, count, payload) for kind, position, count, payload in edits]
    _check(directory, _mutate(data, edits))


@SETTINGS
@given(edits=_EDITS)
def test_mutated_data_pkl_in_a_valid_zip(directory: Path, edits: list[tuple[int, int, int, bytes]]) -> None:
    pickled, _ = _zip_parts()
    _check(directory, _zip_around(_mutate(pickled, edits)))


_GLOBALS = [
    b"collections\nOrderedDict\n", b"torch._utils\n_rebuild_tensor_v2\n", b"torch._utils\n_rebuild_tensor_v3\n",
    b"torch._utils\n_rebuild_parameter\n", b"torch._tensor\n_rebuild_from_type_v2\n", b"torch\nFloatStorage\n",
    b"torch.storage\nUntypedStorage\n", b"torch\nfloat32\n", b"torch\nSize\n", b"torch\ndevice\n",
    b"__builtin__\nset\n", b"__builtin__\nbytearray\n", b"_codecs\nencode\n", b"torch\nTensor\n",
    b"torch.nn.parameter\nParameter\n", b"os\nsystem\n", b"builtins\ngetattr\n",
]  # fmt: skip
_OPCODES = [op for op in pickletools.opcodes if op.code not in "\x82\x83\x84"]  # EXT*: no registry


@st.composite
def _opcode(draw: st.DrawFn) -> bytes:
    """One opcode and a plausible argument for it (lengths small, sometimes lying)."""
    op = draw(st.sampled_from(_OPCODES))
    code = op.code.encode("latin-1")
    arg = op.arg
    if arg is None:
        return code
    if op.name in ("GLOBAL", "INST"):
        return code + draw(st.sampled_from(_GLOBALS))
    n = arg.n
    if n > 0:
        return code + draw(st.binary(min_size=n, max_size=n))
    text = draw(st.sampled_from([b"0", b"1", b"17", b"-3", b"'storage'", b"'0'", b"1.5", b"L", b"x"]))
    if n == -1:  # up to a newline
        return code + text + b"\n"
    payload = draw(st.one_of(st.binary(max_size=12), st.sampled_from([b"storage", b"0", b"cpu", b"w"])))
    size = len(payload) + draw(st.sampled_from([0, 0, 0, 1, -1, 1000, 1 << 30]))
    width = {-2: 1, -3: 4, -4: 4, -5: 8}.get(n, 1)
    size %= 1 << (8 * width)
    return code + size.to_bytes(width, "little", signed=False) + payload


@st.composite
def _piece(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 3)) == 0:  # a slice of a real checkpoint's pickle
        pickled, _ = _zip_parts()
        start = draw(st.integers(0, len(pickled) - 1))
        return pickled[start : start + draw(st.integers(1, 80))]
    return draw(_opcode())


@SETTINGS
@given(pieces=st.lists(_piece(), min_size=1, max_size=60), protocol=st.sampled_from([b"\x80\x02", b"\x80\x04", b""]))
def test_random_opcode_streams_in_a_valid_zip(directory: Path, pieces: list[bytes], protocol: bytes) -> None:
    _check(directory, _zip_around(protocol + b"".join(pieces) + b"."))
