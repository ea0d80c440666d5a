"""The package's import layers (README "Layers"): every import inside cardhouse, function-local ones too,
goes to its own package or to a lower layer, never up and never sideways between peers."""

from __future__ import annotations

import ast
from pathlib import Path

import cardhouse

# lowest first; packages in one tuple are peers that must not import each other
LAYERS = [
    ("_version", "_files", "_install"),
    ("results", "journal"),
    ("models",),
    ("capture",),
    ("data",),
    ("analysis", "evaluation"),
    ("validation",),
    ("interventions",),
    ("encoders", "precision", "export"),
    ("finetuning",),
    ("reports",),
    ("emergence",),
    ("cli",),
    ("__init__", "__main__"),  # the package's own namespace: the Python API's short names
]
RANK = {name: i for i, tier in enumerate(LAYERS) for name in tier}
ROOT = Path(cardhouse.__file__).parent


def _unit(module: str) -> str:
    """cardhouse.analysis.scan -> analysis; cardhouse.results -> results; cardhouse -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str, int, str]]:
    """(importing module, imported module, line, importing file) for every relative import in the package."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("cardhouse",) + path.relative_to(ROOT).with_suffix("").parts
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        module = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - (node.level - 1)])
                if node.module:
                    found.append((module, ".".join(base + [node.module]), node.lineno, str(path)))
                else:  # from . import x: x is a module of that package (or a name of its __init__)
                    for alias in node.names:
                        found.append((module, ".".join(base + [alias.name]), node.lineno, str(path)))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cardhouse"):
                found.append((module, node.module, node.lineno, str(path)))
            elif isinstance(node, ast.Import):
                found += [(module, a.name, node.lineno, str(path)) for a in node.names if a.name.startswith("cardhouse")]
    return found


def test_every_package_has_a_layer():
    units = {_unit(".".join(("cardhouse",) + p.relative_to(ROOT).with_suffix("").parts)) for p in ROOT.rglob("*.py")}
    assert units <= set(RANK), sorted(units - set(RANK))


def test_no_import_goes_up_a_layer_or_sideways():
    bad = []
    for importer, imported, line, path in imports():
        src, dst = _unit(importer), _unit(imported)
        if src != dst and RANK[dst] >= RANK[src]:
            bad.append(f"{path}:{line}: {importer} ({src}) imports {imported} ({dst})")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_the_imports_it_checks():
    pairs = {(_unit(a), _unit(b)) for a, b, _, _ in imports()}
    # a top-level, a function-local and a from-package import the test must see, or it checks nothing
    assert {("interventions", "analysis"), ("cli", "reports"), ("evaluation", "data")} <= pairs
