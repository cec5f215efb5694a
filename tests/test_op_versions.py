"""Cache entries never outlive the code that made them: each op's results on fixed inputs, pinned per version.

Every op runs through the real pipeline on fixed, seeded tiny inputs whose values are multiples of 1/8,
so every sum is exact and the results do not depend on summation order, SIMD width or machine. The
digest of each op's result is pinned in VERSIONS under (op name, op version). A change of results
without a version bump fails here: cached entries of the old results would still be served.
An SVD is not bit-reproducible across LAPACK builds (nor are its singular vectors' signs), so
extract_lora's digest is of a canonical form of its outputs (`CANONICAL`): the sign-free products
B @ A and the factors' squared row norms, on a 1/64 grid, with the factors' shapes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from merger.core.arrays import NumpyBackend
from merger.core.tensor_bytes import dtype_code, tensor_memoryview
from merger.ops import builtin_ops
from merger.ops.base import AnyOp, InputSpecs, NodeSpec
from tests.conftest import BytesSource, Collector, keyed, spec_of
from tests.esrgan_models import old_layout

StateDict = dict[str, torch.Tensor]

#: (op, version) -> sha256 of its outputs on the inputs below; update only together with a version bump
VERSIONS: dict[tuple[str, int], str] = {
    ("lerp", 1): "cccb4ce475b2bef0e8a83260d780323c2845a528366bd247e534a31d5315c6b0",
    ("weighted_sum", 1): "d33b12d362b86e0e4c1d2ac756b8b21e865c27cd521018abf212afa1b2d521a8",
    ("average", 1): "522b5c9f8d3dd554564bfc1c4076c3cc7ff85031ccb50a7e3c4fc6d0fbe89bca",
    ("add_difference", 1): "9337b92dc85d065792e941e25442c43d3277d5cd277c1b0aacda4a55b1297759",
    ("slerp", 1): "c6d92b829c694496bce8f97fa21578156e648dd0b7fb0bf98f5333f748476bb1",
    ("task_arithmetic", 1): "fc096ee4b1731e10faa232b7a19cba5be24f6369c3ad9a8d55c13f7d8e9f720a",
    # 2: ties at the cut go to the first in C order (entries of version 1 broke them another way)
    ("ties", 2): "3f2a13ec736c5cbdba5a47d4f2381f6d1a57daaeb49928511e7f272060c159d3",
    # 3: a float64 input among narrower ones is cut over 64-bit patterns (these float32 inputs: the same)
    ("ties", 3): "3f2a13ec736c5cbdba5a47d4f2381f6d1a57daaeb49928511e7f272060c159d3",
    # 4: each model is cut over its own deltas' patterns (float32 beside float64; these inputs: the same)
    ("ties", 4): "3f2a13ec736c5cbdba5a47d4f2381f6d1a57daaeb49928511e7f272060c159d3",
    ("dare_linear", 1): "8271d7cef5afac1bc82c5a2f26ac33a821482cf997c52cde91ac438253308a00",
    ("dare_ties", 1): "42a14b18e605f1c85926c9910bda1b1be33c111dab7365afb0a109d70f6eef50",
    # 2: a density float32 rounds to 0 divides as the array maths does (these inputs: the same)
    ("dare_ties", 2): "42a14b18e605f1c85926c9910bda1b1be33c111dab7365afb0a109d70f6eef50",
    ("model_stock", 1): "c3a90eb566bc387f2fbc33887944cd251f90ea6b8a6680baabd41150907f83f3",
    ("select", 1): "e04be291c44eec43cb50bbb13de91f53671727a5986bb28d2d2b9f539d8fc9be",
    ("splice", 1): "9806f547ed6ebb8f23bfee294e5ad6bb00ca3c1bf7b4f904f7d65cdfc50028cf",
    ("convert_scale", 1): "cf244928644e640e15d9b521747c94ca195e819a716f6a56b84820ea010a97a2",
    ("apply_lora", 1): "8113a74c0f6c3fa0e5b4aea56ee2c255ef8009a8a9251bced6ee7b84abe64f15",
    ("extract_lora", 1): "c6a9a24b615f93971830727035df1818e17bee18b3cac94329f0dae9f5c58632",
}


def dyadic(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Values k/8 with |k| <= 8: sums of a few of them, and their products, are exact in float32."""
    return torch.randint(-8, 9, shape, generator=g).float() / 8


