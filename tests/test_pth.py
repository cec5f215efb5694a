"""merger.io.pth: safe loading of PyTorch checkpoints, unwrapping, prefix stripping, refusals."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import pytest
import torch

from merger.io.pth import load_state_dict
from tests.conftest import expect_error, fine_tune, tiny_state_dict


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype
        assert torch.equal(got[key], tensor), key


def _save(path: Path, obj: object, **kwargs: object) -> Path:
    torch.save(obj, path, **kwargs)
    return path


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
    _assert_same(load_state_dict(_save(tmp_path / "m.pth", sd), None), sd)


def test_params_ema_preferred_over_params(tmp_path: Path) -> None:
    ema, params = tiny_state_dict(0), tiny_state_dict(1)
    path = _save(tmp_path / "m.pth", {"params": params, "params_ema": ema, "iter": 5})
    _assert_same(load_state_dict(path, None), ema)


def test_params_used_when_no_ema(tmp_path: Path) -> None:
    params = tiny_state_dict(1)
    path = _save(tmp_path / "m.pth", {"params": params, "optimizer": {"lr": 1e-4}})
    _assert_same(load_state_dict(path, None), params)


def test_state_dict_wrapper(tmp_path: Path) -> None:
    sd = tiny_state_dict(2)
    path = _save(tmp_path / "m.ckpt", {"state_dict": sd, "epoch": 3, "global_step": 100})
    _assert_same(load_state_dict(path, None), sd)


def test_model_wrapper(tmp_path: Path) -> None:
    sd = tiny_state_dict(3)
    path = _save(tmp_path / "m.pt", {"model": sd, "args": "x"})
    _assert_same(load_state_dict(path, None), sd)


def test_nested_wrappers(tmp_path: Path) -> None:
    sd = tiny_state_dict(4)
    path = _save(tmp_path / "m.pth", {"state_dict": {"model": {"params_ema": sd}}, "meta": 1})
    _assert_same(load_state_dict(path, None), sd)


def test_wrapper_that_is_not_a_dict_is_not_followed(tmp_path: Path) -> None:
    sd = tiny_state_dict(5)
    # 'model' is a string here (a name), so the tensors at this level are the weights
    path = _save(tmp_path / "m.pth", {**sd, "model": "RRDBNet"})
    _assert_same(load_state_dict(path, None), sd)


def test_module_prefix_stripped_when_every_key_has_it(tmp_path: Path) -> None:
    sd = tiny_state_dict(6)
    path = _save(tmp_path / "m.pth", {f"module.{k}": v for k, v in sd.items()})
    _assert_same(load_state_dict(path, None), sd)


def test_module_prefix_kept_when_not_every_key_has_it(tmp_path: Path) -> None:
    sd = {"module.a": torch.ones(2), "b": torch.zeros(2)}
    got = load_state_dict(_save(tmp_path / "m.pth", sd), None)
    assert sorted(got) == ["b", "module.a"]


def test_module_prefix_stripped_only_once(tmp_path: Path) -> None:
    sd = {"module.module.a": torch.ones(2), "module.b": torch.zeros(2)}
    got = load_state_dict(_save(tmp_path / "m.pth", sd), None)
    assert sorted(got) == ["b", "module.a"]


def test_non_tensor_entries_dropped(tmp_path: Path) -> None:
    sd = tiny_state_dict(7)
    path = _save(tmp_path / "m.pth", {**sd, "iter": 1000, "name": "x", "extra": [1, 2], "opt": {"lr": 0.1}})
    _assert_same(load_state_dict(path, None), sd)


def test_explicit_key_path(tmp_path: Path) -> None:
    gen, disc = tiny_state_dict(8), tiny_state_dict(9)
    path = _save(tmp_path / "m.pth", {"params_ema": disc, "nets": {"generator": gen, "discriminator": disc}})
    _assert_same(load_state_dict(path, "nets.generator"), gen)
    # an explicit key overrides the params_ema preference
    _assert_same(load_state_dict(path, "nets.discriminator"), disc)


def test_explicit_key_wrong_lists_available_keys(tmp_path: Path) -> None:
    gen = tiny_state_dict(8)
    path = _save(tmp_path / "m.pth", {"nets": {"generator": gen, "discriminator": gen}, "iter": 3})
    error = expect_error(lambda: load_state_dict(path, "nets.generatr"))
    assert "'generatr'" in error.what
    assert "nets.generatr" in error.what
    assert error.fix is not None
    assert "generator" in error.fix
    assert "discriminator" in error.fix
    assert "key:" in error.fix


def test_explicit_key_wrong_at_top_level_lists_top_keys(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {"params_ema": tiny_state_dict(0), "iter": 3})
    error = expect_error(lambda: load_state_dict(path, "params_emma"))
    assert "params_emma" in error.what
    assert error.fix is not None
    assert "params_ema" in error.fix
    assert "iter" in error.fix


def test_explicit_key_through_a_non_dict(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {"iter": 3, "w": torch.ones(1)})
    error = expect_error(lambda: load_state_dict(path, "iter.x"))
    assert "'x'" in error.what
    assert error.fix is not None
    assert "int" in error.fix


def test_no_tensors_error_mentions_key(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.pth", {"generator": {"w": torch.ones(2)}, "epoch": 3})
    error = expect_error(lambda: load_state_dict(path, None))
    assert "no tensors" in error.what
    assert "generator" in error.what
    assert error.fix is not None
    assert "key:" in error.fix


def test_empty_dict_errors(tmp_path: Path) -> None:
    error = expect_error(lambda: load_state_dict(_save(tmp_path / "m.pth", {}), None))
    assert "no tensors" in error.what


def test_top_level_tensor_is_not_a_state_dict(tmp_path: Path) -> None:
    error = expect_error(lambda: load_state_dict(_save(tmp_path / "m.pth", torch.ones(3)), None))
    assert "Tensor" in error.what
    assert "not a state dict" in error.what


def test_top_level_list_is_not_a_state_dict(tmp_path: Path) -> None:
    error = expect_error(lambda: load_state_dict(_save(tmp_path / "m.pth", [torch.ones(3)]), None))
    assert "list" in error.what


# --- formats ----------------------------------------------------------------------------------------


def test_legacy_non_zip_format_loads(tmp_path: Path) -> None:
    sd = fine_tune(tiny_state_dict(0), 1)
    path = _save(tmp_path / "legacy.pth", {"params_ema": sd}, _use_new_zipfile_serialization=False)
    import zipfile

    assert not zipfile.is_zipfile(path)
    _assert_same(load_state_dict(path, None), sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dtypes_kept(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = tiny_state_dict(1, dtype=dtype)
    _assert_same(load_state_dict(_save(tmp_path / "m.pth", sd), None), sd)


# --- refusals ---------------------------------------------------------------------------------------


def test_malicious_pickle_os_system_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned_system"
    path = _save(tmp_path / "evil.pth", {"w": torch.ones(2), "payload": _SystemOnLoad(marker)})
    assert not marker.exists()
    error = expect_error(lambda: load_state_dict(path, None))
    assert not marker.exists(), "the pickled code ran"
    assert "refused" in error.what
    assert "system" in error.what  # the offending global (posix.system / os.system)
    assert error.fix is not None
    assert "state_dict()" in error.fix


def test_malicious_pickle_path_touch_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned_touch"
    path = _save(tmp_path / "evil.pth", {"params_ema": {"w": torch.ones(2)}, "payload": _TouchOnLoad(marker)})
    error = expect_error(lambda: load_state_dict(path, None))
    assert not marker.exists(), "the pickled code ran"
    assert "refused" in error.what
    # Path.touch pickles as getattr(PosixPath, 'touch'): the first global the loader rejects
    assert "getattr" in error.what or "touch" in error.what or "Path" in error.what


def test_malicious_pickle_refused_also_with_explicit_key(tmp_path: Path) -> None:
    marker = tmp_path / "pwned_key"
    path = _save(tmp_path / "evil.pth", {"good": {"w": torch.ones(2)}, "payload": _SystemOnLoad(marker)})
    error = expect_error(lambda: load_state_dict(path, "good"))
    assert not marker.exists()
    assert "refused" in error.what


def test_malicious_legacy_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned_legacy"
    path = _save(
        tmp_path / "evil_legacy.pth",
        {"w": torch.ones(2), "payload": _SystemOnLoad(marker)},
        _use_new_zipfile_serialization=False,
    )
    error = expect_error(lambda: load_state_dict(path, None))
    assert not marker.exists()
    assert "refused" in error.what
    assert "system" in error.what


def test_pickled_module_refused(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    path = _save(tmp_path / "model.pth", model)
    error = expect_error(lambda: load_state_dict(path, None))
    assert "refused" in error.what
    assert "torch.nn.modules" in error.what
    assert error.fix is not None
    assert "state_dict" in error.fix


@pytest.mark.parametrize(
    "text",
    ["hello this is not a checkpoint\n", "these are not weights\njust some text\n", "<html>404</html>"],
)
def test_text_file_named_pth(tmp_path: Path, text: str) -> None:
    path = tmp_path / "notes.pth"
    path.write_text(text)
    error = expect_error(lambda: load_state_dict(path, None))
    assert str(path) in error.what
    assert "refused" not in error.what  # not a security refusal: just not a checkpoint
    assert "checkpoint" in error.what


def test_empty_file_named_pth(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    error = expect_error(lambda: load_state_dict(path, None))
    assert str(path) in error.what
    assert "checkpoint" in error.what


def test_truncated_zip_checkpoint(tmp_path: Path) -> None:
    path = _save(tmp_path / "cut.pth", tiny_state_dict(0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    error = expect_error(lambda: load_state_dict(path, None))
    assert str(path) in error.what
    assert "refused" not in error.what


def test_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "archive.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    error = expect_error(lambda: load_state_dict(path, None))
    assert "cannot read" in error.what
    assert str(path) in error.what
    assert "refused" not in error.what


def test_numpy_file_named_pth_is_not_called_unsafe(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "array.pth"
    with open(path, "wb") as f:
        np.save(f, np.ones(3))
    error = expect_error(lambda: load_state_dict(path, None))
    assert str(path) in error.what
    # a .npy holds no pickled globals at all: calling it a code-execution risk misleads the user
    assert "could run code" not in error.what
