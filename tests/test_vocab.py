"""Language models whose vocabularies differ (added tokens): the plan's error, and `vocab: first`
(merger.ops.vocab), checked against plain torch on tiny Llama models built here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.cache.keys import node_key
from merger.cli.job import prepare
from merger.io.safetensors_file import SafetensorsReader
from merger.ops import builtin_registry
from merger.ops.linear import Lerp
from merger.ops.task_vectors import Ties
from merger.ops.vocab import vocab_first
from tests.conftest import BACKENDS, RunRecipe, expect_error, load, pipeline_outputs

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB_KEYS = (EMBED, HEAD)


def llama(folder: Path, seed: int, *, vocab: int = 100, parent: Path | None = None, tied: bool = False) -> Path:
    """A tiny Llama saved with save_pretrained; with `parent`, a fine-tune of it (small noise) whose
    vocabulary has `vocab` rows: the parent's rows, then new ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    if parent is not None:
        with torch.no_grad():
            for key, value in load(parent / "model.safetensors").items():
                target = model.get_parameter(key)
                rows = min(value.shape[0], target.shape[0])
                target[:rows] = value[:rows] if target.dim() == 2 and key in VOCAB_KEYS else value
                target.add_(0.01 * torch.randn_like(target))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def lms(launch_dir: Path) -> dict[str, Path]:
    """base (100 tokens); small: a fine-tune of it (100); big: a fine-tune with 3 added tokens (103)."""
    base = llama(launch_dir / "base", 0)
    return {
        "base": base,
        "small": llama(launch_dir / "small", 1, parent=base),
        "big": llama(launch_dir / "big", 2, vocab=103, parent=base),
    }


def sources(lms: dict[str, Path]) -> dict[str, str]:
    return {name: str(path) for name, path in lms.items()}


def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: SafetensorsReader, key: str, *args: Any) -> Any:
        raise AssertionError(f"the plan read tensor {key!r}")

    monkeypatch.setattr(SafetensorsReader, "read_into", refuse)
    monkeypatch.setattr(os, "preadv", lambda *args: pytest.fail("the plan read tensor data"))


