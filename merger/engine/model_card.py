"""The model card (`README.md`) of a folder output: what the Hugging Face Hub shows and reads.

YAML front matter (`base_model`, `tags`, `library_name`), then how the model was made: the
method of each node and its paper, the resolved recipe of the output's subgraph, each source with
its content hash, and the command that makes it again. The facts come from the entry's
provenance (merger.engine.provenance), the same that every output file carries.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from merger.engine.executor import NodeResult
from merger.engine.plan import Plan
from merger.engine.provenance import parse_metadata, upstream
from merger.io.safetensors_header import read_header
from merger.recipe.model import OutputDef

if TYPE_CHECKING:
    from merger.engine.folder_facts import FolderFacts

PROJECT = "merger"
#: op name -> (the method in words, where it comes from)
METHODS: dict[str, tuple[str, str]] = {
    "lerp": (
        "linear interpolation (network interpolation)",
        "Wang et al., *Deep Network Interpolation for Continuous Imagery Effect Transition*, CVPR 2019,"
        " [arXiv:1811.10515](https://arxiv.org/abs/1811.10515)",
    ),
    "weighted_sum": (
        "weighted sum",
        "Wortsman et al., *Model soups*, ICML 2022, [arXiv:2203.05482](https://arxiv.org/abs/2203.05482)",
    ),
    "average": (
        "uniform average (a model soup)",
        "Wortsman et al., *Model soups*, ICML 2022, [arXiv:2203.05482](https://arxiv.org/abs/2203.05482)",
    ),
    "add_difference": (
        "add difference (A + alpha (B - C))",
        "Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023,"
        " [arXiv:2212.04089](https://arxiv.org/abs/2212.04089)",
    ),
    "task_arithmetic": (
        "task arithmetic",
        "Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023,"
        " [arXiv:2212.04089](https://arxiv.org/abs/2212.04089)",
    ),
    "slerp": ("spherical linear interpolation", "Shoemake, *Animating Rotation with Quaternion Curves*, SIGGRAPH 1985"),
    "ties": (
        "TIES-Merging",
        "Yadav et al., *TIES-Merging: Resolving Interference When Merging Models*, NeurIPS 2023,"
        " [arXiv:2306.01708](https://arxiv.org/abs/2306.01708)",
    ),
    "dare_linear": (
        "DARE (drop and rescale), linear",
        "Yu et al., *Language Models are Super Mario*, ICML 2024, [arXiv:2311.03099](https://arxiv.org/abs/2311.03099)",
    ),
    "dare_ties": (
        "DARE (drop and rescale) with TIES sign election",
        "Yu et al., *Language Models are Super Mario*, ICML 2024, [arXiv:2311.03099](https://arxiv.org/abs/2311.03099)",
    ),
    "model_stock": (
        "Model Stock",
        "Jang et al., *Model Stock: All we need is just a few fine-tuned models*, ECCV 2024,"
        " [arXiv:2403.19522](https://arxiv.org/abs/2403.19522)",
    ),
    "apply_lora": (
        "LoRA adapters merged into the base",
        "Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, ICLR 2022,"
        " [arXiv:2106.09685](https://arxiv.org/abs/2106.09685)",
    ),
    "extract_lora": (
        "a LoRA adapter extracted by truncated SVD of the fine-tune's difference from its base",
        "Hu et al., *LoRA*, ICLR 2022, [arXiv:2106.09685](https://arxiv.org/abs/2106.09685)",
    ),
}


@dataclass(frozen=True)
class CardContext:
    """What the run knows that the content does not: how it was started."""

    recipe_name: str | None
    recipe_file: str | None
    overrides: tuple[str, ...]


def model_card(
    output: OutputDef, node: NodeResult, plan: Plan, facts: FolderFacts, context: CardContext, *, library: str | None
) -> str:
    """The README.md text of a folder output."""
    provenance = parse_metadata(read_header(node.entry.path).metadata) or {}
    front: dict[str, Any] = {}
    if facts.base_models:
        front["base_model"] = list(dict.fromkeys(facts.base_models))
    if library:
        front["library_name"] = library
    if facts.adapter is not None:
        front["library_name"] = "peft"
    front["tags"] = ["merge", PROJECT]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {output.name}", ""]
    lines.append(f"This model was made with {PROJECT} from the recipe below (node `{output.node}`).")
    lines += ["", "## Method", ""]
    for name in upstream(plan, output.node):
        op = plan.nodes[name].op.name
        method, paper = METHODS.get(op, (plan.nodes[name].op.summary or op, ""))
        lines.append(f"- `{name}`: `{op}`, {method}" + (f". {paper}" if paper else ""))
    lines += ["", "## Recipe", "", "```yaml", str(provenance.get("recipe", "")).rstrip(), "```", ""]
    lines += ["## Sources", "", "| source | model | content hash |", "|---|---|---|"]
    names = dict(zip(facts.source_names, facts.base_models, strict=False))
    for source, info in (provenance.get("sources") or {}).items():
        digest = info.get("hash", "?") if isinstance(info, dict) else "?"
        lines.append(f"| `{source}` | {names.get(source, '')} | `{digest}` |")
    lines += ["", f"Content key: `{node.key}`; written as `{output.dtype}`.", "", "## Reproduce", ""]
    lines += ["```bash", _command(context), "```", ""]
    if facts.config_from is not None:
        lines.append(f"Configuration and tokenizer files come from the source `{facts.config_from}`.")
        lines.append("")
    return "\n".join(lines)


def _command(context: CardContext) -> str:
    if context.recipe_name:
        given = [o for o in context.overrides if not o.startswith("recipe=")]
        words = ["merger", f"recipe={context.recipe_name}", *given]
        return " ".join(shlex.quote(w) for w in words)
    return "# the recipe above, as a mapping: merger.run({...}) in Python, or saved as recipes/NAME.yaml"
