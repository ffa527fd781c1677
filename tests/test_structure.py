"""The package reads top-down: packages by job, each saying what it owns, and imports only run down the
layers below (lazy imports inside functions included), so the map of the code has no cycle and no arrow
running back up."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "nectar"
# Lowest first. A unit is a subpackage or a top-level module; it may import from itself and lower layers.
LAYERS = [
    {"errors"},  # the one exception a user can fix
    {"config", "files", "timing", "plots", "questions"},  # foundations: no model, no torch at import
    {"model"},  # loading models, token layouts, documents as ids
    {"manifest"},  # an artifact's header, read without torch
    {"providers"},  # what stands in for a KV cache, behind one protocol
    {"runtime"},  # a model running over a provider: prefill, binding, decode, ask
    {"measure"},  # how close a stand-in comes: one definition of each number
    {"artifact"},  # one compiled document in one file
    {"compiler"},  # the compile's stages
    {"eval", "serve"},  # what uses compiled documents
    {"cli"},  # the command line
    {"__main__"},  # `python -m nectar`
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def _imported_units(path: Path) -> set[str]:
    """The units `path` imports from, relative imports resolved against its package."""
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0: a top-level module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            base = list(path.relative_to(PACKAGE).parts[:depth - up]) if up <= depth else None
            assert base is not None, f"{path} imports above the package"
            names = [*base, *(node.module or "").split(".")] if node.module else base
            names = [n for n in names if n]
            found |= {names[0]} if names else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nectar."):
            found.add(node.module.split(".")[1])
    return found


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in FILES}
    assert units <= set(LAYER), f"place these in LAYERS: {sorted(units - set(LAYER))}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_only_down_the_layers(path):
    unit = _unit(path)
    up = {u for u in _imported_units(path) if u != unit and LAYER[u] >= LAYER[unit]}
    assert not up, f"{path.relative_to(PACKAGE)} imports from its own layer or above: {sorted(up)}"


@pytest.mark.parametrize("path", [*FILES, *PACKAGE.glob("*/__init__.py")], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_file_says_its_job(path):
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring saying what it owns"