def cache_objects(launch_dir: Path) -> list[Path]:
    folder = launch_dir / "cache" / "objects"
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def ties_reference(base: torch.Tensor, fts: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES with weights 1, sum consensus and normalize, in plain torch."""
    deltas = []
    for ft in fts:
        delta = (ft - base).reshape(-1)
        keep = torch.zeros_like(delta, dtype=torch.bool)
        keep[torch.argsort(delta.abs(), descending=True)[: max(1, int(density * delta.numel()))]] = True
        deltas.append(torch.where(keep, delta, 0.0).reshape(base.shape))
    elected = torch.where(torch.stack(deltas).sum(0) >= 0, 1.0, -1.0)
    agreeing = [(torch.sign(d) == elected) & (d != 0) for d in deltas]
    mixed = torch.stack([torch.where(a, d, 0.0) for a, d in zip(agreeing, deltas, strict=True)]).sum(0)
    count = torch.stack([a.float() for a in agreeing]).sum(0)
    return base + mixed / torch.where(count == 0, 1.0, count)


# --- the error ------------------------------------------------------------------------------------


def test_vocab_mismatch_fails_in_the_plan_naming_keys_sizes_inputs_and_fix(
    lms: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_tensor_reads(monkeypatch)
    recipe = {
        "sources": sources(lms),
        "nodes": {"blend": {"op": "lerp", "inputs": ["small", "big"], "alpha": 0.5}},
        "outputs": {"blend": {}},
    }
    error = expect_error(lambda: run_recipe(recipe))
    assert error.where is not None and "nodes.blend" in error.where
    assert "vocabularies differ" in error.what
    assert f"'{EMBED}' has 100 rows in 'small' but 103 in 'big'" in error.what
    assert f"'{HEAD}' has 100 rows in 'small' but 103 in 'big'" in error.what
    assert "besides" not in error.what  # nothing else differs
    assert error.fix is not None
    assert "vocab: first" in error.fix and "'small'" in error.fix
    assert cache_objects(launch_dir) == []


def test_other_dim0_mismatches_keep_the_shape_error(run_recipe: RunRecipe, launch_dir: Path) -> None:
    a = {"conv.weight": torch.zeros(4, 3), EMBED: torch.zeros(10, 3)}
    b = {"conv.weight": torch.zeros(5, 3), EMBED: torch.zeros(10, 3)}
    save_file(a, launch_dir / "a.safetensors")
    save_file(b, launch_dir / "b.safetensors")
    recipe = {
        "sources": {"a": "a.safetensors", "b": "b.safetensors"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"blend": {}},
    }
    error = expect_error(lambda: run_recipe(recipe))
    assert "'conv.weight' is [4, 3] in 'a' but [5, 3] in 'b'" in error.what
    assert "vocab" not in error.what + (error.fix or "")


def test_vocab_error_also_says_what_else_differs(launch_dir: Path, run_recipe: RunRecipe) -> None:
    save_file({EMBED: torch.zeros(10, 3), "conv.weight": torch.zeros(4, 3)}, launch_dir / "a.safetensors")
    save_file({EMBED: torch.zeros(12, 3), "conv.weight": torch.zeros(5, 3)}, launch_dir / "b.safetensors")
    recipe = {
        "sources": {"a": "a.safetensors", "b": "b.safetensors"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"blend": {}},
    }
    error = expect_error(lambda: run_recipe(recipe))
    assert f"'{EMBED}' has 10 rows in 'a' but 12 in 'b'" in error.what
    assert "besides" in error.what and "'conv.weight' is [4, 3] in 'a' but [5, 3] in 'b'" in error.what


def test_vocab_must_be_first(lms: dict[str, Path], run_recipe: RunRecipe) -> None:
    recipe = {
        "sources": sources(lms),
        "nodes": {"blend": {"op": "lerp", "inputs": ["big", "small"], "alpha": 0.5, "vocab": "last"}},
        "outputs": {"blend": {}},
    }
    error = expect_error(lambda: run_recipe(recipe))
    assert error.where is not None and "nodes.blend.vocab" in error.where
    assert "vocab must be first" in error.what


# --- vocab: first ---------------------------------------------------------------------------------


def test_vocab_first_with_lerp(lms: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path) -> None:
    alpha = 0.3
    recipe = {
        "sources": sources(lms),
        "nodes": {"blend": {"op": "lerp", "inputs": ["big", "small"], "alpha": alpha, "vocab": "first"}},
        "outputs": {"blend": {}},
    }
    report = run_recipe(recipe)
    big, small = load(lms["big"] / "model.safetensors"), load(lms["small"] / "model.safetensors")
    out = load(launch_dir / "out" / "blend.safetensors")
    assert sorted(out) == sorted(big)
    for key, value in big.items():
        if key in VOCAB_KEYS:
            assert out[key].shape == (103, 32)
            torch.testing.assert_close(out[key][:100], torch.lerp(value[:100], small[key], alpha))
            assert torch.equal(out[key][100:], value[100:])  # the first input's own rows, as they are
        else:
            torch.testing.assert_close(out[key], torch.lerp(value, small[key], alpha))
    expected = {"rows": 103, "merged": 100, "taken_whole": 3}
    assert report["nodes"]["blend"]["notes"]["vocab"] == {EMBED: expected, HEAD: expected}


def test_vocab_first_keeps_the_first_inputs_smaller_vocabulary(
    lms: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    """The first input has fewer rows: the others' extra rows are dropped."""
    recipe = {
        "sources": sources(lms),
        "nodes": {"blend": {"op": "lerp", "inputs": ["small", "big"], "alpha": 0.5, "vocab": "first"}},
        "outputs": {"blend": {}},
    }
    report = run_recipe(recipe)
    big, small = load(lms["big"] / "model.safetensors"), load(lms["small"] / "model.safetensors")
    out = load(launch_dir / "out" / "blend.safetensors")
    torch.testing.assert_close(out[EMBED], torch.lerp(small[EMBED], big[EMBED][:100], 0.5))
    assert report["nodes"]["blend"]["notes"]["vocab"][EMBED] == {"rows": 100, "merged": 100, "taken_whole": 0}


def test_vocab_first_with_ties_cuts_the_inputs_and_takes_the_first_of_inputs_not_the_base(
    lms: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    density = 0.5
    recipe = {
        "sources": sources(lms),
        "nodes": {
            "t": {"op": "ties", "base": "base", "inputs": ["big", "small"], "density": density, "vocab": "first"}
        },
        "outputs": {"t": {}},
    }
    prepared = prepare(
        {"cache_dir": str(launch_dir / "cache"), **recipe}, builtin_registry(), file="test.yaml", launch_dir=launch_dir
    )
    assert prepared.plan.nodes["t"].vocab_from == "big"  # the tokenizer that fits the output
    report = run_recipe(recipe)
    models = {name: load(path / "model.safetensors") for name, path in lms.items()}
    base, big, small = models["base"], models["big"], models["small"]
    out = load(launch_dir / "out" / "t.safetensors")
    for key, value in base.items():
        if key in VOCAB_KEYS:  # TIES (top-k included) over the 100 rows every input has
            assert out[key].shape == (103, 32)
            expected = ties_reference(value, [big[key][:100], small[key]], density)
            torch.testing.assert_close(out[key][:100], expected)
            assert torch.equal(out[key][100:], big[key][100:])
        else:
            torch.testing.assert_close(out[key], ties_reference(value, [big[key], small[key]], density))
    assert report["nodes"]["t"]["notes"]["vocab"][HEAD] == {"rows": 103, "merged": 100, "taken_whole": 3}


def test_vocab_first_where_nothing_differs_is_a_warning(lms: dict[str, Path], run_recipe: RunRecipe) -> None:
    recipe = {
        "sources": sources(lms),
        "nodes": {"blend": {"op": "lerp", "inputs": ["small", "base"], "alpha": 0.5, "vocab": "first"}},
        "outputs": {"blend": {}},
    }
    report = run_recipe(recipe)
    assert any(
        "vocab: first" in w and "tokenizer that fits it is still that of 'small'" in w for w in report["warnings"]
    )
    assert "vocab" not in report["nodes"]["blend"].get("notes", {})


def test_keys_intersection_with_other_vocabularies_warns(lms: dict[str, Path], run_recipe: RunRecipe) -> None:
    recipe = {
        "sources": sources(lms),
        "nodes": {"blend": {"op": "lerp", "inputs": ["small", "big"], "alpha": 0.5, "keys": "intersection"}},
        "outputs": {"blend": {}},
    }
    report = run_recipe(recipe)
    assert any("vocabularies differ" in w and "vocab: first" in w for w in report["warnings"])


# --- content keys ---------------------------------------------------------------------------------

#: node keys computed before `vocab` existed, with input keys 0..., 1..., 2... (see the test; TIES's at its
#: version 4, which changed its key as every version does)
GOLDEN_LERP = "12aade2df40dfecf9967cf957cf8499a48a7aef64d50b0005063e7081b1a8ac0"
GOLDEN_TIES = "9ad655d2b80ae0f6eb94593c0f36c92220bdb9fe5dc52ace35ed0f6179e373de"


def test_nodes_without_vocab_keep_their_keys(launch_dir: Path) -> None:
    save_file({"x": torch.zeros(2, 3)}, launch_dir / "a.safetensors")
    save_file({"x": torch.ones(2, 3)}, launch_dir / "b.safetensors")
    data = {
        "cache_dir": str(launch_dir / "cache"),
        "sources": {"a": "a.safetensors", "b": "b.safetensors", "base": "a.safetensors"},
        "nodes": {
            "blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.25},
            "t": {"op": "ties", "base": "base", "inputs": ["a", "b"], "density": 0.5},
        },
        "outputs": {"blend": {}, "t": {}},
    }
    plan = prepare(data, builtin_registry(), file="test.yaml", launch_dir=launch_dir).plan
    inputs = ["0" * 64, "1" * 64, "2" * 64]
    assert node_key(plan.nodes["blend"].content, inputs[:2]) == GOLDEN_LERP
    assert node_key(plan.nodes["t"].content, inputs) == GOLDEN_TIES
    assert plan.nodes["blend"].vocab is None and plan.nodes["blend"].vocab_from is None


def test_vocab_first_is_part_of_the_node_key(lms: dict[str, Path], launch_dir: Path) -> None:
    data = {
        "cache_dir": str(launch_dir / "cache"),
        "sources": sources(lms),
        "nodes": {
            "plain": {"op": "lerp", "inputs": ["small", "base"], "alpha": 0.5},
            "cut": {"op": "lerp", "inputs": ["big", "small"], "alpha": 0.5, "vocab": "first"},
            "plain_big": {"op": "lerp", "inputs": ["big", "small"], "alpha": 0.5, "keys": "intersection"},
            "cut_big": {
                "op": "lerp",
                "inputs": ["big", "small"],
                "alpha": 0.5,
                "keys": "intersection",
                "vocab": "first",
            },
        },
        "outputs": {n: {} for n in ("plain", "cut", "plain_big", "cut_big")},
    }
    plan = prepare(data, builtin_registry(), file="test.yaml", launch_dir=launch_dir).plan
    cut = plan.nodes["cut"]
    assert (cut.vocab, cut.vocab_from, cut.op.name) == ("first", "big", "lerp")
    assert cut.content.params["vocab"] == "first"
    assert "vocab" not in plan.nodes["plain"].content.params
    inputs = ["0" * 64, "1" * 64]
    assert node_key(plan.nodes["cut_big"].content, inputs) != node_key(plan.nodes["plain_big"].content, inputs)


# --- the wrapper on its own, on every backend -----------------------------------------------------


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_wrapper_on_every_backend(backend: str) -> None:
    """Per-key and whole-tensor ops through the real pipeline: cut rows merged, the first's rest copied,
    other keys (an int buffer among them) as the plain op gives them."""
    xp = BACKENDS[backend]()
    g = torch.Generator().manual_seed(0)

    def model(rows: int) -> dict[str, torch.Tensor]:
        return {EMBED: torch.randn(rows, 4, generator=g), "w": torch.randn(3, 3, generator=g), "n": torch.tensor(7)}

    base, first, other = model(10), model(12), model(10)
    spec, out = pipeline_outputs(vocab_first(Lerp(), 0), Lerp.params_model(alpha=0.25), [first, other], xp)
    assert spec.tensors[EMBED].shape == (12, 4)
    torch.testing.assert_close(out[EMBED][:10], torch.lerp(first[EMBED][:10], other[EMBED], 0.25))
    assert torch.equal(out[EMBED][10:], first[EMBED][10:])
    torch.testing.assert_close(out["w"], torch.lerp(first["w"], other["w"], 0.25))
    assert torch.equal(out["n"], first["n"])

    names = ("base", "first", "other")
    params = Ties.params_model(base="base", density=0.5)
    spec, out = pipeline_outputs(vocab_first(Ties(), 1), params, [base, first, other], xp, names)
    assert spec.notes["vocab"] == {EMBED: {"rows": 12, "merged": 10, "taken_whole": 2}}
    expected = ties_reference(base[EMBED], [first[EMBED][:10], other[EMBED]], 0.5)
    torch.testing.assert_close(out[EMBED][:10], expected)
    assert torch.equal(out[EMBED][10:], first[EMBED][10:])
    torch.testing.assert_close(out["w"], ties_reference(base["w"], [first["w"], other["w"]], 0.5))


def test_the_wrapper_has_the_ops_name_version_and_its_note_summary() -> None:
    from merger.ops.base import Noted

    class Summarising(Lerp):
        def summarise_notes(self, noted: Noted) -> dict[str, Any]:
            return {"summary": sorted(noted)}

    plain, summarising = vocab_first(Lerp(), 0), vocab_first(Summarising(), 0)
    assert (plain.name, plain.version, plain.family_check, plain.arity) == ("lerp", 1, True, Lerp.arity)
    assert plain.summarise_notes({"err": {"k": 1.0}}) == {"noted": {"err": {"k": 1.0}}}
    assert summarising.summarise_notes({"err": {}}) == {"summary": ["err"]}
