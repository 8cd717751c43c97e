"""Lower layers never import upper ones (DESIGN.md "Layers"): checked on the source, import by import.

The package root counts as the top layer: ``import metaad`` (or ``from metaad import load_run``) inside a
lower layer reaches upward, since the root hands on names from ``metaad.deploy``. ``from metaad import
runtime`` is an import of the module ``metaad.runtime``, and is judged as that.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "metaad"
# low to high; a module may import its own layer and those before it
LAYERS = [
    {"io", "types", "device", "runtime", "param_types"},
    {"backbones", "components", "data", "metrics"},
    {"training"},
    {"models"},
    {"runs"},
    {"deploy"},
    {"cli"},
    {"__init__"},  # the package's face: it re-exports the user API lazily (metaad.load_run)
]


def _layer(part: str) -> int:
    for rank, names in enumerate(LAYERS):
        if part in names:
            return rank
    raise AssertionError(f"metaad.{part} is in no layer: add it to LAYERS in {__file__}")


def _imports(tree: ast.AST) -> list[str]:
    """Every metaad module a source imports, by full name; ``metaad`` alone is the package root."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "metaad":  # from metaad import X: the submodule X, or a name of the root
                found += [f"metaad.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name == "metaad" or name.startswith("metaad.")]


def _target_layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return _layer("__init__")
    top = parts[1]
    if not (PACKAGE / top).is_dir() and not (PACKAGE / f"{top}.py").is_file():
        return _layer("__init__")  # a name the root defines or hands on (metaad.load_run)
    return _layer(top)


def violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        own = _layer(relative.parts[0].removesuffix(".py"))
        for name in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if _target_layer(name) > own:
                found.append(f"{relative} imports {name}")
    return found


def test_no_module_imports_a_higher_layer():
    found = violations()
    assert not found, "\n".join(found)


def test_the_check_fails_on_a_planted_upward_import(tmp_path):
    """A bare ``import metaad`` in a lower layer, or a components module importing a model, is caught."""
    planted_imports = ("import metaad\n", "from metaad import load_run\n", "from metaad.models import REGISTRY\n")
    for number, planted in enumerate(planted_imports):
        package = tmp_path / str(number) / "metaad"
        (package / "components").mkdir(parents=True)
        (package / "models").mkdir()
        (package / "__init__.py").write_text("")
        (package / "components" / "planted.py").write_text(planted)
        assert violations(package), planted
    (package / "components" / "planted.py").write_text("from metaad import io\nfrom metaad.types import device_of\n")
    (package / "io.py").write_text("")
    (package / "types.py").write_text("")
    assert violations(package) == []
