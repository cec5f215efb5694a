"""`merger.recipe.model.build_recipe`: validation of plain recipe data, error by error.

Every error must say what is wrong, where (the file name and the dotted place)
and how to fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from merger.errors import MergerError
from merger.ops import BUILTIN_OPS, builtin_ops, builtin_registry
from merger.ops.linear import Lerp
from merger.ops.registry import OpRegistry
from merger.recipe.model import Recipe, build_recipe
from tests.conftest import expect_error

FILE = "r.yaml"


def recipe_data(**overrides: Any) -> dict[str, Any]:
    """A valid recipe (two sources, one lerp node, one output), with top-level keys replaced."""
    data: dict[str, Any] = {
        "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"blend": {}},
    }
    data.update(overrides)
    return data


def with_node(**fields: Any) -> dict[str, Any]:
    """The valid recipe whose node `blend` is exactly `fields`."""
    return recipe_data(nodes={"blend": fields})


def build(data: dict[str, Any]) -> Recipe:
    return build_recipe(data, builtin_registry(), file=FILE)


def error_of(data: dict[str, Any]) -> MergerError:
    return expect_error(lambda: build(data))


def assert_where(error: MergerError, place: str) -> None:
    assert error.where == f"{FILE}, {place}", error.render()


# --- the valid baseline ---------------------------------------------------------------------------


def test_valid_recipe_is_built_into_typed_definitions() -> None:
    recipe = build(recipe_data())
    assert recipe.file == FILE
    assert set(recipe.sources) == {"a", "b"}
    node = recipe.nodes["blend"]
    assert node.op == "lerp"
    assert node.inputs == ("a", "b")
    assert node.params.alpha == 0.5  # type: ignore[attr-defined]
    assert node.params.keys == "strict"  # type: ignore[attr-defined]
    where = recipe.where("nodes.blend")
    assert (where.recipe, where.place, str(where)) == ("r.yaml", "nodes.blend", "r.yaml, nodes.blend")


# --- nodes ----------------------------------------------------------------------------------------


def test_unknown_op_suggests_the_close_name() -> None:
    error = error_of(with_node(op="lerpp", inputs=["a", "b"], alpha=0.5))
    assert "unknown op 'lerpp'" in error.what
    assert_where(error, "nodes.blend.op")
    assert error.fix is not None
    assert "did you mean 'lerp'" in error.fix
    assert "average" in error.fix  # the known ops are listed


def test_the_builtin_registry_loads_each_op_when_first_asked_and_lists_them_all_without_loading() -> None:
    registry = builtin_registry()
    assert registry.names() == sorted(name for name, _, _ in BUILTIN_OPS)
    assert [op.name for op in builtin_ops()] == [name for name, _, _ in BUILTIN_OPS]  # the docs' order
    ties = registry.get("ties")
    assert ties.name == "ties" and registry.get("ties") is ties  # loaded once
    assert [op.name for op in registry] == [name for name, _, _ in BUILTIN_OPS]


def test_a_registry_refuses_a_name_twice_and_a_loader_that_gives_another_op() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        OpRegistry([Lerp()], loaders={"lerp": Lerp})
    registry = OpRegistry(loaders={"slerp": Lerp})
    with pytest.raises(ValueError, match="the loader of op 'slerp' gave op 'lerp'"):
        registry.get("slerp")
    with pytest.raises(MergerError, match="unknown op 'lerp'"):
        registry.get("lerp")


def test_node_without_op() -> None:
    error = error_of(with_node(inputs=["a", "b"], alpha=0.5))
    assert "'blend'" in error.what
    assert "no op" in error.what
    assert_where(error, "nodes.blend")
    assert error.fix is not None
    assert "op" in error.fix
    assert "lerp" in error.fix


def test_node_that_is_not_a_mapping() -> None:
    error = error_of(recipe_data(nodes={"blend": "lerp"}))
    assert "'blend'" in error.what
    assert "mapping" in error.what
    assert_where(error, "nodes.blend")
    assert error.fix is not None
    assert "op:" in error.fix


@pytest.mark.parametrize(
    ("inputs", "shown"),
    [(None, "None"), ("a", "'a'"), ([], "[]"), (["a", 3], "['a', 3]")],
    ids=["missing", "not-a-list", "empty", "not-names"],
)
def test_bad_inputs(inputs: Any, shown: str) -> None:
    fields: dict[str, Any] = {"op": "lerp", "alpha": 0.5}
    if inputs is not None:
        fields["inputs"] = inputs
    error = error_of(with_node(**fields))
    assert "node 'blend' needs inputs" in error.what
    assert "non-empty list" in error.what
    assert error.what.endswith(f"got {shown}")
    assert_where(error, "nodes.blend.inputs")
    assert error.fix is not None
    assert "inputs: [a, b]" in error.fix


def test_unknown_param_next_to_a_valid_one_suggests_the_close_name() -> None:
    error = error_of(with_node(op="lerp", inputs=["a", "b"], alpha=0.5, alpah=0.5))
    assert "unknown key 'alpah'" in error.what
    assert "lerp" in error.what
    assert_where(error, "nodes.blend.alpah")
    assert error.fix is not None
    assert "did you mean 'alpha'" in error.fix


def test_misspelt_param_is_reported_as_unknown_with_did_you_mean() -> None:
    """The usual typo: `alpah:` written instead of `alpha:` (so `alpha` is also missing).

    The user must be told about the key they wrote, with the suggestion, not
    only that `alpha` is missing (which points away from the typo).
    """
    error = error_of(with_node(op="lerp", inputs=["a", "b"], alpah=0.5))
    text = error.render()
    assert "'alpah'" in text, text
    assert error.fix is not None
    assert "did you mean 'alpha'" in error.fix, text


@pytest.mark.parametrize("value", ["abc", True], ids=["string", "bool"])
def test_wrong_param_type(value: Any) -> None:
    error = error_of(with_node(op="lerp", inputs=["a", "b"], alpha=value))
    assert "valid number" in error.what
    assert repr(value) in error.what
    assert_where(error, "nodes.blend.alpha")
    assert error.fix is not None
    assert "alpha" in error.fix


def test_missing_required_param() -> None:
    error = error_of(with_node(op="lerp", inputs=["a", "b"]))
    assert error.what == "op 'lerp' needs 'alpha'"
    assert_where(error, "nodes.blend.alpha")
    assert error.fix == "add alpha: <value>"


def test_int_is_accepted_where_a_float_is_expected() -> None:
    recipe = build(with_node(op="lerp", inputs=["a", "b"], alpha=1))
    alpha = recipe.nodes["blend"].params.alpha  # type: ignore[attr-defined]
    assert alpha == 1.0
    assert isinstance(alpha, float)


def test_ints_are_accepted_in_a_list_of_floats() -> None:
    recipe = build(with_node(op="weighted_sum", inputs=["a", "b"], weights=[1, 0.5]))
    assert recipe.nodes["blend"].params.weights == [1.0, 0.5]  # type: ignore[attr-defined]


def test_keys_policy_accepts_intersection() -> None:
    recipe = build(with_node(op="average", inputs=["a", "b"], keys="intersection"))
    assert recipe.nodes["blend"].params.keys == "intersection"  # type: ignore[attr-defined]


def test_keys_policy_rejects_other_values() -> None:
    error = error_of(with_node(op="lerp", inputs=["a", "b"], alpha=0.5, keys="sometimes"))
    assert "'strict' or 'intersection'" in error.what
    assert "'sometimes'" in error.what
    assert_where(error, "nodes.blend.keys")
    assert error.fix is not None
    assert "keys" in error.fix


# --- sources --------------------------------------------------------------------------------------


def test_source_forms() -> None:
    recipe = build(
        recipe_data(
            sources={
                "a": "models/a.pth",
                "b": {"path": "models/b.pth", "key": "params_ema"},
                "zoo": {"glob": "models/zoo/*.pth"},
                "keyed_zoo": {"glob": "zoo/*.pth", "key": "params"},
            }
        )
    )
    a, b, zoo, keyed = (recipe.sources[n] for n in ("a", "b", "zoo", "keyed_zoo"))
    assert (a.name, a.path, a.glob, a.key) == ("a", "models/a.pth", None, None)
    assert (b.path, b.glob, b.key) == ("models/b.pth", None, "params_ema")
    assert (zoo.path, zoo.glob, zoo.key) == (None, "models/zoo/*.pth", None)
    assert (keyed.glob, keyed.key) == ("zoo/*.pth", "params")


def test_source_that_is_a_number() -> None:
    error = error_of(recipe_data(sources={"a": "a.pth", "b": 3}))
    assert "source 'b' must be a path or a mapping" in error.what
    assert "3" in error.what
    assert_where(error, "sources.b")
    assert error.fix is not None
    assert "{path: a.pth, key: params_ema}" in error.fix
    assert "glob" in error.fix


@pytest.mark.parametrize(
    ("source", "what", "known"),
    [
        ({"path": "b.pth", "kee": "params"}, "a source", "key, path"),
        ({"glob": "zoo/*.pth", "kee": "params"}, "a glob source", "glob, key"),
    ],
    ids=["path", "glob"],
)
def test_source_mapping_with_unknown_key(source: dict[str, str], what: str, known: str) -> None:
    error = error_of(recipe_data(sources={"a": "a.pth", "b": source}))
    assert error.what == f"unknown key 'kee' in {what}"
    assert_where(error, "sources.b.kee")
    assert error.fix is not None
    assert "did you mean 'key'" in error.fix
    assert known in error.fix


def test_source_mapping_with_misspelt_path_names_the_typo() -> None:
    """`{pth: b.pth}`: the key the user wrote must be named, with the suggestion."""
    error = error_of(recipe_data(sources={"a": "a.pth", "b": {"pth": "b.pth"}}))
    assert "'pth'" in error.render(), error.render()
    assert error.fix is not None
    assert "did you mean 'path'" in error.fix, error.render()


def test_sources_as_a_list_is_rejected_with_a_message_about_mappings() -> None:
    error = error_of(recipe_data(sources=["a", "b"]))
    assert "'sources' must be a mapping" in error.what
    assert "list" in error.what
    assert_where(error, "sources")
    assert error.fix is not None
    assert "mapping" in error.fix


def test_nodes_as_a_list_is_rejected_too() -> None:
    error = error_of(recipe_data(nodes=[{"op": "lerp"}]))
    assert "'nodes' must be a mapping" in error.what
    assert_where(error, "nodes")


def test_invalid_name() -> None:
    error = error_of(recipe_data(sources={"a": "a.pth", "b/c": "b.pth"}))
    assert "'b/c' is not a valid name" in error.what
    assert_where(error, "sources")


def test_name_that_is_both_source_and_node() -> None:
    error = error_of(recipe_data(nodes={"a": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}}, outputs={"a": {}}))
    assert error.what == "'a' is both a source and a node"
    assert_where(error, "nodes.a")
    assert error.fix is not None
    assert "another name" in error.fix


# --- outputs --------------------------------------------------------------------------------------


def test_output_defaults() -> None:
    recipe = build(recipe_data(outputs={"blend": {}, "bare": None, "short": "short.pth"}))
    blend, bare, short = (recipe.outputs[n] for n in ("blend", "bare", "short"))
    assert (blend.name, blend.node, blend.path, blend.dtype) == ("blend", "blend", "blend.safetensors", "keep")
    assert (bare.node, bare.path, bare.dtype) == ("bare", "bare.safetensors", "keep")
    assert (short.node, short.path, short.dtype) == ("short", "short.pth", "keep")


def test_output_with_explicit_fields() -> None:
    recipe = build(recipe_data(outputs={"x": {"node": "blend", "path": "sub/x.pth", "dtype": "bfloat16"}}))
    out = recipe.outputs["x"]
    assert (out.name, out.node, out.path, out.dtype) == ("x", "blend", "sub/x.pth", "bfloat16")


def test_output_path_with_unknown_format() -> None:
    error = error_of(recipe_data(outputs={"blend": {"path": "x.bin"}}))
    assert error.what == "output path 'x.bin' has an unknown format"
    assert_where(error, "outputs.blend.path")
    assert error.fix is not None
    assert ".safetensors" in error.fix
    assert ".pth" in error.fix


def test_output_dtype_int8_is_rejected() -> None:
    error = error_of(recipe_data(outputs={"blend": {"dtype": "int8"}}))
    assert "'int8'" in error.what
    for allowed in ("keep", "float32", "float16", "bfloat16"):
        assert allowed in error.what
    assert_where(error, "outputs.blend.dtype")
    assert error.fix is not None
    assert "dtype" in error.fix


def test_output_with_unknown_key() -> None:
    error = error_of(recipe_data(outputs={"blend": {"nod": "blend"}}))
    assert "unknown key 'nod'" in error.what
    assert_where(error, "outputs.blend.nod")
    assert error.fix is not None
    assert "did you mean 'node'" in error.fix


@pytest.mark.parametrize("outputs", [{}, None], ids=["empty", "absent"])
def test_no_outputs(outputs: Any) -> None:
    data = recipe_data(outputs=outputs)
    if outputs is None:
        del data["outputs"]
    error = error_of(data)
    assert "no outputs" in error.what
    assert error.where == FILE
    assert error.fix is not None
    assert "outputs" in error.fix


# --- settings and variables -----------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = build(recipe_data()).settings
    assert settings.device == "auto"
    assert settings.cache_dir is None  # the cache's place: $MERGER_CACHE_DIR, else outputs/cache
    assert (settings.allow_env, settings.cache_verify, settings.nonfinite) == (False, False, "warn")
    assert settings.seed == 0
    assert settings.progress is True
    assert settings.description is None


def test_settings_accepted() -> None:
    settings = build(
        recipe_data(device="cuda:1", seed=7, progress=False, cache_dir="/tmp/c", description="hello")
    ).settings
    assert (settings.device, settings.seed, settings.progress) == ("cuda:1", 7, False)
    assert (settings.cache_dir, settings.description) == ("/tmp/c", "hello")


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "auto"])
def test_device_values_accepted(device: str) -> None:
    assert build(recipe_data(device=device)).settings.device == device


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("device", "gpu", "pattern"),
        ("device", "cuda:x", "pattern"),
        ("seed", 1.5, "valid integer"),
        ("seed", True, "valid integer"),
        ("progress", "yes", "valid boolean"),
    ],
)
def test_bad_settings(key: str, value: Any, expected: str) -> None:
    error = error_of(recipe_data(**{key: value}))
    assert expected in error.what
    assert repr(value) in error.what
    assert_where(error, key)
    assert error.fix is not None
    assert key in error.fix


def test_variables_are_collected() -> None:
    recipe = build(recipe_data(alpha=0.8, tag="v1", seed=3, device="cpu"))
    assert recipe.variables == {"alpha": 0.8, "tag": "v1"}
    assert build(recipe_data()).variables == {}


def test_errors_carry_a_structured_location(launch_dir: Path) -> None:
    from merger.cli.job import prepare
    from merger.ops import builtin_registry

    (launch_dir / "broken.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    data = {
        "sources": {"a": "broken.safetensors"},
        "nodes": {"x": {"op": "average", "inputs": ["a"]}},
        "outputs": {"x": {}},
    }
    with pytest.raises(MergerError) as info:
        prepare(data, builtin_registry(), file="r.yaml", launch_dir=launch_dir)
    location = info.value.location
    assert location is not None
    assert (location.recipe, location.place) == ("r.yaml", "sources.a")
    assert location.model == str(launch_dir / "broken.safetensors")
    assert info.value.where == f"r.yaml, sources.a, {launch_dir / 'broken.safetensors'}"


@pytest.mark.parametrize(
    ("alpha", "message", "place"),
    [
        ({"rules": [{"match": "x", "value": 0.2}]}, "field required at default", "nodes.blend.alpha"),
        ({"default": 0.5, "rules": []}, "list should have at least 1 item after validation, not 0 at rules", "alpha"),
        ({"default": 0.5, "rules": [{"match": "x", "value": "high"}]}, "at rules.0.value", "alpha"),
        ({"blocks": "layers\\.(\\d+)", "values": [1.0]}, "at values", "nodes.blend.alpha"),
        ({"blocks": "layers\\.(\\d+)", "values": [0.0, 1.0], "extra": 1}, "extra inputs are not permitted", "alpha"),
    ],
)
def test_schedule_errors_say_what_a_schedule_is(alpha: Any, message: str, place: str) -> None:
    error = expect_error(
        lambda: build(recipe_data(nodes={"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": alpha}}))
    )
    assert error.what.startswith("'alpha' must be a number, a rule list {default: 0.5, rules: [{match: <regex>, value:")
    assert message in error.what
    assert error.where is not None and error.where.endswith(place)
    assert error.fix == "fix alpha"
