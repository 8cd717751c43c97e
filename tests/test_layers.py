"""Lower layers never import upper ones (DESIGN.md "Layers"): checked on the source, import by import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "metaad"
# low to high; a module may import its own layer and those before it
LAYERS = [
    {"io", "types"},
    {"backbones", "components", "data", "metrics"},
    {"training"},
    {"models"},
    {"meta"},
    {"engine"},
    {"cli"},
    {"__init__"},  # the package's face: it re-exports the user API lazily (metaad.load_run)
]


def _layer(part: str) -> int:
    for rank, names in enumerate(LAYERS):
        if part in names:
            return rank
    raise AssertionError(f"metaad.{part} is in no layer: add it to LAYERS in {__file__}")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith("metaad.")]


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        own = _layer(relative.parts[0].removesuffix(".py"))
        for name in _imports(path):
            target = _layer(name.split(".")[1])
            if target > own:
                violations.append(f"{relative} imports {name}")
    assert not violations, "\n".join(violations)
