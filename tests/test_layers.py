"""The layering rule of docs/ARCHITECTURE.md, checked on the source of every module.

Each module under ``neuroray/`` belongs to one layer; a module may import only from its own layer
or a lower one. Every import counts: at module level, inside functions, under ``TYPE_CHECKING``,
relative, and ``importlib.import_module("neuroray....")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "neuroray"

# The rule, lowest layer first (keep in step with docs/ARCHITECTURE.md, "Layers").
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "neuroray",
            "errors",
            "registry",
            "config",
            "configs",
            "paths",
            "runtime",
            "simcluster",
            "preview",
            "config_docs",
        ),
    ),
    ("platform", ("platform", "view")),
    ("models", ("models", "masking")),
    ("segmentation", ("segmentation",)),
    ("trainers", ("trainers",)),
    ("agents, tuning", ("agents", "tuning")),
    ("cli, demo", ("cli", "demo")),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """``neuroray.segmentation.blockwise`` -> ``segmentation``; ``neuroray`` -> ``neuroray``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every neuroray module ``path`` imports, anywhere in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from neuroray import trainers` imports the subpackage, not the package
            found += [
                (node.lineno, f"{base}.{alias.name}" if base == "neuroray" else base)
                for alias in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return sorted({(line, name) for line, name in found if name.split(".")[0] == "neuroray"})


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    """A new top-level module or subpackage must be placed in a layer (here and in the doc)."""
    unplaced = sorted({unit_of(module_name(p)) for p in MODULES} - set(RANK))
    assert not unplaced, (
        f"neuroray.{unplaced} belong to no layer: add them to LAYERS in tests/test_layers.py "
        "and to docs/ARCHITECTURE.md"
    )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_a_higher_layer(path):
    module = module_name(path)
    rank = RANK.get(unit_of(module))
    if rank is None:
        pytest.skip("not placed in a layer (test_every_module_has_a_layer fails)")
    upward = [
        f"line {line}: {name} ({LAYERS[RANK[unit_of(name)]][0]} layer)"
        for line, name in imported_modules(path)
        if RANK.get(unit_of(name), -1) > rank
    ]
    assert not upward, (
        f"{module} ({LAYERS[rank][0]} layer) imports a higher layer: {'; '.join(upward)}. "
        "See docs/ARCHITECTURE.md for where the code belongs."
    )


def test_the_rule_is_the_documented_one():
    """The doc states the same order as LAYERS."""
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    rule = next(line for line in doc.splitlines() if line.startswith("Layer order:"))
    assert rule == "Layer order: " + " < ".join("{" + ", ".join(units) + "}" for _, units in LAYERS)


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """Imports inside functions, relative imports and import_module strings are all found."""
    package = tmp_path / "neuroray" / "segmentation"
    package.mkdir(parents=True)
    source = package / "probe.py"
    source.write_text(
        "import importlib\n"
        "def load():\n"
        "    from neuroray.trainers.loop import fit\n"
        "    from ..agents import dbmim\n"
        "    from neuroray import tuning\n"
        "    return importlib.import_module('neuroray.cli')\n"
        "from . import metrics\n"
    )
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path / "neuroray")
    assert sorted(name for _, name in imported_modules(source)) == [
        "neuroray.agents",
        "neuroray.cli",
        "neuroray.segmentation",
        "neuroray.trainers.loop",
        "neuroray.tuning",
    ]
    with pytest.raises(AssertionError, match="imports a higher layer"):
        test_no_module_imports_a_higher_layer(source)
