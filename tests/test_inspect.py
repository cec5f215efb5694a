"""`merger-inspect` (`merger.cli.inspect.main`): what a user sees about model files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.cli.inspect import main
from tests.conftest import RunRecipe, run_cli, tiny_state_dict

Models = dict[str, Path]

#: tiny_state_dict(width=8): 8*3*3*3 + 8 + 8*8*3*3 + 8 + 8 + 1 + 3*8*3*3 + 3
PARAMS_W8 = 1036
PARAMS_W4 = 4 * 27 + 4 + 4 * 4 * 9 + 4 + 4 + 1 + 3 * 4 * 9 + 3


def inspect(capsys: pytest.CaptureFixture[str], *args: Any) -> str:
    main([str(a) for a in args])
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def inspect_fails(capsys: pytest.CaptureFixture[str], *args: Any) -> str:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return captured.err


def lerp_output(run_recipe: RunRecipe, path: str = "blend.safetensors", dtype: str = "keep") -> dict[str, Any]:
    return run_recipe(
        {
            "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.3}},
            "outputs": {"blend": {"path": path, "dtype": dtype}},
        }
    )


# --- one file -------------------------------------------------------------------------------------


def test_safetensors_shapes_dtypes_and_parameter_count(models: Models, capsys: pytest.CaptureFixture[str]) -> None:
    out = inspect(capsys, models["a"])
    lines = out.splitlines()
    assert lines[0] == str(models["a"])
    assert lines[1].startswith(f"  8 tensors, {PARAMS_W8:,} parameters, ")
    assert "dtypes: F32 x7, I64 x1" in lines[1]
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in lines[2:]}
    assert rows["conv_first.weight"] == ["F32", "[8, 3, 3, 3]"]
    assert rows["body.0.weight"] == ["F32", "[8, 8, 3, 3]"]
    assert rows["conv_last.bias"] == ["F32", "[3]"]
    assert rows["bn.num_batches_tracked"] == ["I64", "[]"]
    assert len(rows) == 8
    assert "made by merger" not in out
    assert "compatible" not in out


def test_pth_is_unwrapped_and_described(models: Models, capsys: pytest.CaptureFixture[str]) -> None:
    out = inspect(capsys, models["b_pth"])
    lines = out.splitlines()
    assert lines[0] == str(models["b_pth"])
    assert lines[1].startswith(f"  8 tensors, {PARAMS_W8:,} parameters, ")
    assert "dtypes: F32 x7, I64 x1" in lines[1]
    assert any(line.split() == ["conv_first.weight", "F32", "[8,", "3,", "3,", "3]"] for line in lines)
    assert "params_ema" not in out  # the wrapper is gone: only the state dict's keys are listed
    assert "iter" not in out


def test_keys_option_limits_the_listing(models: Models, capsys: pytest.CaptureFixture[str]) -> None:
    out = inspect(capsys, models["a"], "--keys", "2")
    lines = out.splitlines()
    assert len(lines) == 5
    assert lines[-1].strip() == "... 6 more (--keys -1 lists all)"
    everything = inspect(capsys, models["a"], "--keys", "-1")
    assert len(everything.splitlines()) == 10


def test_half_precision_model(launch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = launch_dir / "half.safetensors"
    save_file(tiny_state_dict(5, width=4, dtype=torch.float16), path)
    out = inspect(capsys, path)
    assert f"8 tensors, {PARAMS_W4:,} parameters" in out
    assert "dtypes: F16 x7, I64 x1" in out


# --- provenance -----------------------------------------------------------------------------------


def test_merger_output_shows_its_provenance_and_run(
    models: Models, run_recipe: RunRecipe, capsys: pytest.CaptureFixture[str]
) -> None:
    report = lerp_output(run_recipe)
    path = Path(report["outputs"]["blend"]["path"])
    out = inspect(capsys, path)
    key = report["nodes"]["blend"]["key"]
    assert f"  made by merger 0.1.0, key {key}" in out.splitlines()
    for name in ("a", "b"):
        source_hash = report["sources"][name]["key"]
        assert f"    source {name}: {source_hash[:16]}  {models[name].resolve()}" in out.splitlines()
    assert "    recipe:" in out
    assert "        op: lerp" in out
    assert "        alpha: 0.3" in out
    assert "  run: output 'blend' of recipe test; overrides (none)" in out.splitlines()
    assert "cast to" not in out


def test_cast_output_says_so(models: Models, run_recipe: RunRecipe, capsys: pytest.CaptureFixture[str]) -> None:
    report = lerp_output(run_recipe, path="half.safetensors", dtype="float16")
    out = inspect(capsys, report["outputs"]["blend"]["path"])
    assert "dtypes: F16 x7, I64 x1" in out
    assert f"key {report['nodes']['blend']['key']}" in out
    assert "    cast to float16" in out.splitlines()


def test_pth_output_provenance_comes_from_the_json_beside_it(
    models: Models, run_recipe: RunRecipe, capsys: pytest.CaptureFixture[str]
) -> None:
    report = lerp_output(run_recipe, path="blend.pth")
    path = Path(report["outputs"]["blend"]["path"])
    assert path.with_suffix(".json").is_file()
    out = inspect(capsys, path)
    assert f"  made by merger 0.1.0, key {report['nodes']['blend']['key']}" in out.splitlines()
    assert f"    source a: {report['sources']['a']['key'][:16]}" in out
    assert "  run: output 'blend' of recipe test; overrides (none)" in out.splitlines()


def test_output_moved_away_from_its_report_has_no_run_line(
    models: Models, run_recipe: RunRecipe, launch_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = lerp_output(run_recipe)
    moved = launch_dir / "elsewhere.safetensors"
    Path(report["outputs"]["blend"]["path"]).rename(moved)
    out = inspect(capsys, moved)
    assert "made by merger" in out  # the provenance travels inside the file
    assert "run:" not in out


# --- several files --------------------------------------------------------------------------------


def test_same_family_pair_is_compatible(models: Models, capsys: pytest.CaptureFixture[str]) -> None:
    out = inspect(capsys, models["a"], models["b_pth"])
    blocks = out.split("\n\n")
    assert len(blocks) == 4
    assert blocks[0].startswith(str(models["a"]))
    assert blocks[1].startswith(str(models["b_pth"]))
    assert blocks[2].strip() == "compatible: all 2 models have the same 8 keys and shapes"
    family = blocks[3].splitlines()
    assert family[0] == "family (cosine similarity to a.safetensors; below 0.5 reads as unrelated):"
    assert family[1].startswith("  b.pth vs a.safetensors: median cosine 0.99")
    assert family[1].endswith("over 3 weight tensors -> same family")


def test_incompatible_pair_lists_the_differences(
    models: Models, launch_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tiny_state_dict(4, width=4)
    del other["conv_last.bias"]
    other["extra.weight"] = torch.zeros(2, 2)
    path = launch_dir / "narrow.safetensors"
    save_file(other, path)

    out = inspect(capsys, models["a"], path)
    verdict = out.split("\n\n")[-2].splitlines()
    assert verdict[0] == "not compatible for a strict merge: 8 differences"
    assert (
        "  'conv_first.weight' is [8, 3, 3, 3] in 'a.safetensors' but [4, 3, 3, 3] in 'narrow.safetensors'" in verdict
    )
    assert "  'conv_last.bias' is in 'a.safetensors' F32[3] but not in 'narrow.safetensors'" in verdict
    assert "  'extra.weight' is in 'narrow.safetensors' F32[2, 2] but not in 'a.safetensors'" in verdict
    assert not any("bn.num_batches_tracked" in line for line in verdict)  # same shape: no difference
    assert "keys: intersection" in verdict[-1]


def test_many_differences_are_capped(models: Models, launch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = launch_dir / "unrelated.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(1) for i in range(12)}, path)
    out = inspect(capsys, models["a"], path)
    verdict = out.split("\n\n")[-2].splitlines()
    assert verdict[0] == "not compatible for a strict merge: 20 differences"
    assert "  ... and 10 more" in verdict
    assert len([line for line in verdict if line.startswith("  '")]) == 10


# --- errors ---------------------------------------------------------------------------------------


def test_missing_file_exits_2_with_a_message(launch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = inspect_fails(capsys, launch_dir / "nope.safetensors")
    assert err.startswith("merger: error: model file not found")
    assert "nope.safetensors" in err
    assert "fix:" in err


def test_missing_second_file_exits_2(models: Models, launch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = inspect_fails(capsys, models["a"], launch_dir / "gone.pth")
    assert "model file not found" in err
    assert "gone.pth" in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.txt", b"hello", "is not a model format merger reads"),
        ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", "is not a valid safetensors file"),
        ("tiny.safetensors", b"\x01\x02", "is not a valid safetensors file"),
    ],
)
def test_unreadable_files_exit_2(
    launch_dir: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    path = launch_dir / name
    path.write_bytes(content)
    err = inspect_fails(capsys, path)
    assert message in err
    assert name in err


def test_pickled_objects_are_refused(launch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = launch_dir / "unsafe.pth"
    torch.save({"w": torch.zeros(2), "cfg": argparse.Namespace(lr=1)}, path)
    err = inspect_fails(capsys, path)
    assert "refused to load" in err
    assert "argparse.Namespace" in err


def test_inspect_names_the_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    demo = Path(__file__).resolve().parents[1] / "merger" / "demo" / "sharp.safetensors"
    main([str(demo), "--keys", "0"])
    out = capsys.readouterr().out
    assert "  architecture: ESRGAN (RRDBNet), layout old, scale 2x, 2 blocks, 24 filters, in 3, out 3" in out


@pytest.mark.parametrize(
    ("sources", "reason"),
    [
        ('{"x": 5}', "source 'x' is malformed"),
        ("[" * 5000 + "]" * 5000, "nests 5000 levels deep"),
        ("[1, 2]", "its sources are not a mapping"),
        ('{"x": {"hash": 5}}', "source 'x' is malformed"),
        ("{not json", "merger.sources"),
    ],
)
def test_malformed_provenance_is_one_line_not_a_crash(tmp_path: Path, sources: str, reason: str) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"merger.key": "k\x1b[2J", "merger.sources": sources})
    done = run_cli([str(path)], tmp_path, command="merger-inspect")
    assert done.returncode == 0, done.stderr
    assert "provenance: unreadable (" in done.stdout and reason in done.stdout
    assert "\x1b" not in done.stdout


@pytest.mark.parametrize(
    "report", ['{"outputs": {"x": {"path": 5}}}', "[" * 50000, '{"outputs": {"m.pth": 3}, "recipe": 4}', "\xff"]
)
def test_malformed_reports_and_side_files_are_ignored(tmp_path: Path, report: str) -> None:
    path = tmp_path / "m.pth"
    torch.save({"w": torch.zeros(2)}, path)
    (tmp_path / "m.json").write_text('{"key": "k", "sources": 7}')
    (tmp_path / "merge_report.json").write_text(report)
    done = run_cli([str(path)], tmp_path, command="merger-inspect")
    assert done.returncode == 0, done.stderr
    assert "provenance: unreadable (its sources are not a mapping)" in done.stdout
