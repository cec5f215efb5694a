"""Language models that tie their LM head to their input embeddings (tie_word_embeddings): tied ones
merge with tied ones and load back tied; a tied and an untied one fail in the plan, naming both.
Tiny Llama models built here, results against plain torch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import save_file

from merger.archs import embeddings
from tests.conftest import RunRecipe, expect_error, load
from tests.test_vocab import EMBED, HEAD, cache_objects, llama, no_tensor_reads


@pytest.fixture
def lms(launch_dir: Path) -> dict[str, Path]:
    """tied, tied2 (a fine-tune of it, also tied), untied (a fine-tune that has its own lm_head)."""
    tied = llama(launch_dir / "tied", 0, tied=True)
    return {
        "tied": tied,
        "tied2": llama(launch_dir / "tied2", 1, parent=tied, tied=True),
        "untied": llama(launch_dir / "untied", 2, parent=tied),
    }


def lerp(lms: dict[str, Path], inputs: list[str], **node: Any) -> dict[str, Any]:
    return {
        "sources": {name: str(path) for name, path in lms.items()},
        "nodes": {"blend": {"op": "lerp", "inputs": inputs, "alpha": 0.25, **node}},
        "outputs": {"blend": {}},
    }


def test_tied_models_merge_and_load_back_tied(lms: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    run_recipe(lerp(lms, ["tied", "tied2"]))
    a, b = load(lms["tied"] / "model.safetensors"), load(lms["tied2"] / "model.safetensors")
    assert HEAD not in a
    out = load(launch_dir / "out" / "blend.safetensors")
    assert sorted(out) == sorted(a)  # no lm_head.weight
    for key, value in a.items():
        torch.testing.assert_close(out[key], torch.lerp(value, b[key], 0.25))

    folder = launch_dir / "loaded"
    folder.mkdir()
    shutil.copy(launch_dir / "out" / "blend.safetensors", folder / "model.safetensors")
    shutil.copy(lms["tied"] / "config.json", folder / "config.json")
    model = LlamaForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    torch.testing.assert_close(model.lm_head.weight.detach(), out[EMBED])


@pytest.mark.parametrize("order", [["tied", "untied"], ["untied", "tied"]])
def test_tied_and_untied_fail_in_the_plan_naming_both(
    lms: dict[str, Path],
    run_recipe: RunRecipe,
    launch_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    order: list[str],
) -> None:
    no_tensor_reads(monkeypatch)
    error = expect_error(lambda: run_recipe(lerp(lms, order)))
    assert error.where is not None and "nodes.blend" in error.where
    assert "'tied' ties its LM head to its input embeddings" in error.what
    assert "tie_word_embeddings: true in its config.json" in error.what
    assert "'untied' is untied: it has its own 'lm_head.weight' F32[100, 32]" in error.what
    assert error.fix is not None
    assert "untie 'tied'" in error.fix and "tie_word_embeddings = False" in error.fix
    assert "merge models that tie alike" in error.fix
    assert cache_objects(launch_dir) == []


def test_tied_and_untied_fail_with_keys_intersection_too(lms: dict[str, Path], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: run_recipe(lerp(lms, ["untied", "tied"], keys="intersection")))
    assert "'tied' ties its LM head" in error.what


def test_without_config_json_the_keys_tell(lms: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path) -> None:
    """A bare safetensors file with an input embedding and no lm_head.weight is taken as tied."""
    shutil.copy(lms["tied"] / "model.safetensors", launch_dir / "bare.safetensors")
    recipe = lerp(lms, ["untied", "bare"])
    recipe["sources"]["bare"] = "bare.safetensors"
    error = expect_error(lambda: run_recipe(recipe))
    assert "'bare' ties its LM head" in error.what
    assert f"it has no config.json, and '{EMBED}' but no '{HEAD}'" in error.what
    assert "'untied' is untied" in error.what


def test_the_fix_untying_the_tied_model_lets_it_merge(
    lms: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    """What the error's fix says to do, done: the untied copy has the embedding as its lm_head."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(lms["tied"])
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())  # its own head
    model.config.tie_word_embeddings = False
    model.save_pretrained(launch_dir / "untied_copy", safe_serialization=True)
    lms = {**lms, "untied_copy": launch_dir / "untied_copy"}

    run_recipe(lerp(lms, ["untied_copy", "untied"]))
    tied, untied = load(lms["tied"] / "model.safetensors"), load(lms["untied"] / "model.safetensors")
    out = load(launch_dir / "out" / "blend.safetensors")
    torch.testing.assert_close(out[HEAD], torch.lerp(tied[EMBED], untied[HEAD], 0.25))


def test_tied_models_with_other_vocabularies_merge_with_vocab_first(launch_dir: Path, run_recipe: RunRecipe) -> None:
    tied = llama(launch_dir / "tied", 0, tied=True)
    big = llama(launch_dir / "big", 1, vocab=103, parent=tied, tied=True)
    report = run_recipe(lerp({"tied": tied, "big": big}, ["big", "tied"], vocab="first"))
    a, b = load(big / "model.safetensors"), load(tied / "model.safetensors")
    out = load(launch_dir / "out" / "blend.safetensors")
    assert HEAD not in out
    torch.testing.assert_close(out[EMBED][:100], torch.lerp(a[EMBED][:100], b[EMBED], 0.25))
    assert torch.equal(out[EMBED][100:], a[EMBED][100:])
    assert report["nodes"]["blend"]["notes"]["vocab"] == {EMBED: {"rows": 103, "merged": 100, "taken_whole": 3}}


def test_untied_models_without_config_merge_as_before(launch_dir: Path, run_recipe: RunRecipe) -> None:
    """Not language models at all: no embedding keys, nothing to check."""
    save_file({"w": torch.ones(2, 2)}, launch_dir / "a.safetensors")
    save_file({"w": torch.zeros(2, 2)}, launch_dir / "b.safetensors")
    recipe = {
        "sources": {"a": "a.safetensors", "b": "b.safetensors"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"blend": {}},
    }
    run_recipe(recipe)
    torch.testing.assert_close(load(launch_dir / "out" / "blend.safetensors")["w"], torch.full((2, 2), 0.5))


_KEY_PARTS = st.sampled_from(["lm_head", "weight", "embed_tokens", "model", "wte", "output", "shared", "\n", ".", "x"])


@given(st.lists(st.lists(_KEY_PARTS, max_size=6).map("".join), max_size=30))
@example(["a.lm_head.weight", "b.embed_tokens.weight", "output.weight", "shared.weight"])
@example(["x\n.lm_head.weight", ".lm_head.weight\ny", "lm_head.weightx", "model.wte.weight\n"])
def test_the_joined_key_search_finds_what_a_key_by_key_test_finds(keys: list[str]) -> None:
    """lm_heads / input_embeddings (a search over the joined keys first) against the per-key tests,
    keys with newlines and dots in odd places included."""
    assert embeddings.lm_heads(keys) == [k for k in keys if embeddings.is_lm_head(k)]
    assert embeddings.input_embeddings(keys) == [k for k in keys if embeddings.is_input_embedding(k)]
