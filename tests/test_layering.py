"""The floors import one way only: raysweep (the Python API) -> cluster -> search_spaces -> trainers."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"trainers": {"raysweep", "cluster", "search_spaces"}, "search_spaces": {"raysweep", "cluster"},
             "cluster": {"raysweep"}}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_floors_never_import_upper_ones(package):
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imported_packages(p) & FORBIDDEN[package])
        for p in (ROOT / package).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}
