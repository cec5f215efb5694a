"""apply_lora and extract_lora against peft itself, on tiny Llama and GPT-2 models built here.

apply_lora's result is compared with peft's `merge_and_unload()`; extract_lora's adapter is loaded
by `peft.PeftModel.from_pretrained` and merged, and compared with the fine-tune it came from.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger.core.arrays import NumpyBackend, TorchBackend
from merger.engine.entry_notes import runtime_notes
from merger.ops import builtin_registry, lora_extract
from tests.conftest import RunRecipe, StateDict, expect_error
from tests.test_op_versions import CASES, outputs_of

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
]

TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
}


def llama(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()


def state(model: Any) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_adapter(base: Any, folder: Path, seed: int, **config: Any) -> StateDict:
    """A peft LoRA adapter of `base` (random lora_B, so the update is not 0) saved in `folder`;
    returns peft's own merge of it."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.1)
    model.save_pretrained(folder)
    return state(model.merge_and_unload())


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama (as a Hugging Face folder) and adapters of it, with peft's merges."""
    root = tmp_path_factory.mktemp("lora")
    base = llama()
    base.save_pretrained(root / "base", safe_serialization=True)
    qv = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    merged = {
        "plain": make_adapter(base, root / "plain", 1, **qv),
        "rslora": make_adapter(
            base,
            root / "rslora",
            2,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
            modules_to_save=["lm_head"],
        ),
    }
    return {"root": root, "base": base, "state": state(base), "merged": merged}


def max_diff(got: StateDict, expected: StateDict) -> float:
    assert sorted(got) == sorted(expected)
    return max((got[k].float() - v.float()).abs().max().item() for k, v in expected.items())


def apply_recipe(family: dict[str, Any], adapters: list[str], **params: Any) -> dict[str, Any]:
    root = family["root"]
    return {
        "sources": {"base": str(root / "base"), **{name: str(root / name) for name in adapters}},
        "nodes": {"merged": {"op": "apply_lora", "inputs": ["base", *adapters], **params}},
        "outputs": {"out": {"node": "merged", "path": "merged.safetensors"}},
    }


@pytest.mark.parametrize("adapter", ["plain", "rslora"])
def test_apply_lora_is_peft_merge_and_unload(
    family: dict[str, Any], adapter: str, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    report = run_recipe(apply_recipe(family, [adapter]))
    got = load_file(launch_dir / "out" / "merged.safetensors")
    assert max_diff(got, family["merged"][adapter]) < 1e-5
    notes = report["nodes"]["merged"]["notes"]
    changed = {"plain": 4, "rslora": 8}[adapter]  # q, v (and down) in 2 layers (and embed_tokens, lm_head)
    assert notes["patched"] == changed and notes["copied"] == len(got) - changed
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], family["state"]["model.layers.0.self_attn.q_proj.weight"]
    )


