"""Folder outputs: Hugging Face model folders that transformers loads as written (weights, shards,
config, tokenizer, model card), whole or not at all, cached; `.pth` outputs wrapped for BasicSR."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import RunRecipe, expect_error, run_cli, tiny_state_dict

transformers = pytest.importorskip("transformers")
Llama = dict[str, Path]


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(100)} | {"<unk>": 100}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")


def llama_config(**extra: Any) -> Any:
    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        **extra,
    )


def save_llama(folder: Path, seed: int, parent: dict[str, torch.Tensor] | None, **config: Any) -> None:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(**config))
    if parent is not None:
        model.load_state_dict(parent, strict=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer().save_pretrained(folder)


@pytest.fixture
def llamas(launch_dir: Path) -> Llama:
    """Two fine-tunes (a, b) of one tiny Llama, as Hugging Face folders with a tokenizer."""
    torch.manual_seed(0)
    parent = transformers.LlamaForCausalLM(llama_config()).state_dict()
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        paths[name] = launch_dir / name
        save_llama(paths[name], seed, parent)
    return paths


def lerp_recipe(**output: Any) -> dict[str, Any]:
    return {
        "sources": {"a": "a", "b": "b"},
        "nodes": {"m": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.25}},
        "outputs": {"merged": {"node": "m", "path": "merged", **output}},
    }


def expected_lerp(llamas: Llama, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    a, b = load_file(llamas["a"] / "model.safetensors"), load_file(llamas["b"] / "model.safetensors")
    return {k: torch.lerp(a[k].float(), b[k].float(), 0.25).to(dtype) for k in a}


def loaded(folder: Path) -> tuple[Any, Any]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_a_sharded_folder_loads_in_transformers_as_written(llamas: Llama, run_recipe: RunRecipe) -> None:
    report = run_recipe(lerp_recipe(dtype="bfloat16", shard_size="20KB"))
    folder = Path(report["outputs"]["merged"]["path"])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    want = expected_lerp(llamas, torch.bfloat16)
    assert set(index["weight_map"]) == set(want) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    for shard in shards:
        assert os.path.getsize(folder / shard) < 20_000 + 8_000  # the cut, plus the header
        with safe_open(folder / shard, "pt") as f:
            assert len(f.metadata()["merger.key"]) == 64 and "merger.recipe" in f.metadata()
    model, tok = loaded(folder)
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    for key, value in want.items():  # within one bfloat16 rounding of torch's float32 lerp
        torch.testing.assert_close(state[key].float(), value.float(), rtol=2**-8, atol=1e-8)
    assert tok("w1 w7")["input_ids"] == [1, 7]
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]
    assert report["outputs"]["merged"]["files"]["config.json"]


def test_one_file_when_it_fits_and_the_dtype_asked_for_is_written(llamas: Llama, run_recipe: RunRecipe) -> None:
    report = run_recipe(lerp_recipe(dtype="float16"))
    folder = Path(report["outputs"]["merged"]["path"])
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        ".merger-folder.json",
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.float16}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    model, _ = loaded(folder)
    assert model.dtype == torch.float16


def test_the_model_card(llamas: Llama, run_recipe: RunRecipe) -> None:
    report = run_recipe(lerp_recipe())
    card = (Path(report["outputs"]["merged"]["path"]) / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {"base_model": ["a", "b"], "library_name": "transformers", "tags": ["merge", "merger"]}
    assert "linear interpolation" in body and "arXiv:1811.10515" in body
    assert "alpha: 0.25" in body  # the resolved recipe
    for name in ("a", "b"):
        assert report["sources"][name]["key"] in body  # each source's content hash
    assert "merger recipe=test" in body


def test_a_rerun_links_the_shards_from_the_cache(llamas: Llama, run_recipe: RunRecipe, launch_dir: Path) -> None:
    first = run_recipe(lerp_recipe(shard_size="30KB"), output_dir=launch_dir / "one")
    second = run_recipe(lerp_recipe(shard_size="30KB"), output_dir=launch_dir / "two")
    assert second["nodes"]["m"]["status"] == "cached" and second["outputs"]["merged"]["placed"] == "linked"
    assert first["outputs"]["merged"]["sha256"] == second["outputs"]["merged"]["sha256"]
    shards = sorted(p.name for p in (launch_dir / "one" / "merged").glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        a, b = (launch_dir / d / "merged" / shard for d in ("one", "two"))
        assert os.stat(a).st_ino == os.stat(b).st_ino  # both are the cache's entry


def test_a_rerun_replaces_a_folder_merger_wrote(llamas: Llama, run_recipe: RunRecipe, launch_dir: Path) -> None:
    data = lerp_recipe(path=str(launch_dir / "fixed"))
    run_recipe(data)
    data["nodes"]["m"]["alpha"] = 0.75
    run_recipe(data)
    a, b = load_file(llamas["a"] / "model.safetensors"), load_file(llamas["b"] / "model.safetensors")
    got = load_file(launch_dir / "fixed" / "model.safetensors")
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(got[key], torch.lerp(a[key], b[key], 0.75))
    assert not [p for p in launch_dir.iterdir() if ".tmp" in p.name or "~" in p.name]


def test_a_folder_merger_did_not_write_is_refused(llamas: Llama, run_recipe: RunRecipe, launch_dir: Path) -> None:
    theirs = launch_dir / "mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("the user's")
    error = expect_error(lambda: run_recipe(lerp_recipe(path=str(theirs))))
    assert "would replace the folder" in error.what and "no merger manifest" in error.what
    assert "outputs.merged.path" in (error.where or "")
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


def test_a_failure_leaves_no_folder(
    llamas: Llama, run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import merger.engine.folder_output as folder_output

    def broken(*args: object, **kwargs: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder_output, "model_card", broken)
    with pytest.raises((OSError, Exception)):
        run_recipe(lerp_recipe())
    assert not (launch_dir / "out" / "merged").exists()
    assert not [p.name for p in (launch_dir / "out").iterdir() if p.name.startswith("merged")]


def test_config_from_names_the_folder_the_config_comes_from(llamas: Llama, run_recipe: RunRecipe) -> None:
    config = json.loads((llamas["b"] / "config.json").read_text())
    config["bos_token_id"] = 7  # something only b says
    (llamas["b"] / "config.json").write_text(json.dumps(config))
    report = run_recipe(lerp_recipe(config_from="b"))
    folder = Path(report["outputs"]["merged"]["path"])
    assert json.loads((folder / "config.json").read_text())["bos_token_id"] == 7
    default = run_recipe(lerp_recipe(path="default"))
    assert json.loads((Path(default["outputs"]["merged"]["path"]) / "config.json").read_text())["bos_token_id"] != 7


@pytest.mark.parametrize(
    ("output", "phrase", "place"),
    [
        ({"shard_size": 0}, "more than 0 bytes", "shard_size"),
        ({"shard_size": -5}, "cannot be negative", "shard_size"),
        ({"shard_size": "lots"}, "is not a size", "shard_size"),
        ({"config_from": "nope"}, "is not a source of the recipe", "config_from"),
        ({"config_from": "file"}, "is not a model node 'm' merges", "config_from"),
        ({"path": "m.safetensors", "shard_size": "1GB"}, "applies only to a model folder", "shard_size"),
        ({"path": "m.safetensors", "wrap": "params_ema"}, "applies only to a .pth output", "wrap"),
    ],
)
def test_bad_folder_settings_fail_before_the_run(
    llamas: Llama, run_recipe: RunRecipe, launch_dir: Path, output: dict[str, Any], phrase: str, place: str
) -> None:
    save_file(load_file(llamas["a"] / "model.safetensors"), launch_dir / "file.safetensors")
    data = lerp_recipe(**output)
    data["sources"]["file"] = "file.safetensors"
    data["nodes"]["other"] = {"op": "lerp", "inputs": ["file", "b"], "alpha": 0.5}
    data["outputs"]["other"] = {"node": "other", "path": "other.safetensors"}
    error = expect_error(lambda: run_recipe(data))
    assert phrase in error.what and f"outputs.merged.{place}" in (error.where or ""), error
    assert not (launch_dir / "cache" / "objects").exists()


def test_a_config_from_folder_without_config_json_is_refused(llamas: Llama, run_recipe: RunRecipe) -> None:
    (llamas["b"] / "config.json").unlink()
    error = expect_error(lambda: run_recipe(lerp_recipe(config_from="b")))
    assert "has no config.json" in error.what


def test_a_model_without_config_is_still_a_folder(
    launch_dir: Path, run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    (launch_dir / "m").mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        save_file(tiny_state_dict(seed), launch_dir / "m" / f"{name}.safetensors")
    data = {
        "sources": {"a": "m/a.safetensors", "b": "m/b.safetensors"},
        "nodes": {"m": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"merged": {"node": "m", "path": "merged", "shard_size": "1KB"}},
    }
    with caplog.at_level("WARNING"):
        report = run_recipe(data)
    folder = Path(report["outputs"]["merged"]["path"])
    assert (folder / "model.safetensors.index.json").is_file() and (folder / "README.md").is_file()
    assert not (folder / "config.json").exists()
    said = [w for w in report["warnings"] if "node 'm': no source it reads is a model folder with a config.json" in w]
    assert len(said) == 1
    assert "library_name" not in (folder / "README.md").read_text().split("---")[1]


def test_a_linked_file_outside_the_source_folder_is_not_copied(
    llamas: Llama, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    secret = launch_dir / "secret.txt"
    secret.write_text("private key")
    (llamas["a"] / "notes.txt").symlink_to(secret)
    (llamas["a"] / "vocab.txt").write_text("kept")
    report = run_recipe(lerp_recipe())
    folder = Path(report["outputs"]["merged"]["path"])
    assert not (folder / "notes.txt").exists() and (folder / "vocab.txt").read_text() == "kept"


def test_a_folder_from_the_command_line(llamas: Llama, launch_dir: Path) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "m.yaml").write_text(
        "# @package _global_\nsources: {a: a, b: b}\n"
        "nodes:\n  m: {op: slerp, inputs: [a, b], t: 0.5}\n"
        "outputs:\n  merged: {node: m, path: merged, dtype: bfloat16, shard_size: 20KB}\n"
    )
    done = run_cli(["recipe=m", "progress=false"], launch_dir)
    assert done.returncode == 0, done.stderr
    (folder,) = launch_dir.glob("outputs/*/*/merged")
    model, _ = loaded(folder)
    assert model.dtype == torch.bfloat16
    assert "merger recipe=m" in (folder / "README.md").read_text()


def test_wrap_writes_the_state_dict_inside_params_ema(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    data = {
        "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
        "nodes": {"m": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {
            "wrapped": {"node": "m", "path": "w.pth", "wrap": "params_ema"},
            "bare": {"node": "m", "path": "b.pth"},
        },
    }
    report = run_recipe(data)
    wrapped = torch.load(report["outputs"]["wrapped"]["path"], weights_only=True)
    bare = torch.load(report["outputs"]["bare"]["path"], weights_only=True)
    assert list(wrapped) == ["params_ema"] and wrapped["params_ema"].keys() == bare.keys()
    for key, value in bare.items():
        assert torch.equal(wrapped["params_ema"][key], value)
    assert report["outputs"]["wrapped"]["sha256"] != report["outputs"]["bare"]["sha256"]


# --- what an attacker (or an unlucky user) tries -----------------------------------------------------


def test_only_config_and_tokenizer_files_are_copied_and_the_rest_is_named(
    llamas: Llama, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    secret = launch_dir / "secret.json"
    secret.write_text('{"token": "private"}')
    (llamas["a"] / "usercustomize.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    (llamas["a"] / "special_tokens_map.json").symlink_to(secret)
    (llamas["a"] / "checkpoint-500").mkdir()
    (llamas["a"] / "chat_template.jinja").write_text("{{ messages }}")
    report = run_recipe(lerp_recipe())
    folder = Path(report["outputs"]["merged"]["path"])
    assert (folder / "chat_template.jinja").is_file() and not (folder / "usercustomize.py").exists()
    assert not (folder / "special_tokens_map.json").exists()
    left = report["outputs"]["merged"]["left_out"]
    assert left == {
        "checkpoint-500": "a folder",
        "special_tokens_map.json": "a link to a file outside the folder",
        "usercustomize.py": "not a config or tokenizer file",
    }
    assert any("left out of the folder" in w and "usercustomize.py" in w for w in report["warnings"])


def test_a_folder_output_where_python_looks_at_start_up_is_refused(
    llamas: Llama, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    site = launch_dir / "home" / ".local" / "lib" / "python3.11" / "site-packages"
    error = expect_error(lambda: run_recipe(lerp_recipe(path=str(site))))
    assert "a folder Python reads at start-up" in error.what and not site.exists()


def test_an_output_inside_a_folder_output_is_refused(llamas: Llama, run_recipe: RunRecipe, launch_dir: Path) -> None:
    data = lerp_recipe()
    data["outputs"]["inner"] = {"node": "m", "path": "merged/model.safetensors"}
    error = expect_error(lambda: run_recipe(data))
    assert "inside output 'merged'" in error.what
    assert not (launch_dir / "cache" / "objects").exists()


def test_files_added_to_a_merger_folder_are_never_lost(llamas: Llama, run_recipe: RunRecipe, launch_dir: Path) -> None:
    data = lerp_recipe(path=str(launch_dir / "kept"))
    run_recipe(data)
    (launch_dir / "kept" / "NOTES.txt").write_text("mine")
    error = expect_error(lambda: run_recipe(data))
    assert "holds files merger did not write (NOTES.txt)" in error.what
    (launch_dir / "kept" / "NOTES.txt").unlink()
    config = launch_dir / "kept" / "config.json"
    config.write_text(config.read_text().replace('"bfloat16"', '"float32"').replace("  ", " "))
    error = expect_error(lambda: run_recipe(data))
    assert "changed since merger wrote them (config.json)" in error.what
    run_recipe(
        {**data, "allow_overwrite": True, "outputs": {"merged": {**data["outputs"]["merged"], "overwrite": True}}}
    )


def test_a_symlink_at_a_folder_output_path_is_refused_before_the_run(
    llamas: Llama, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    (launch_dir / "real").mkdir()
    (launch_dir / "link").symlink_to(launch_dir / "real")
    error = expect_error(lambda: run_recipe(lerp_recipe(path=str(launch_dir / "link"))))
    assert "is a symbolic link" in error.what and not (launch_dir / "cache" / "objects").exists()


def test_what_a_killed_run_left_beside_the_folder_is_removed(
    llamas: Llama, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    from merger.cache.atomic import TMP_MARK

    left = launch_dir / "out" / f"merged{TMP_MARK}{os.uname().nodename.replace('.', '_').replace('-', '_')}-999999-ab"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half")
    run_recipe(lerp_recipe())
    assert not left.exists()


def test_a_config_that_does_not_fit_the_weights_is_refused(
    llamas: Llama, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    config = json.loads((llamas["b"] / "config.json").read_text())
    (llamas["b"] / "config.json").write_text(json.dumps({**config, "vocab_size": 103}))
    error = expect_error(lambda: run_recipe(lerp_recipe(config_from="b")))
    assert "says vocab_size 103, but output 'merged' has 101 token rows" in error.what
    (llamas["b"] / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    error = expect_error(lambda: run_recipe(lerp_recipe(config_from="b")))
    assert "ties the LM head to the embedding, but output 'merged' has an lm_head.weight" in error.what


def test_weights_say_they_are_torch_safetensors(llamas: Llama, run_recipe: RunRecipe) -> None:
    report = run_recipe(lerp_recipe(shard_size="30KB"))
    for shard in Path(report["outputs"]["merged"]["path"]).glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            assert f.metadata()["format"] == "pt"  # transformers 4 refuses metadata without it


def test_a_swept_folder_name_with_a_number_is_a_folder(llamas: Llama, run_recipe: RunRecipe) -> None:
    report = run_recipe(lerp_recipe(path="merged_0.5"))
    assert (Path(report["outputs"]["merged"]["path"]) / "model.safetensors").is_file()
