"""The package's layout is a decision: rooms by layer with no import cycle, each room importing only
what its docstring allows; a declared public surface; Hydra's private names in one module."""

from __future__ import annotations

import ast
import re

import pytest

import merger
from tests.conftest import REPO

PACKAGE = REPO / "merger"
ROOMS = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and p.name != "conf")
PRIVATE = (
    "_normalize_file_name",
    "_list_add_result",
    "_get_header_dict",
    "_get_node",
    "._value(",
    "hydra._internal",
    "omegaconf._utils",
)


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "merger"


def imports_between_rooms() -> dict[str, set[str]]:
    """room -> the rooms (or ground modules such as errors) its modules import, from the source (ast)."""
    edges: dict[str, set[str]] = {}
    for file in PACKAGE.rglob("*.py"):
        relative = file.relative_to(REPO).with_suffix("").parts
        module = ".".join(relative[:-1] if relative[-1] == "__init__" else relative)
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                if name.startswith("merger.") and room_of(name) != room_of(module):
                    edges.setdefault(room_of(module), set()).add(room_of(name))
    return edges


def test_no_import_cycle_between_rooms() -> None:
    edges = imports_between_rooms()
    cycles = sorted({tuple(sorted((a, b))) for a, bs in edges.items() for b in bs if a in edges.get(b, set())})
    assert cycles == [], f"rooms that import each other: {cycles} (place each piece where its users are)"


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_only_what_its_docstring_allows(room: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text())) or ""
    declared = re.search(r"May import: (.+?)\.?$", doc, flags=re.MULTILINE)
    assert declared, f"merger/{room}/__init__.py must say which rooms it may import ('May import: ...')"
    allowed = set(re.findall(r"merger\.(\w+)", declared.group(1))) | {"errors"}
    if "every room" in declared.group(1):
        allowed |= set(ROOMS)
    extra = imports_between_rooms().get(room, set()) - allowed - {room}
    assert extra == set(), f"merger.{room} imports {sorted(extra)}, which its docstring does not allow"


def test_few_plain_modules_at_the_top() -> None:
    plain = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert plain == ["__init__.py", "__main__.py", "errors.py"]


def test_no_module_imports_the_front_door() -> None:
    for file in PACKAGE.rglob("*.py"):
        if file == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "merger" and not node.level:
                pytest.fail(f"{file.relative_to(REPO)} imports from merger/__init__.py (the front door only)")


EXPECTED_PUBLIC = [
    "ElementwiseOp",
    "MergeParams",
    "MergerError",
    "NodeRun",
    "Op",
    "OpParams",
    "OpRegistry",
    "OutputRun",
    "RandomParams",
    "RunResult",
    "WholeTensorOp",
    "__version__",
    "builtin_registry",
    "run",
]


def test_the_public_surface_is_declared() -> None:
    """A public name that appears or disappears must change both merger.__all__ and this list."""
    assert sorted(merger.__all__) == sorted(EXPECTED_PUBLIC)
    for name in merger.__all__:
        assert getattr(merger, name) is not None, name
    public = {n for n in vars(merger) if not n.startswith("_") and not isinstance(getattr(merger, n), type(merger))}
    undeclared = public - set(merger.__all__) - {"annotations", "importlib", "TYPE_CHECKING", "Any"}
    assert undeclared == set(), f"public names not in __all__: {sorted(undeclared)}"
    assert (
        merger.__version__ == __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    )


def test_hydra_private_names_still_exist() -> None:
    from merger.cli import hydra_private

    for owner, name in hydra_private.PRIVATE_NAMES:
        assert hasattr(owner, name), (
            f"{owner.__module__}.{owner.__qualname__}.{name} is gone: this Hydra changed a private name merger"
            " uses; adapt merger/cli/hydra_private.py"
        )
    assert callable(hydra_private.yaml_loader())


def test_hydra_private_names_are_used_in_one_module() -> None:
    users = sorted(
        str(f.relative_to(REPO))
        for f in PACKAGE.rglob("*.py")
        if any(name in f.read_text() for name in PRIVATE) and f.name != "hydra_private.py"
    )
    assert users == [], f"private Hydra/OmegaConf names outside merger/cli/hydra_private.py: {users}"
