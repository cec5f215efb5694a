"""`merger.engine.graph.build_graph` (references, cycles, order, unused nodes) and
`merger.recipe.config_check.checked_recipe_data` (variables and interpolations)."""

from __future__ import annotations

from typing import Any

import pytest
from omegaconf import OmegaConf

from merger.engine.graph import Graph, build_graph
from merger.errors import MergerError
from merger.ops import builtin_registry
from merger.recipe.config_check import checked_recipe_data
from merger.recipe.model import build_recipe
from tests.conftest import expect_error

FILE = "r.yaml"


def avg(*inputs: str) -> dict[str, Any]:
    return {"op": "average", "inputs": list(inputs)}


def graph_of(nodes: dict[str, Any], outputs: dict[str, Any]) -> Graph:
    data = {"sources": {"s1": "s1.safetensors", "s2": "s2.safetensors"}, "nodes": nodes, "outputs": outputs}
    return build_graph(build_recipe(data, builtin_registry(), file=FILE))


def graph_error(nodes: dict[str, Any], outputs: dict[str, Any]) -> MergerError:
    return expect_error(lambda: graph_of(nodes, outputs))


# --- references -----------------------------------------------------------------------------------


def test_reference_to_unknown_name_suggests_the_close_one() -> None:
    error = graph_error({"blend": avg("s1", "s22")}, {"blend": {}})
    assert error.what == "node 'blend' reads 's22', which is neither a source nor a node"
    assert error.where == "r.yaml, nodes.blend.inputs[1]"
    assert error.fix is not None
    assert error.fix.startswith("did you mean 's2'?")
    assert "s1, s2, blend" in error.fix or "blend, s1, s2" in error.fix


def test_reference_with_nothing_close_lists_the_known_names() -> None:
    error = graph_error({"blend": avg("zzzzzz")}, {"blend": {}})
    assert error.fix is not None
    assert "did you mean" not in error.fix
    assert "blend, s1, s2" in error.fix


def test_unknown_reference_in_an_unused_node_is_still_an_error() -> None:
    error = graph_error({"blend": avg("s1"), "spare": avg("nope")}, {"blend": {}})
    assert "'nope'" in error.what
    assert error.where == "r.yaml, nodes.spare.inputs[0]"


def test_output_naming_an_unknown_node_suggests_the_close_one() -> None:
    error = graph_error({"blend": avg("s1", "s2")}, {"out": {"node": "blnd"}})
    assert error.what == "output 'out' names node 'blnd', which the recipe does not define"
    assert error.where == "r.yaml, outputs.out.node"
    assert error.fix is not None
    assert "did you mean 'blend'" in error.fix


def test_output_defaulting_to_its_own_name_that_is_no_node() -> None:
    error = graph_error({"blend": avg("s1", "s2")}, {"blended": {}})
    assert "output 'blended' names node 'blended'" in error.what
    assert error.where == "r.yaml, outputs.blended.node"
    assert error.fix is not None
    assert "did you mean 'blend'" in error.fix


def test_output_naming_a_source_says_to_add_a_node() -> None:
    error = graph_error({"blend": avg("s1", "s2")}, {"out": {"node": "s1"}})
    assert error.what == "output 'out' names source 's1'; outputs take nodes"
    assert error.where == "r.yaml, outputs.out.node"
    assert error.fix is not None
    assert "node" in error.fix
    assert "inputs: [s1]" in error.fix


# --- cycles ---------------------------------------------------------------------------------------


def test_three_node_cycle_is_printed() -> None:
    nodes = {"a": avg("b"), "b": avg("c"), "c": avg("a")}
    error = graph_error(nodes, {"out": {"node": "a"}})
    assert error.what == "the nodes form a cycle: a -> b -> c -> a"
    assert error.where == "r.yaml, nodes.a.inputs"
    assert error.fix is not None
    assert "cycle" in error.fix


def test_cycle_printed_from_where_the_walk_meets_it() -> None:
    """The walk starts at the first node in the recipe and follows inputs in order."""
    nodes = {"x": avg("s1", "q"), "q": avg("r"), "r": avg("s2", "q")}
    error = graph_error(nodes, {"out": {"node": "x"}})
    assert error.what == "the nodes form a cycle: q -> r -> q"
    assert error.where == "r.yaml, nodes.q.inputs"


def test_self_cycle() -> None:
    error = graph_error({"x": avg("x", "s1")}, {"x": {}})
    assert error.what == "the nodes form a cycle: x -> x"
    assert error.where == "r.yaml, nodes.x.inputs"


def test_cycle_among_unused_nodes_is_still_an_error() -> None:
    nodes = {"blend": avg("s1"), "p": avg("q"), "q": avg("p")}
    error = graph_error(nodes, {"blend": {}})
    assert error.what == "the nodes form a cycle: p -> q -> p"


# --- order and unused nodes -----------------------------------------------------------------------


def _assert_topological(graph: Graph, nodes: dict[str, Any]) -> None:
    position = {name: i for i, name in enumerate(graph.order)}
    for name in graph.order:
        for ref in nodes[name]["inputs"]:
            if ref in nodes:
                assert position[ref] < position[name], f"{ref} must come before {name} in {graph.order}"