def llm(seed: int) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": dyadic((16, 8), g), "model.norm.weight": dyadic((8,), g)}
    for i in range(3):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = dyadic((8, 8), g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = dyadic((16, 8), g)
    sd["lm_head.weight"] = dyadic((16, 8), g).to(torch.bfloat16)
    sd["counter"] = torch.tensor(3, dtype=torch.int64)
    return sd


def lora_adapter(seed: int) -> StateDict:
    """LoRA factors of llm()'s q_proj (rank 2) and up_proj (rank 1), as peft names them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(3):
        for module, rank, (out, n_in) in (("self_attn.q_proj", 2, (8, 8)), ("mlp.up_proj", 1, (16, 8))):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            sd[f"{prefix}.lora_A.weight"] = dyadic((rank, n_in), g)
            sd[f"{prefix}.lora_B.weight"] = dyadic((out, rank), g)
    return sd


LORA_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"up_proj": 1}}


def low_rank_tuned(seed: int) -> StateDict:
    """llm(0) plus, on each q_proj and up_proj, a signed permutation of diag(3, 2, 1.5): a delta whose
    SVD is exact in any LAPACK, with distinct singular values."""
    g = torch.Generator().manual_seed(seed)
    sd = llm(0)
    for key, value in sd.items():
        if key.endswith(("q_proj.weight", "up_proj.weight")):
            rows, columns = torch.randperm(value.shape[0], generator=g)[:3], torch.randperm(8, generator=g)[:3]
            signs = torch.randint(0, 2, (3,), generator=g) * 2 - 1
            delta = torch.zeros_like(value)
            delta[rows, columns] = torch.tensor([3.0, 2.0, 1.5]) * signs
            sd[key] = value + delta
    return sd


def esrgan(seed: int) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    return {k: dyadic(tuple(v.shape), g) for k, v in old_layout(filters=4, blocks=1, growth=2, seed=seed).items()}


CASES: dict[str, tuple[dict[str, Any], list[StateDict], tuple[str, ...]]] = {
    "lerp": ({"alpha": 0.25}, [llm(1), llm(2)], ("a", "b")),
    "weighted_sum": ({"weights": [0.5, 0.25, 0.25], "normalize": True}, [llm(1), llm(2), llm(3)], ("a", "b", "c")),
    "average": ({}, [llm(1), llm(2), llm(3), llm(4)], ("a", "b", "c", "d")),
    "add_difference": ({"multiplier": 0.5}, [llm(1), llm(2), llm(3)], ("a", "b", "c")),
    "slerp": ({"t": 0.375}, [llm(1), llm(2)], ("a", "b")),
    "task_arithmetic": ({"base": "base", "weights": [1.0, 0.5]}, [llm(0), llm(1), llm(2)], ("base", "a", "b")),
    "ties": ({"base": "base", "density": 0.5}, [llm(0), llm(1), llm(2)], ("base", "a", "b")),
    "dare_linear": ({"base": "base", "density": 0.5, "seed": 7}, [llm(0), llm(1), llm(2)], ("base", "a", "b")),
    "dare_ties": ({"base": "base", "density": 0.5, "seed": 7}, [llm(0), llm(1), llm(2)], ("base", "a", "b")),
    "model_stock": ({"base": "base"}, [llm(0), llm(1), llm(2), llm(3)], ("base", "a", "b", "c")),
    "select": (
        {"slices": [{"input": "a", "layers": [0, 2]}, {"input": "b", "layers": [1, 3]}]},
        [llm(1), llm(2)],
        ("a", "b"),
    ),
    "splice": ({"p": 0.5, "granularity": "filter", "seed": 3}, [esrgan(1), esrgan(2)], ("a", "b")),
    "convert_scale": ({"scale": 8}, [esrgan(1)], ("a",)),
    "apply_lora": ({"scale": 0.5}, [llm(0), lora_adapter(1)], ("base", "adapter")),
    "extract_lora": ({"rank": 2}, [llm(0), low_rank_tuned(1)], ("base", "tuned")),
}
#: the adapter_config.json of inputs that are PEFT adapter folders, by op and input index
CONFIGS: dict[str, dict[int, Mapping[str, Any]]] = {"apply_lora": {1: LORA_CONFIG}}


def on_grid(tensor: torch.Tensor) -> torch.Tensor:
    return torch.round(tensor.double() * 64) / 64


def lora_canonical(outputs: StateDict) -> StateDict:
    """Per module: B @ A, the squared row norms of A, and the factors' shapes (see the module docstring)."""
    found: StateDict = {}
    for key, a in outputs.items():
        if key.endswith(".lora_A.weight"):
            b = outputs[key.replace(".lora_A.", ".lora_B.")]
            module = key.removesuffix(".lora_A.weight")
            found[f"{module}.delta"] = on_grid(b.double() @ a.double())
            found[f"{module}.spectrum"] = on_grid((a.double() ** 2).sum(dim=1))
            found[f"{module}.shapes"] = torch.tensor([*a.shape, *b.shape])
    return found


CANONICAL: dict[str, Callable[[StateDict], StateDict]] = {"extract_lora": lora_canonical}


def outputs_of(
    op: AnyOp, params: Any, models: list[StateDict], names: tuple[str, ...], backend: Any = None
) -> tuple[NodeSpec[Any], StateDict]:
    """conftest.pipeline_outputs, with the inputs' adapter configs (CONFIGS) in the op's InputSpecs."""
    from merger.core.tensor_bytes import tensor_from_buffer
    from merger.engine.byte_io import ByteSource
    from merger.engine.pipeline import Pipeline

    specs = tuple(spec_of(m) for m in models)
    configs = tuple(CONFIGS.get(op.name, {}).get(i) for i in range(len(models)))
    spec = op.spec(InputSpecs(names, specs, configs), params)
    collector = Collector()
    sources: list[ByteSource] = [BytesSource.of(m) for m in models]
    pipeline = Pipeline(op, keyed(op, params, spec), sources, specs, backend or NumpyBackend())
    pipeline.run(collector, spec, lambda key, nbytes: None)
    joined = collector.joined()
    out = {k: tensor_from_buffer(bytearray(joined[k]), t.dtype, t.shape) for k, t in spec.tensors.items()}
    return spec, out


def digest(outputs: StateDict) -> str:
    sha = hashlib.sha256()
    for key, tensor in outputs.items():
        sha.update(f"{key}|{dtype_code(tensor.dtype)}|{list(tensor.shape)}|".encode())
        sha.update(tensor_memoryview(tensor.contiguous()))
    return sha.hexdigest()


def test_every_op_has_a_case() -> None:
    assert {op.name for op in builtin_ops()} == set(CASES)


def pinned_problem(op: Any) -> str | None:
    """Why `op`'s results on its case do not match the digest pinned for its version (None: they match)."""
    raw, models, names = CASES[op.name]
    params = op.params_model.model_validate(raw)
    _, outputs = outputs_of(op, params, models, names)
    found = digest(CANONICAL.get(op.name, dict)(outputs))
    expected = VERSIONS.get((op.name, op.version))
    if found == expected:
        return None
    return (
        f"op '{op.name}' (version {op.version}) gives results whose digest is {found}, not the pinned {expected}:"
        f" if its results changed on purpose, bump `version` of {type(op).__name__} (so cache entries of the old"
        f" results are not served) and pin the new digest in VERSIONS[({op.name!r}, {op.version + 1})]"
    )


@pytest.mark.parametrize("op", builtin_ops(), ids=lambda op: op.name)
def test_results_are_pinned_to_the_op_version(op: Any) -> None:
    problem = pinned_problem(op)
    assert problem is None, problem


def test_a_change_of_results_without_a_bump_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from merger.ops.linear import Lerp

    real = Lerp.combine
    monkeypatch.setattr(Lerp, "combine", lambda self, values, params, xp: real(self, values, params, xp) * 1.0001)
    monkeypatch.setattr("merger.core.fused.FUSED", None)  # the array maths, not the fused loop
    problem = pinned_problem(Lerp())
    assert problem is not None and "bump `version` of Lerp" in problem and "VERSIONS[('lerp', 2)]" in problem