def test_two_adapters_with_scales_add_their_weighted_updates(
    family: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    run_recipe(apply_recipe(family, ["plain", "rslora"], scale=[1, 0.5]))
    got = load_file(launch_dir / "out" / "merged.safetensors")
    base, one, two = family["state"], family["merged"]["plain"], family["merged"]["rslora"]
    expected = {k: v + (one[k] - v) + 0.5 * (two[k] - v) for k, v in base.items()}
    expected["lm_head.weight"] = two["lm_head.weight"]  # a tensor stored whole replaces, it is not scaled
    assert max_diff(got, expected) < 1e-5


def test_fan_in_fan_out_adapters_of_gpt2(tmp_path: Path, run_recipe: RunRecipe, launch_dir: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    base = transformers.GPT2LMHeadModel(config).eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        merged = make_adapter(base, tmp_path / "adapter", 3, r=2, lora_alpha=4, target_modules=["c_attn"])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"]
    recipe = {
        "sources": {"base": str(tmp_path / "base"), "adapter": str(tmp_path / "adapter")},
        "nodes": {"merged": {"op": "apply_lora", "inputs": ["base", "adapter"]}},
        "outputs": {"out": {"node": "merged", "path": "merged.safetensors"}},
    }
    run_recipe(recipe)
    got = load_file(launch_dir / "out" / "merged.safetensors")
    expected = {k: v for k, v in merged.items() if k in got}  # the saved GPT-2 has no tied lm_head
    assert sorted(got) == sorted(expected) and max_diff(got, expected) < 1e-5


def test_conv_adapters(tmp_path: Path, run_recipe: RunRecipe, launch_dir: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))
    save_file(state(net), tmp_path / "net.safetensors")
    merged = make_adapter(net, tmp_path / "adapter", 4, r=2, lora_alpha=2, target_modules=["0", "2"])
    assert load_file(tmp_path / "adapter" / "adapter_model.safetensors")["base_model.model.0.lora_A.weight"].ndim == 4
    recipe = {
        "sources": {"base": str(tmp_path / "net.safetensors"), "adapter": str(tmp_path / "adapter")},
        "nodes": {"merged": {"op": "apply_lora", "inputs": ["base", "adapter"]}},
        "outputs": {"out": {"node": "merged", "path": "merged.safetensors"}},
    }
    run_recipe(recipe)
    assert max_diff(load_file(launch_dir / "out" / "merged.safetensors"), merged) < 1e-5


# --- extract_lora ---------------------------------------------------------------------------------


def low_rank_fine_tune(base: StateDict, ranks: dict[str, int], seed: int) -> StateDict:
    """`base` plus, on each weight whose key has a name of `ranks`, a delta of exactly that rank whose
    singular values are all 0.1 (so its energy rank is its rank)."""
    g = torch.Generator().manual_seed(seed)
    tuned = {k: v.clone() for k, v in base.items()}
    for key, value in base.items():
        rank = next((r for name, r in ranks.items() if name in key), 0)
        if rank and value.ndim == 2:
            left = torch.linalg.qr(torch.randn(value.shape[0], rank, generator=g))[0]
            right = torch.linalg.qr(torch.randn(value.shape[1], rank, generator=g))[0]
            tuned[key] = value + 0.1 * left @ right.T
    return tuned


@pytest.fixture(scope="module")
def tuned(family: dict[str, Any]) -> dict[str, Any]:
    ranks = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 2, "mlp": 3}
    tuned = low_rank_fine_tune(family["state"], ranks, seed=5)
    path = family["root"] / "tuned.safetensors"
    save_file(tuned, path)
    return {"path": path, "state": tuned, "ranks": ranks}


def extract_recipe(family: dict[str, Any], tuned: dict[str, Any], path: str, **params: Any) -> dict[str, Any]:
    return {
        "sources": {"base": str(family["root"] / "base"), "tuned": str(tuned["path"])},
        "nodes": {"lora": {"op": "extract_lora", "inputs": ["base", "tuned"], **params}},
        "outputs": {"out": {"node": "lora", "path": path}},
    }


def peft_merge(family: dict[str, Any], folder: Path) -> StateDict:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(family["base"]), folder)
    return state(model.merge_and_unload())