def test_order_is_topological_and_keeps_only_needed_nodes() -> None:
    nodes = {
        "final": avg("mid", "left"),
        "spare": avg("s1"),
        "mid": avg("left", "right"),
        "left": avg("s1"),
        "right": avg("s2"),
        "spare2": avg("spare", "final"),
    }
    graph = graph_of(nodes, {"out": {"node": "final"}})
    assert sorted(graph.order) == ["final", "left", "mid", "right"]
    assert len(graph.order) == len(set(graph.order))
    _assert_topological(graph, nodes)
    assert graph.order[-1] == "final"
    assert graph.unused == ("spare", "spare2")


def test_order_covers_every_output() -> None:
    nodes = {"one": avg("s1"), "two": avg("s2"), "both": avg("one", "two"), "lone": avg("s2")}
    graph = graph_of(nodes, {"o1": {"node": "both"}, "o2": {"node": "lone"}})
    assert set(graph.order) == {"one", "two", "both", "lone"}
    _assert_topological(graph, nodes)
    assert graph.unused == ()


def test_independent_nodes_keep_the_recipe_order() -> None:
    """graph.py promises 'a topological order that follows the recipe's own order where it is free to':
    `first` and `second` do not depend on each other, so they run in the order the recipe lists them,
    whatever the order of `top`'s inputs."""
    nodes = {"top": avg("second", "first"), "first": avg("s1"), "second": avg("s2")}
    graph = graph_of(nodes, {"out": {"node": "top"}})
    assert graph.order == ("first", "second", "top")


def test_unused_lists_every_node_no_output_needs_in_recipe_order() -> None:
    nodes = {"z": avg("s1"), "used": avg("s1", "s2"), "a": avg("z"), "m": avg("used")}
    graph = graph_of(nodes, {"out": {"node": "used"}})
    assert graph.order == ("used",)
    assert graph.unused == ("z", "a", "m")


# --- config_check: variables and interpolations ---------------------------------------------------


def config_data(**top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "sources": {"a": "a.safetensors", "b": "b.safetensors"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"blend": {}},
    }
    data.update(top)
    return data


def checked(data: dict[str, Any]) -> dict[str, Any]:
    return checked_recipe_data(OmegaConf.create(data), FILE)


def check_error(data: dict[str, Any]) -> MergerError:
    return expect_error(lambda: checked(data))


def test_plain_recipe_passes_through_as_plain_data() -> None:
    data = config_data(device="cpu", seed=3)
    result = checked(data)
    assert result == data
    assert type(result["nodes"]) is dict


def test_top_level_typo_node_says_did_you_mean_nodes() -> None:
    data = config_data()
    data["node"] = data.pop("nodes")
    error = check_error(data)
    assert "top-level key 'node'" in error.what
    assert error.where == "r.yaml, node"
    assert error.fix is not None
    assert "did you mean 'nodes'" in error.fix


def test_top_level_typo_of_a_setting() -> None:
    error = check_error(config_data(seeds=3))
    assert error.where == "r.yaml, seeds"
    assert error.fix is not None
    assert "did you mean 'seed'" in error.fix


def test_unused_variable_is_an_error() -> None:
    error = check_error(config_data(alpha=0.5))
    assert error.what == "top-level key 'alpha' is neither a section, a run setting nor a variable in use"
    assert error.where == "r.yaml, alpha"
    assert error.fix is not None
    assert "${alpha}" in error.fix


def test_variable_used_in_a_node_is_fine_and_resolved() -> None:
    data = config_data(alpha=0.25)
    data["nodes"]["blend"]["alpha"] = "${alpha}"
    result = checked(data)
    assert result["alpha"] == 0.25
    assert result["nodes"]["blend"]["alpha"] == 0.25


def test_variable_used_inside_a_string_and_a_list() -> None:
    data = config_data(tag="v2", w=0.75)
    data["nodes"]["blend"] = {"op": "weighted_sum", "inputs": ["a", "b"], "weights": ["${w}", 0.25]}
    data["outputs"]["blend"] = {"path": "blend_${tag}.safetensors"}
    result = checked(data)
    assert result["outputs"]["blend"]["path"] == "blend_v2.safetensors"
    assert result["nodes"]["blend"]["weights"] == [0.75, 0.25]


def test_variable_used_only_by_another_used_variable_is_fine() -> None:
    data = config_data(half=0.5, alpha="${half}")
    data["nodes"]["blend"]["alpha"] = "${alpha}"
    result = checked(data)
    assert result["alpha"] == 0.5
    assert result["half"] == 0.5
    assert result["nodes"]["blend"]["alpha"] == 0.5


def test_variable_used_only_by_an_unused_variable_is_reported() -> None:
    error = check_error(config_data(half=0.5, alpha="${half}"))
    assert error.where == "r.yaml, alpha"


def test_misspelt_interpolation_suggests_the_variable() -> None:
    data = config_data(alpha=0.5)
    data["nodes"]["blend"]["alpha"] = "${alhpa}"
    error = check_error(data)
    assert "cannot resolve '${alhpa}'" in error.what
    assert error.where == "r.yaml, nodes.blend.alpha"
    assert error.fix is not None
    assert "did you mean '${alpha}'" in error.fix


def test_missing_value_is_an_error() -> None:
    error = check_error(config_data(alpha="???"))
    assert "not set" in error.what
    assert error.where == FILE
    assert error.fix is not None
    assert "???" in error.fix


@pytest.mark.parametrize("setting", ["device", "cache_dir", "seed", "progress", "description"])
def test_settings_need_no_interpolation(setting: str) -> None:
    values = {"device": "cpu", "cache_dir": "c", "seed": 1, "progress": False, "description": "d"}
    assert checked(config_data(**{setting: values[setting]}))[setting] == values[setting]
