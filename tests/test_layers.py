"""The package's layers: imports point down only (README, "Layers").

    core -> data, models, training -> retraining -> curvature, mpe, attribution, memorization,
    representations -> experiments -> cli

Top-level modules (errors, options, progress, runs, report, user) sit below everything: they may
import each other and torch, never a layer. Read with `ast` from the source (imports inside
functions count too), so the rule holds for lazy imports as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "modelsense"
#: layer -> rank; a module may import modules of its rank or below (same-rank imports listed apart)
RANK = {"core": 1, "data": 2, "models": 2, "training": 3, "retraining": 4, "curvature": 5, "mpe": 6,
        "attribution": 7, "memorization": 6, "representations": 6, "experiments": 8, "cli": 9}
#: imports between packages that share a rank, allowed because one builds on the other's maths
ALLOWED_ACROSS = {("training", "data"), ("training", "models"), ("models", "data"), ("data", "models")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "modelsense" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK else "top"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    rel = path.relative_to(PACKAGE)
    here = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in RANK else "top"
    if here == "top" and rel.name in ("__init__.py", "__main__.py"):
        return  # the package's entry points reach the CLI
    for module in _imports(path):
        there = _layer(module)
        if there is None or there == here:
            continue
        if here == "top":
            assert there == "top", f"{rel} (below every layer) imports {module}"
            continue
        if there == "top":
            continue
        assert RANK[there] < RANK[here] or (here, there) in ALLOWED_ACROSS, f"{rel} ({here}) imports {module} ({there})"
