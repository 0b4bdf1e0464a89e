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


# Modules that may import Ray's private parts (``ray._*``, ``ray.*._internal``, ``ray.*._private``),
# each behind a version gate with a public fallback (docs/internals.md).
PRIVATE_RAY_MODULES = {"trainers/ray_private.py", "trainers/process_group.py"}


def _private_ray_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n.split(".")[0] == "ray" and any(p.startswith("_") for p in n.split(".")[1:])]


def test_rays_private_parts_are_imported_only_by_the_gated_modules():
    offenders = {str(p.relative_to(ROOT)): _private_ray_imports(p)
                 for package in ("raysweep", "cluster", "search_spaces", "trainers")
                 for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v and k not in PRIVATE_RAY_MODULES} == {}


def test_the_private_path_is_on_only_on_tested_ray_versions(monkeypatch):
    from trainers import ray_private

    monkeypatch.delenv(ray_private.ENV, raising=False)
    assert ray_private.enabled("2.60.0") == (ray_private.TrainController is not None)
    assert not ray_private.enabled("2.58.1") and not ray_private.enabled("2.61.0")
    monkeypatch.setenv(ray_private.ENV, "0")
    assert not ray_private.enabled("2.60.0")