def test_extract_lora_reconstructs_a_low_rank_fine_tune_and_peft_loads_it(
    family: dict[str, Any], tuned: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    start = time.perf_counter()
    report = run_recipe(extract_recipe(family, tuned, "adapter", rank=3))
    seconds = time.perf_counter() - start
    node = report["nodes"]["lora"]
    lora, config = node["notes"]["lora"], node["notes"]["peft"]
    assert lora["modules"] == 14 and lora["total_relative_error"] < 1e-5
    assert max(lora["relative_error"].values()) < 1e-5
    assert lora["ranks"]["model.layers.1.self_attn.q_proj"] == 3  # rank mode: the rank asked for
    assert config["r"] == config["lora_alpha"] == 3 and config["rank_pattern"] == {}
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    folder = launch_dir / "out" / "adapter"
    adapter = load_file(folder / "adapter_model.safetensors")
    assert adapter["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (3, 32)
    assert adapter["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (64, 3)
    assert max_diff(peft_merge(family, folder), tuned["state"]) < 1e-4
    assert seconds < 10

    again = run_recipe(extract_recipe(family, tuned, "adapter", rank=3))["nodes"]["lora"]
    assert again["status"] == "cached" and again["notes"]["lora"] == lora  # the runtime notes, from the entry


def test_a_safetensors_output_with_the_notes_is_an_adapter_too(
    family: dict[str, Any], tuned: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    config = run_recipe(extract_recipe(family, tuned, "lora.safetensors", rank=3))["nodes"]["lora"]["notes"]["peft"]
    folder = launch_dir / "by_hand"
    folder.mkdir()
    (launch_dir / "out" / "lora.safetensors").rename(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "base"}))
    assert max_diff(peft_merge(family, folder), tuned["state"]) < 1e-4


def test_energy_gives_each_module_the_rank_its_spectrum_needs(
    family: dict[str, Any], tuned: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    report = run_recipe(extract_recipe(family, tuned, "adapter", rank=8, energy=0.95))
    lora = report["nodes"]["lora"]["notes"]["lora"]
    for module, rank in lora["ranks"].items():
        assert rank == next(r for name, r in tuned["ranks"].items() if name in module), module
    assert lora["total_relative_error"] < 1e-5
    # the node's entry has `rank` rows per pair (shapes are fixed before tensors are read), zero past
    # each energy rank; the folder written cuts each pair to its rank, and says so in rank_pattern
    adapter = load_file(launch_dir / "out" / "adapter" / "adapter_model.safetensors")
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (1, 32) and b.shape == (32, 1) and a.abs().max() > 0
    config = json.loads((launch_dir / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == config["alpha_pattern"] == lora["ranks"] and config["r"] == 8
    assert max_diff(peft_merge(family, launch_dir / "out" / "adapter"), tuned["state"]) < 1e-4
    entry = load_file(report["outputs"]["out"]["path"] + "/adapter_model.safetensors")
    assert len(entry) == len(adapter)


def test_a_rank_above_a_weight_is_an_error_naming_it(
    family: dict[str, Any], tuned: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    recipe = extract_recipe(family, tuned, "adapter", rank=20, include="layers\\.0\\.self_attn\\.(k|v)_proj")
    error = expect_error(lambda: run_recipe(recipe))
    # k_proj and v_proj are [16, 32]: rank 16 at most
    assert "rank 20 is more than 'model.layers.0.self_attn.k_proj.weight' F32[16, 32] allows" in error.what
    assert "rank: 16 or less" in (error.fix or "") and "min_dim: 21" in (error.fix or "")
    assert not (launch_dir / "out").exists()


def test_with_energy_rank_is_a_cap_cut_to_each_weight_and_recorded(
    family: dict[str, Any], tuned: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    include = "layers\\.(0\\.self_attn\\.(k|v)_proj|1\\.(self_attn\\.k_proj|mlp))"
    recipe = extract_recipe(family, tuned, "adapter", rank=20, energy=1.0, include=include)
    notes = run_recipe(recipe)["nodes"]["lora"]["notes"]
    small = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.k_proj"]
    assert notes["lora"]["clamped"] == dict.fromkeys(small, 16)  # [16, 32]: rank 16 at most
    assert notes["peft"]["r"] == 20 and notes["peft"]["rank_pattern"] == dict.fromkeys(small, 16)
    # leaf names would also match layer 1's v_proj: peft gets the modules' paths
    assert "model.layers.0.self_attn.v_proj" in notes["peft"]["target_modules"]
    merged = peft_merge(family, launch_dir / "out" / "adapter")
    chosen = [*small, "model.layers.1.mlp"]
    for key, value in merged.items():
        expected = tuned["state"][key] if any(key.startswith(m) for m in chosen) else family["state"][key]
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=0, msg=key)


# --- errors ---------------------------------------------------------------------------------------


def test_an_adapter_of_another_model_is_refused_before_any_tensor_is_read(
    family: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    renamed = {k.removeprefix("model."): v for k, v in family["state"].items()}
    save_file(renamed, launch_dir / "other.safetensors")
    recipe = apply_recipe(family, ["plain"])
    recipe["sources"]["base"] = str(launch_dir / "other.safetensors")
    error = expect_error(lambda: run_recipe(recipe))
    assert "adapter 'plain' targets 4 modules or tensors the base does not have" in error.what
    assert "'model.layers.0.self_attn.q_proj.weight'" in error.what and "nodes.merged" in str(error.where)
    assert error.fix is not None and "model it was trained on" in error.fix


def test_factors_that_do_not_make_the_base_weight_are_refused(
    family: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    wrong = dict(family["state"])
    wrong["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(32, 32)
    save_file(wrong, launch_dir / "wrong.safetensors")
    recipe = apply_recipe(family, ["plain"])
    recipe["sources"]["base"] = str(launch_dir / "wrong.safetensors")
    error = expect_error(lambda: run_recipe(recipe))
    assert "the factors of 'model.layers.1.self_attn.v_proj' (A [4, 32], B [16, 4]) do not make" in error.what
    assert "[32, 32]" in error.what


def test_an_input_that_is_not_an_adapter_is_refused(family: dict[str, Any], run_recipe: RunRecipe) -> None:
    recipe = apply_recipe(family, [])
    recipe["sources"]["again"] = recipe["sources"]["base"]
    recipe["nodes"]["merged"]["inputs"] = ["base", "again"]
    error = expect_error(lambda: run_recipe(recipe))
    assert "input 'again' is not a PEFT adapter folder" in error.what


def test_scale_needs_one_value_per_adapter(family: dict[str, Any], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: run_recipe(apply_recipe(family, ["plain"], scale=[1, 2])))
    assert "scale has 2 values for 1 models" in error.what


def test_extract_lora_needs_a_rank_and_one_shape_per_weight(
    family: dict[str, Any], tuned: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    error = expect_error(lambda: run_recipe(extract_recipe(family, tuned, "adapter", energy=0.9)))
    assert "extract_lora needs rank" in error.what and error.fix is not None and "zero past" in error.fix
    resized = dict(tuned["state"])
    resized["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file(resized, launch_dir / "resized.safetensors")
    recipe = extract_recipe(family, {"path": launch_dir / "resized.safetensors"}, "adapter", rank=2)
    error = expect_error(lambda: run_recipe(recipe))
    assert "'model.layers.0.mlp.up_proj.weight' is F32[64, 32] in 'base' and F32[65, 32] in 'tuned'" in error.what


# --- one SVD per module, both backends, the runtime notes ----------------------------------------


def test_one_svd_per_module(
    family: dict[str, Any], tuned: dict[str, Any], run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    real = lora_extract._svd

    def counted(delta: Any, xp: Any) -> Any:
        calls.append(tuple(delta.shape))
        return real(delta, xp)

    monkeypatch.setattr(lora_extract, "_svd", counted)
    run_recipe(extract_recipe(family, tuned, "adapter", rank=3))
    assert len(calls) == 14  # 7 weights in each of 2 layers, lora_A and lora_B from one SVD


@pytest.mark.parametrize("name", ["apply_lora", "extract_lora"])
def test_torch_computes_what_numpy_computes(name: str) -> None:
    op = builtin_registry().get(name)
    raw, models, names = CASES[name]
    params = op.params_model.model_validate(raw)
    _, expected = outputs_of(op, params, models, names, NumpyBackend())
    _, got = outputs_of(op, params, models, names, TorchBackend("cpu"))
    assert list(got) == list(expected)
    for key, value in expected.items():
        if name == "apply_lora":
            assert torch.equal(got[key], value), key
        elif key.endswith("lora_A.weight"):  # factors are unique up to signs: compare B @ A
            b_key = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(got[b_key] @ got[key], expected[b_key] @ value, atol=1e-5, rtol=0)


def test_runtime_notes_are_the_ops_summary_or_what_it_noted() -> None:
    registry = builtin_registry()
    key = "base_model.model.m.lora_A.weight"
    noted: dict[str, dict[str, float | None]] = {"squared_residual": {key: 1.0}, "squared_norm": {key: 4.0}}
    noted["rank"] = {key: 3}
    lora = runtime_notes(registry.get("extract_lora"), noted)["lora"]
    assert lora == {"relative_error": {"m": 0.5}, "total_relative_error": 0.5, "ranks": {"m": 3}}
    assert runtime_notes(registry.get("lerp"), {"x": {"k": None}}) == {"noted": {"x": {"k": None}}}
    assert runtime_notes(registry.get("lerp"), {}) == {}


def test_keys_with_an_adapter_name_and_features_merged_otherwise() -> None:
    from merger.core.specs import TensorSpec
    from merger.ops.base import InputSpecs

    op = builtin_registry().get("apply_lora")
    base = {"m.weight": TensorSpec("F32", (8, 4)), "m.bias": TensorSpec("F32", (8,))}
    adapter = {
        "base_model.model.m.lora_A.default.weight": TensorSpec("F32", (2, 4)),
        "base_model.model.m.lora_B.default.weight": TensorSpec("BF16", (8, 2)),
        "base_model.model.m.bias": TensorSpec("F32", (8,)),
    }
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    params = op.params_model.model_validate({})

    def spec(adapter: dict[str, TensorSpec], config: dict[str, Any]) -> Any:
        return op.spec(InputSpecs(("base", "adapter"), (base, adapter), (None, config)), params)

    found = spec(adapter, config)
    assert found.plan["m.weight"].factors[0].scaling == 2.0
    assert found.plan["m.bias"].start == (1, "base_model.model.m.bias")
    assert op.piece_mode("m.bias", (base, adapter), found.plan) == "copy"  # a bias stored whole, as it is
    assert "uses use_dora" in expect_error(lambda: spec(adapter, {**config, "use_dora": True})).what
    assert "of type 'IA3'" in expect_error(lambda: spec(adapter, {**config, "peft_type": "IA3"})).what
    assert "rank 3, its lora_A has 2 rows" in expect_error(lambda: spec(adapter, {**config, "r": 3})).what
    odd = {**adapter, "base_model.model.m.lora_magnitude_vector": TensorSpec("F32", (8,))}
    assert "1 tensors that are not LoRA factors" in expect_error(lambda: spec(odd, config)).what


def edited_adapter(family: dict[str, Any], launch_dir: Path, **changes: Any) -> dict[str, Any]:
    """A copy of the `plain` adapter, its adapter_config.json changed, as the recipe's `evil` adapter."""
    import shutil

    folder = launch_dir / "evil"
    shutil.copytree(family["root"] / "plain", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    recipe = apply_recipe(family, ["plain"])
    recipe["sources"]["plain"] = str(folder)
    return recipe


@pytest.mark.parametrize("pattern", ["(.*)*x", "(a+)+$", "q_proj|v_proj", "[a-z]{1,99}"])
def test_patterns_from_an_adapter_file_are_plain_names(
    family: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path, pattern: str
) -> None:
    start = time.perf_counter()
    error = expect_error(lambda: run_recipe(edited_adapter(family, launch_dir, rank_pattern={pattern: 4})))
    assert time.perf_counter() - start < 10 and "operators merger does not run" in error.what
    error = expect_error(lambda: run_recipe(edited_adapter(family, launch_dir / "t", target_modules=pattern)))
    assert "target_modules" in error.what


def test_factors_its_target_modules_do_not_name_are_refused(
    family: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    error = expect_error(lambda: run_recipe(edited_adapter(family, launch_dir, target_modules=["nonexistent"])))
    assert "which its target_modules (['nonexistent']) do not name" in error.what
    assert not (launch_dir / "out").exists()


def test_an_extracted_adapter_is_not_merged_as_a_model(
    family: dict[str, Any], tuned: dict[str, Any], run_recipe: RunRecipe, launch_dir: Path
) -> None:
    recipe = extract_recipe(family, tuned, "adapter", rank=2)
    recipe["nodes"]["again"] = {"op": "extract_lora", "inputs": ["base", "tuned"], "rank": 3}
    recipe["nodes"]["z"] = {"op": "lerp", "inputs": ["lora", "again"], "alpha": 0.5}
    recipe["outputs"] = {"z": {"node": "z", "path": "z_out"}}
    error = expect_error(lambda: run_recipe(recipe))
    assert "input 'lora' is a LoRA adapter" in error.what and "nodes.z" in (error.where or "")
    assert not (launch_dir / "out").exists()
