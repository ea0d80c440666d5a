"""The package's import layers (README "Layers"): every import inside cardhouse, function-local ones too,
goes to its own package or to a lower layer, never up and never sideways between peers."""

from __future__ import annotations

import ast
import sys
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


def imports(top_level: bool | None = None) -> list[tuple[str, str, int, str]]:
    """(importing module, imported module, line, importing file) for every cardhouse import in the package;
    ``top_level``: only those at a module's top level (True) or only those elsewhere (False)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("cardhouse",) + path.relative_to(ROOT).with_suffix("").parts
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        module = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if top_level is not None and (node in tree.body) != top_level:
                continue
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


# cardhouse's own imports sit at the top of their modules; inside a function (or under TYPE_CHECKING) only
# where a module-level one would be a cycle or would import a heavy optional package (lm-eval), and in the
# CLI, whose commands import their machinery when they run so that --help stays fast. (importer, imported)
FUNCTION_LOCAL = {
    ("cardhouse.evaluation.metrics", "cardhouse.evaluation.measure"),  # annotation: measure imports metrics
    ("cardhouse.reports.context", "cardhouse.reports.settings"),  # annotation: settings -> steps -> context
    ("cardhouse.evaluation.perplexity", "cardhouse.evaluation.streamed"),  # streamed imports perplexity
    ("cardhouse.evaluation.zeroshot", "cardhouse.evaluation.lm_backend"),  # lm_backend imports lm-eval
}


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


def private_imports() -> list[str]:
    """Every import of a ``_private`` name (``from cardhouse.x import _name``, or ``module._name`` on an imported
    cardhouse module) that crosses from one cardhouse package to another."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("cardhouse",) + path.relative_to(ROOT).with_suffix("").parts
        package, module = parts[:-1], ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        tree, names = ast.parse(path.read_text()), {}  # local name -> the cardhouse module or name it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("cardhouse")):
                base = ".".join(list(package[: len(package) - (node.level - 1)]) + ([node.module] if node.module else [])) \
                    if node.level else node.module
                for alias in node.names:
                    names[alias.asname or alias.name] = f"{base}.{alias.name}"
                    if _private(alias.name) and _unit(base) != _unit(module):
                        found.append(f"{path}:{node.lineno}: {module} imports {alias.name} from {base}")
            elif isinstance(node, ast.Import):
                names.update({a.asname or a.name: a.name for a in node.names if a.name.startswith("cardhouse")})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) \
                    and node.value.id in names and _unit(names[node.value.id]) != _unit(module):
                found.append(f"{path}:{node.lineno}: {module} uses {node.value.id}.{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_package_uses_another_packages_private_names():
    assert not private_imports(), "\n".join(private_imports())


def test_the_private_name_walk_sees_a_private_import(tmp_path, monkeypatch):
    # a package that reaches into another's private name must be found, or the test above checks nothing
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "x.py").write_text("from ..analysis.massive_weights import _rows\n"
                                                  "from ..evaluation import metrics\nmetrics._ok\n"
                                                  "from .. import analysis\nanalysis._bad\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = private_imports()
    assert len(found) == 2 and "_rows" in found[0] and "analysis._bad" in found[1], found


def test_function_local_imports_only_where_needed():
    local = {(a, b) for a, b, _, _ in imports(top_level=False) if _unit(a) != "cli"}
    assert local <= FUNCTION_LOCAL, sorted(local - FUNCTION_LOCAL)
    assert ("cardhouse.evaluation.zeroshot", "cardhouse.evaluation.lm_backend") in local  # the walk sees them


def test_the_walk_sees_the_imports_it_checks():
    pairs = {(_unit(a), _unit(b)) for a, b, _, _ in imports()}
    # a top-level, a function-local and a from-package import the test must see, or it checks nothing
    assert {("interventions", "analysis"), ("cli", "reports"), ("evaluation", "data")} <= pairs
